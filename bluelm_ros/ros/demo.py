"""The main job: both nodes on the shipped models, a camera, questions, answers, overlays.

    bluelm-ros demo --out demo_output

1. A demo camera (camera_source_node) replays a synthetic street scene on
   /demo/camera/image_raw; segmentation_node and scene_qa_node run on it (the same node
   set as launch/bluelm_ros.launch.py, from config/bluelm_ros.yaml).
2. Masks and overlays are received over DDS; overlays are written as PNG.
3. Questions about the camera frame go through the service (~/ask) and the streaming
   action (~/ask_stream); more scenes go as images inside the request. Each answer is
   printed with the ground truth of the generator and the timings.
4. A summary (frames, rates, latencies, accuracy) goes to <out>/summary.json.
"""
import json
import os
import statistics
import tempfile
import time

import cv2
import numpy as np

CAMERA_TOPIC = '/demo/camera/image_raw'
# Scene seeds from the held-out range (training uses seeds below 10^9), so the printed
# accuracy is about scenes the model never saw.
DEMO_SEEDS = (1_000_000_007, 1_000_000_021, 1_000_000_042)


def _wait(predicate, timeout, step=0.05):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def _call(client, request, timeout):
    future = client.call_async(request)
    _wait(future.done, timeout)
    if not future.done():
        raise TimeoutError('no reply from the scene QA service')
    return future.result()


class DemoClient:
    """A plain rclpy node: mask/overlay subscriber, AskScene service and action client."""

    def __init__(self, node, srv, action):
        from rclpy.action import ActionClient
        from rclpy.qos import qos_profile_sensor_data
        from sensor_msgs.msg import Image
        self.node = node
        self.masks, self.overlays, self.mask_times = [], [], []
        node.create_subscription(Image, '/segmentation_node/mask', self._on_mask, 10)
        node.create_subscription(Image, '/segmentation_node/overlay', self._on_overlay,
                                 qos_profile_sensor_data)
        self.ask = node.create_client(srv.AskScene, '/scene_qa_node/ask')
        self.stream = ActionClient(node, action.AskScene, '/scene_qa_node/ask_stream')
        self.srv, self.action = srv, action

    def _on_mask(self, msg):
        now = self.node.get_clock().now().nanoseconds
        stamp = msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec
        self.mask_times.append((now - stamp) / 1e6)
        self.masks.append(msg)

    def _on_overlay(self, msg):
        if len(self.overlays) < 4:
            self.overlays.append(msg)

    def ask_service(self, question, image=None, timeout=120.0):
        req = self.srv.AskScene.Request(question=question)
        if image is not None:
            from bluelm_ros.ros.image_codec import numpy_to_image
            req.image = numpy_to_image(image, 'rgb8')
        return _call(self.ask, req, timeout)

    def ask_streaming(self, question, on_feedback, timeout=120.0):
        goal = self.action.AskScene.Goal(question=question)
        sent = self.stream.send_goal_async(goal, feedback_callback=on_feedback)
        _wait(sent.done, timeout)
        handle = sent.result()
        if handle is None or not handle.accepted:
            raise RuntimeError('goal rejected')
        result = handle.get_result_async()
        _wait(result.done, timeout)
        return result.result().result


def _timing_line(t):
    return (f'encode {t.image_encode_ms:6.1f} ms{" (cached)" if t.image_cached else ""}, '
            f'prefill {t.prefill_ms:6.1f} ms ({t.prompt_tokens} tok), decode '
            f'{t.decode_ms:6.1f} ms ({t.generated_tokens} tok, '
            f'{t.tokens_per_second:5.1f} tok/s), total {t.total_ms:6.1f} ms')


def run_demo(out, seeds=DEMO_SEEDS, duration=6.0, params=None):
    """Run the demo; return the summary dict (also written to <out>/summary.json)."""
    import rclpy
    from rclpy.executors import MultiThreadedExecutor
    from rclpy.parameter import Parameter

    from bluelm_ros.ros import interfaces
    from bluelm_ros.ros.common import release_dds
    from bluelm_ros.ros.image_codec import image_to_numpy
    from bluelm_ros.ros.bringup import Bringup, default_params_file
    from bluelm_ros.data.scene_qa import is_correct, SceneQAGenerator

    os.makedirs(out, exist_ok=True)
    gen = SceneQAGenerator()
    scenes = [gen.scene_questions(s) for s in seeds]
    frames_dir = tempfile.mkdtemp(prefix='bluelm_demo_')
    cv2.imwrite(os.path.join(frames_dir, 'scene.png'), scenes[0][0].image[:, :, ::-1])
    params = params if params is not None else default_params_file()
    rclpy.init()
    bringup = client_exec = None
    summary = {'answers': []}
    try:
        bringup = Bringup(params=params, camera_topic=CAMERA_TOPIC, camera_source=frames_dir,
                          extra_params={'camera_source': [Parameter('rate', value=2.0)]})
        bringup.start()
        node = rclpy.create_node('bluelm_demo_client')
        client = DemoClient(node, interfaces.load('srv'), interfaces.load('action'))
        client_exec = MultiThreadedExecutor(num_threads=2)
        client_exec.add_node(node)
        import threading
        threading.Thread(target=client_exec.spin, daemon=True).start()
        print(f'[demo] nodes up: {", ".join(bringup.nodes)}; camera {CAMERA_TOPIC} '
              f'(params {params or "defaults"})', flush=True)
        if not _wait(lambda: len(client.masks) >= 3, 60):
            raise RuntimeError('no segmentation masks within 60 s')
        _wait(lambda: False, duration)  # let the camera and the segmenter run a while
        for i, msg in enumerate(client.overlays):
            arr, _ = image_to_numpy(msg)
            cv2.imwrite(os.path.join(out, f'overlay_{i}.png'), arr[:, :, ::-1])
        mask, _ = image_to_numpy(client.masks[-1])
        cv2.imwrite(os.path.join(out, 'mask_last.png'), np.asarray(mask))
        seg = bringup.nodes['segmentation_node']
        stats = seg.stats
        print(f'[demo] segmentation: {stats["processed"]} masks from {stats["received"]} '
              f'frames, median frame->mask latency {statistics.median(client.mask_times):.0f} '
              f'ms; {len(client.overlays)} overlays written to {out}/', flush=True)
        summary['segmentation'] = {
            'frames_received': stats['received'], 'masks_published': stats['processed'],
            'dropped': stats['dropped'], 'masks_received': len(client.masks),
            'median_latency_ms': statistics.median(client.mask_times)}
        if not _wait(client.ask.service_is_ready, 30):
            raise RuntimeError('scene QA service not available')

        def record(kind, question, expected, res):
            ok = res.success and is_correct(res.answer, expected)
            mark = 'OK ' if ok else 'MISS'
            text = res.answer if res.success else f'error {res.error_code}: {res.error_message}'
            print(f'[demo] {mark} ({kind}) Q: {question}\n           A: {text}   '
                  f'(expected: {expected})\n           {_timing_line(res.timings)}', flush=True)
            summary['answers'].append({
                'via': kind, 'question': question, 'answer': res.answer,
                'expected': expected, 'correct': ok, 'error': res.error_code,
                'image_stamp': res.image_header.stamp.sec + res.image_header.stamp.nanosec
                * 1e-9, 'timings': {f: getattr(res.timings, f) for f in (
                    'image_encode_ms', 'image_cached', 'prefill_ms', 'decode_ms',
                    'tokens_per_second', 'total_ms')}})

        scene0, questions0 = scenes[0]
        print(f'[demo] questions about the camera frame (ground truth: '
              f'{len(scene0.objects)} objects)', flush=True)
        for qtype, question, expected in questions0:
            if qtype == 'caption':
                continue
            record('service', question, expected, client.ask_service(question))
        caption = [q for q in questions0 if q[0] == 'caption']
        if caption:
            _, question, expected = caption[0]
            print(f'[demo] streaming (action): {question}\n           ', end='', flush=True)
            res = client.ask_streaming(
                question, lambda fb: print(fb.feedback.new_text, end='', flush=True))
            print(flush=True)
            record('action', question, expected, res)
        for scene, questions in scenes[1:]:
            print('[demo] questions with the image in the request (another scene)', flush=True)
            for qtype, question, expected in questions[:3]:
                record('service+image', question, expected,
                       client.ask_service(question, image=scene.image))
        correct = sum(a['correct'] for a in summary['answers'])
        summary['accuracy'] = correct / max(len(summary['answers']), 1)
        print(f'[demo] {correct}/{len(summary["answers"])} answers match the ground truth',
              flush=True)
    finally:
        if client_exec is not None:
            client_exec.shutdown(timeout_sec=2.0)
        if bringup is not None:
            bringup.stop()
        rclpy.try_shutdown()
        client_exec = bringup = client = node = None  # release_dds needs them gone
        release_dds()
    with open(os.path.join(out, 'summary.json'), 'w') as f:
        json.dump(summary, f, indent=1)
    print(f'[demo] summary written to {os.path.join(out, "summary.json")}', flush=True)
    return summary


def add_arguments(p):
    p.add_argument('--out', default='demo_output', help='folder for overlays and summary')
    p.add_argument('--params', default=None, help='parameters YAML (default: shipped)')
    p.add_argument('--duration', type=float, default=6.0,
                   help='seconds of segmentation before the questions')


def run(args):
    os.environ.setdefault('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')
    run_demo(args.out, duration=args.duration, params=args.params)
    return 0
