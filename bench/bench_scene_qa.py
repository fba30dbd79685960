"""Scene QA node: time to first token with eager (decoupled) image encoding vs on demand.

Run: `python bench/bench_scene_qa.py` (after `source .ws/env.sh`). Prints a table, saves
bench/results/scene_qa.json and scene_qa.png.

One SceneQANode (its own MultiThreadedExecutor, as `ros2 run` gives it) and a client
node (another executor) in this process, talking over DDS. For each trial a new camera
frame (a synthetic street scene of the scene-QA generator, a different one per trial) is
published, then the same question is sent through the streaming action ``~/ask_stream``:

* **eager**: ``eager_encoding`` on; the question is sent once the node has encoded the
  frame and prefilled the prompt up to the end of the image in the background (what
  happens when a question arrives some time after the frame, the common case).
* **on demand**: ``eager_encoding`` off; the question is sent once the node has received
  the frame, so decoding the frame, tiling, the vision encoder and the image prefill are
  paid after the question arrives.

TTFT (client side) = goal sent -> first generated token received as action feedback (goal
round trip, queueing, [frame decode + encode + image prefill,] question prefill, first
token, DDS). The node's own split (queue, encode, prefill) comes from the result's
Timings. Trials alternate the two modes so load drift on the machine hits both alike.

Bundle: ``--bundle DIR``; default the shipped scene-tiny bundle, or, while it is not
installed, a random-weight bundle of the same scene-tiny architecture (identical graphs
and shapes, so identical timings; the answers are meaningless), exported once into
~/.cache/bluelm_ros/bench/.
"""
import argparse
import os
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import CACHE, machine, plot_path, save  # noqa: E402

NS = '/bench_scene_qa'
QUESTION = 'how many cars can you see?'
MODES = ('eager', 'on_demand')


def get_bundle(path):
    """Return (bundle folder, description)."""
    from bluelm_ros.runtime import shipped_models
    if path:
        return path, 'given'
    if shipped_models.VLM_BUNDLE.available():
        return shipped_models.VLM_BUNDLE.default_path, 'shipped scene-tiny (trained)'
    out = os.path.join(CACHE, 'scene-tiny-random')
    if not os.path.exists(os.path.join(out, 'manifest.json')):
        print(f'exporting a random-weight scene-tiny bundle to {out} (once)', flush=True)
        subprocess.run([sys.executable, '-m', 'bluelm_ros.tools.vlm.export', '--random',
                        'scene-tiny', out, '--vision', 'int8', '--decoder', 'int4'],
                       check=True, stdout=subprocess.DEVNULL)
    return out, 'random weights, scene-tiny architecture (shipped bundle not installed)'


def wait_until(predicate, timeout=60.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.002)
    return predicate()


class Bench:
    """The node, a client node, a camera publisher and an action client."""

    def __init__(self, bundle, threads, max_new_tokens):
        import rclpy
        from rclpy.action import ActionClient
        from rclpy.executors import MultiThreadedExecutor
        from rclpy.parameter import Parameter
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import Image

        from bluelm_ros.ros import interfaces
        from bluelm_ros.ros.scene_qa_node import SceneQANode
        self.action = interfaces.load('action')
        self.msg = interfaces.load('msg')
        self.node = SceneQANode('scene_qa_node', namespace=NS, parameter_overrides=[
            Parameter('bundle_path', value=bundle), Parameter('threads', value=threads),
            Parameter('qos.reliability', value='reliable'),
            Parameter('eager_encoding_rate', value=100.0),
            Parameter('generation.max_new_tokens', value=max_new_tokens)])
        if self.node.engine is None:
            raise SystemExit(f'scene QA node did not start: {self.node.configure_error}')
        self.client = rclpy.create_node('bench_client', namespace=NS)
        self.pub = self.client.create_publisher(
            Image, 'image', QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE))
        self.goals = ActionClient(self.client, self.action.AskScene, 'scene_qa_node/ask_stream',
                                  feedback_sub_qos_profile=QoSProfile(depth=1000))
        self.executors = []
        for node, threads_ in ((self.node, self.node.executor_threads), (self.client, 2)):
            ex = MultiThreadedExecutor(num_threads=threads_)
            ex.add_node(node)
            threading.Thread(target=ex.spin, daemon=True).start()
            self.executors.append(ex)
        assert self.goals.wait_for_server(timeout_sec=30)
        assert wait_until(lambda: self.pub.get_subscription_count() > 0)
        self.stamp = 0

    def trial(self, mode, rgb):
        from rclpy.parameter import Parameter

        from bluelm_ros.ros.image_codec import numpy_to_image
        node = self.node
        node.set_parameters([Parameter('eager_encoding', value=mode == 'eager')])
        self.stamp += 1
        msg = numpy_to_image(rgb, 'rgb8')
        msg.header.stamp.sec, msg.header.frame_id = self.stamp, 'camera'
        self.pub.publish(msg)
        if mode == 'eager':
            ok = wait_until(lambda: node.encoded_header is not None
                            and node.encoded_header.stamp.sec == self.stamp)
        else:
            ok = wait_until(lambda: node.last_frame_header is not None
                            and node.last_frame_header.stamp.sec == self.stamp)
        assert ok, f'frame {self.stamp} not received/encoded'
        assert wait_until(lambda: node.service.status().queue_depth == 0
                          and not node.service.status().running)
        first = []

        def on_feedback(fb):
            if fb.feedback.stage == 'decoding' and not first:
                first.append(time.perf_counter())
        t0 = time.perf_counter()
        sent = self.goals.send_goal_async(self.action.AskScene.Goal(question=QUESTION),
                                          feedback_callback=on_feedback)
        assert wait_until(sent.done)
        result = sent.result().get_result_async()
        assert wait_until(result.done)
        t_end = time.perf_counter()
        res = result.result().result
        assert res.success, res.error_message
        assert res.image_header.stamp.sec == self.stamp, 'answered about another frame'
        assert res.timings.image_cached == (mode == 'eager'), (mode, res.timings)
        assert wait_until(lambda: bool(first), 5.0), 'no token feedback'
        t = res.timings
        return {'mode': mode, 'ttft_ms': (first[0] - t0) * 1e3, 'total_ms': (t_end - t0) * 1e3,
                'node_queue_ms': t.queue_ms, 'node_encode_ms': t.image_encode_ms,
                'node_prefill_ms': t.prefill_ms, 'prompt_tokens': t.prompt_tokens,
                'image_tiles': t.image_tiles, 'generated_tokens': t.generated_tokens,
                'image_cached': t.image_cached}

    def close(self):
        import rclpy
        self.node.stop_workers()
        for ex in self.executors:
            ex.shutdown(timeout_sec=2.0)
        self.node.destroy_node()
        self.client.destroy_node()
        rclpy.try_shutdown()


def summarize(trials, mode):
    rows = [t for t in trials if t['mode'] == mode]
    out = {'n': len(rows)}
    for key in ('ttft_ms', 'total_ms', 'node_queue_ms', 'node_encode_ms', 'node_prefill_ms'):
        vals = [r[key] for r in rows]
        out[f'{key}_median'] = statistics.median(vals)
        out[f'{key}_p90'] = sorted(vals)[int(0.9 * (len(vals) - 1))]
    out['prompt_tokens'] = rows[0]['prompt_tokens']
    out['image_tiles_median'] = statistics.median(r['image_tiles'] for r in rows)
    return out


def plot(data, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    trials = data['trials']
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    vals = [[t['ttft_ms'] for t in trials if t['mode'] == m] for m in MODES]
    ax1.boxplot(vals)
    ax1.set_xticks([1, 2], ['eager encoding\n(frame encoded before the question)',
                            'encoding on demand'])
    ax1.set_ylabel('time to first token, client side (ms)')
    ax1.set_title('TTFT over DDS (action feedback)')
    ax1.set_ylim(bottom=0)
    s = data['summary']
    bottoms = [0.0, 0.0]
    for key, label in (('node_queue_ms', 'queue'), ('node_encode_ms', 'tiling + vision encoder'),
                       ('node_prefill_ms', 'prefill')):
        heights = [s[m][f'{key}_median'] for m in MODES]
        ax2.bar(MODES, heights, bottom=bottoms, label=label)
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    rest = [s[m]['ttft_ms_median'] - b for m, b in zip(MODES, bottoms)]
    ax2.bar(MODES, rest, bottom=bottoms,
            label='frame decode, first token, DDS, goal round trip')
    ax2.set_ylabel('median ms')
    ax2.set_title('where the TTFT goes (node Timings)')
    ax2.legend(fontsize=8)
    fig.suptitle(f'scene QA node, {data["bundle"]}; {machine()["cpus"]} CPUs', fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f'saved {path}')


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--bundle', default='', help='bundle folder (default: see above)')
    ap.add_argument('--trials', type=int, default=15, help='per mode')
    ap.add_argument('--threads', type=int, default=0, help='ORT threads (0 = all cores)')
    ap.add_argument('--max-new-tokens', type=int, default=8)
    args = ap.parse_args()
    os.environ.setdefault('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')
    import rclpy

    from bluelm_ros.data.scene_qa import SceneQAGenerator
    bundle, what = get_bundle(args.bundle)
    gen = SceneQAGenerator()
    frames = [gen.render(1000 + i).image for i in range(args.trials + 2)]
    rclpy.init()
    bench = Bench(bundle, args.threads, args.max_new_tokens)
    trials = []
    try:
        for mode in MODES:  # warm-up: first session runs, allocations
            bench.trial(mode, frames[-1])
            bench.trial(mode, frames[-2])
        for i in range(args.trials):
            order = MODES if i % 2 == 0 else MODES[::-1]
            for mode in order:
                trials.append(bench.trial(mode, frames[i]))
    finally:
        bench.close()
    summary = {m: summarize(trials, m) for m in MODES}
    summary['ttft_speedup'] = (summary['on_demand']['ttft_ms_median']
                               / summary['eager']['ttft_ms_median'])
    data = {'machine': machine(), 'load_average_1_5_15': list(os.getloadavg()),
            'bundle': what, 'bundle_path': bundle, 'question': QUESTION,
            'threads': args.threads, 'max_new_tokens': args.max_new_tokens,
            'definition': {
                'ttft_ms': 'client side: action goal sent -> first decoded token received as '
                           'feedback (DDS, in one process)',
                'eager': 'eager_encoding on; question sent after the node encoded the frame '
                         'and prefilled the prompt up to the end of the image',
                'on_demand': 'eager_encoding off; question sent after the node received the '
                             'frame (decode, tiling, vision encoder and image prefill are paid '
                             'after the question)'},
            'summary': summary, 'trials': trials}
    sizes = sorted(f.shape[1] * f.shape[0] for f in frames)
    print(f'\nscene QA node TTFT, {what}; synthetic scenes of '
          f'{sizes[0] / 1e3:.0f}-{sizes[-1] / 1e3:.0f} kpixels; question {QUESTION!r}')
    print(f'{"mode":10s} {"TTFT med":>9s} {"p90":>7s} {"total":>7s} {"queue":>6s} '
          f'{"encode":>7s} {"prefill":>8s} {"prompt tok":>10s}')
    for m in MODES:
        s = summary[m]
        print(f'{m:10s} {s["ttft_ms_median"]:9.1f} {s["ttft_ms_p90"]:7.1f} '
              f'{s["total_ms_median"]:7.1f} {s["node_queue_ms_median"]:6.1f} '
              f'{s["node_encode_ms_median"]:7.1f} {s["node_prefill_ms_median"]:8.1f} '
              f'{s["prompt_tokens"]:10d}')
    print(f'eager encoding: TTFT {summary["ttft_speedup"]:.1f}x lower (median)')
    save('scene_qa', data)
    plot(data, plot_path('scene_qa'))


if __name__ == '__main__':
    main()
