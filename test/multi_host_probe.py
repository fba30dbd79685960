"""The client side of test_multi_host.py: one process per simulated host.

Run inside a network namespace (``python multi_host_probe.py NAME``). It subscribes to the
segmentation masks and the camera's compressed images and holds an AskScene service client
and action client, then reads one JSON command per line on stdin and answers each with one
JSON line on stdout:

* ``{"cmd": "masks", "seconds": S}``: wait for the first mask, count masks for S seconds.
* ``{"cmd": "ask", "questions": [...]}``: ask each question through the service (retrying
  while the node has no frame yet, or when a reply is lost), with the latency of each.
* ``{"cmd": "action", "question": Q}``: one goal on the streaming action.
* ``{"cmd": "quit"}``.

Every entity is created before the executor starts spinning (see docs/status.md, issue 13).
"""
import json
import sys
import threading
import time

import rclpy
from rclpy.action import ActionClient
from rclpy.executors import MultiThreadedExecutor
from rclpy.qos import HistoryPolicy, QoSProfile, qos_profile_sensor_data, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image

from bluelm_ros.ros import interfaces
from bluelm_ros.ros.common import release_dds

WAIT = 60.0
SRV = interfaces.load('srv')
ACTION = interfaces.load('action')
RELIABLE = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10,
                      reliability=ReliabilityPolicy.RELIABLE)


def stamp_ns(stamp):
    return stamp.sec * 1_000_000_000 + stamp.nanosec


def wait_for(future, timeout):
    deadline = time.monotonic() + timeout
    while not future.done() and time.monotonic() < deadline:
        time.sleep(0.01)
    return future.done()


class Probe:
    def __init__(self, name):
        self.node = rclpy.create_node(f'multi_host_probe_{name}')
        self.lock = threading.Lock()
        self.masks = []  # (monotonic receive time, (height, width, encoding), stamp, age ms)
        self.jpeg_stamps = {}  # stamp ns -> format, of the compressed camera frames seen
        self.node.create_subscription(Image, '/segmentation_node/mask', self._on_mask,
                                      RELIABLE)
        self.node.create_subscription(CompressedImage, '/camera/image_raw/compressed',
                                      self._on_jpeg, qos_profile_sensor_data)
        self.client = self.node.create_client(SRV.AskScene, '/scene_qa_node/ask')
        self.action = ActionClient(self.node, ACTION.AskScene, '/scene_qa_node/ask_stream')
        self.executor = MultiThreadedExecutor(num_threads=2)
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    def _on_mask(self, msg):
        with self.lock:
            # One clock on both "hosts" here: receive time - camera stamp = frame-to-mask age.
            age_ms = (time.time_ns() - stamp_ns(msg.header.stamp)) / 1e6
            self.masks.append((time.monotonic(), (msg.height, msg.width, msg.encoding),
                               stamp_ns(msg.header.stamp), age_ms))

    def _on_jpeg(self, msg):
        with self.lock:
            self.jpeg_stamps[stamp_ns(msg.header.stamp)] = msg.format

    def count_masks(self, seconds):
        deadline = time.monotonic() + WAIT
        while not self.masks and time.monotonic() < deadline:
            time.sleep(0.02)
        if not self.masks:
            return {'masks': 0, 'rate': 0.0, 'error': f'no mask within {WAIT:.0f} s'}
        t0 = time.monotonic()
        time.sleep(seconds)
        with self.lock:
            window = [m for m in self.masks if m[0] >= t0]
            shapes = sorted({str(m[1]) for m in window})
            jpegs = len(self.jpeg_stamps)
            stamps = [m[2] for m in self.masks]
        return {'masks': len(window), 'rate': len(window) / seconds if seconds else 0.0,
                'shapes': shapes,
                'compressed_frames_seen': jpegs, 'window_stamps': [m[2] for m in window],
                'all_stamps': stamps,
                'mask_age_ms_median': (sorted(m[3] for m in window)[len(window) // 2]
                                       if window else None)}

    def ask(self, questions):
        if not self.client.wait_for_service(timeout_sec=WAIT):
            return {'error': 'no AskScene service'}
        out = []
        for question in questions:
            deadline = time.monotonic() + WAIT
            tries = 0
            while True:
                tries += 1
                t0 = time.monotonic()
                future = self.client.call_async(SRV.AskScene.Request(question=question))
                if not wait_for(future, 15.0):  # reply lost (discovery race): ask again
                    self.client.remove_pending_request(future)
                    res = None
                else:
                    res = future.result()
                latency_ms = (time.monotonic() - t0) * 1000.0
                retry = res is None or res.error_code == 'no_image'
                if not retry or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            if res is None:
                out.append({'question': question, 'error': 'no reply', 'tries': tries})
                continue
            stamp = stamp_ns(res.image_header.stamp)
            with self.lock:
                seen = stamp in self.jpeg_stamps
            out.append({'question': question, 'success': res.success, 'answer': res.answer,
                        'error_code': res.error_code, 'latency_ms': latency_ms,
                        'total_ms': res.timings.total_ms, 'frame_id': res.image_header.frame_id,
                        'stamp_ns': stamp, 'stamp_is_a_compressed_frame_seen': seen,
                        'tries': tries})
        return {'answers': out}

    def ask_action(self, question):
        if not self.action.wait_for_server(timeout_sec=WAIT):
            return {'error': 'no AskScene action server'}
        feedback = []
        t0 = time.monotonic()
        sent = self.action.send_goal_async(ACTION.AskScene.Goal(question=question),
                                           feedback_callback=feedback.append)
        if not wait_for(sent, WAIT) or not sent.result().accepted:
            return {'error': 'goal not accepted'}
        # The result only after the last token's feedback: rclpy's ActionClient drops a goal's
        # feedback callback once its result arrives, and a one-token answer's feedback can
        # come in together with the result.
        deadline = time.monotonic() + WAIT
        while (not any(f.feedback.stage == 'decoding' for f in feedback)
               and time.monotonic() < deadline):
            time.sleep(0.01)
        result = sent.result().get_result_async()
        if not wait_for(result, WAIT):
            return {'error': 'no result'}
        res = result.result().result
        return {'success': res.success, 'answer': res.answer, 'error_code': res.error_code,
                'feedback': len(feedback), 'latency_ms': (time.monotonic() - t0) * 1000.0,
                'frame_id': res.image_header.frame_id}

    def close(self):
        self.executor.shutdown(timeout_sec=5.0)
        self.thread.join(timeout=5.0)
        self.action.destroy()
        self.node.destroy_node()


def main():
    rclpy.init()
    probe = Probe(sys.argv[1])
    try:
        print(json.dumps({'ready': True}), flush=True)
        for line in sys.stdin:
            cmd = json.loads(line)
            if cmd['cmd'] == 'masks':
                reply = probe.count_masks(float(cmd['seconds']))
            elif cmd['cmd'] == 'ask':
                reply = probe.ask(cmd['questions'])
            elif cmd['cmd'] == 'action':
                reply = probe.ask_action(cmd['question'])
            else:
                break
            print(json.dumps(reply), flush=True)
    finally:
        probe.close()
        rclpy.try_shutdown()
        probe = None
        release_dds()


if __name__ == '__main__':
    main()
