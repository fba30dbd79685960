"""Segmentation node cost on top of the bare runtime, at 640x480, camera in another process.

Run: `python bench/bench_seg_node.py` (after `source .ws/env.sh`). Prints a table, saves
bench/results/seg_node.json and seg_node.png.

This process runs the SegmentationNode as `ros2 run` does (one executor thread + the
node's worker); a child process is the camera: it publishes 640x480 rgb8 frames and records
when each mask comes back. CLOCK_MONOTONIC is system-wide, so times from both processes
line up, and the node's per-frame model time is known exactly (node.frame_log).

* overhead = (mask received by the camera process - frame published) - model time
  (session.run only), per frame, with the camera slower than the model (no queueing);
  split into transport in, node work (decode + preprocess + postprocess + publish), and
  transport out.
  Columns: in = frame published -> node callback; node = callback -> mask published,
  minus model; pre = the runtime's own resize/normalize/argmax (part of node); own = the
  node's own work (mailbox wake-up, decode, mask message, publish); out = mask published ->
  received; to pub = the issue's definition, (mask published - frame published) - model.
  busy = share of wall time the worker spent inside Segmenter.segment during the
  throughput phase (insensitive to other load on the machine, unlike bare-vs-node fps).
* output rate: camera faster than the model, masks per second vs. the bare runtime's
  frames per second (`Segmenter.segment` back to back in this process).

The input subscription is set to reliable: with Fast DDS defaults, best-effort frames
over 512 KB are not delivered between processes (see docs/segmentation-node.md). Each
model runs under two DDS set-ups: Fast DDS defaults (a 921 KB frame exceeds the 512 KB
shared-memory segment and goes over UDP loopback in fragments) and a profile with a 16 MB
shared-memory segment (the fix the docs recommend); each set-up is its own process pair,
since Fast DDS reads its profile once per process.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, plot_path, save  # noqa: E402

NS = '/bench_seg'
H, W = 480, 640
MODELS = {'int8': '', 'fp32': 'dsnet/dsnet_tiny_synthetic_480x640_fp32.onnx'}
DDS_SETUPS = ('default', 'large_shm')
LARGE_SHM_PROFILE = '''<?xml version="1.0" encoding="UTF-8"?>
<dds xmlns="http://www.eprosima.com">
  <profiles>
    <transport_descriptors>
      <transport_descriptor>
        <transport_id>shm_16mb</transport_id>
        <type>SHM</type>
        <segment_size>16777216</segment_size>
      </transport_descriptor>
      <transport_descriptor>
        <transport_id>udp</transport_id>
        <type>UDPv4</type>
      </transport_descriptor>
    </transport_descriptors>
    <participant profile_name="large_shm" is_default_profile="true">
      <rtps>
        <userTransports>
          <transport_id>shm_16mb</transport_id>
          <transport_id>udp</transport_id>
        </userTransports>
        <useBuiltinTransports>false</useBuiltinTransports>
      </rtps>
    </participant>
  </profiles>
</dds>
'''


# ------------------------------------------------------------------ camera (child process)

def camera(args):
    """Publish frames, record publish/receive times, print JSON on stdout."""
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image

    from bluelm_ros.ros.image_codec import numpy_to_image
    from bluelm_ros.data.synthetic import render_scene

    rclpy.init()
    node = rclpy.create_node('bench_camera', namespace=args.ns)
    qos = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE)
    received = {}
    cond = threading.Condition()

    def on_mask(msg):
        t = time.monotonic()
        with cond:
            received[msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec] = t
            cond.notify_all()

    node.create_subscription(Image, 'seg/mask', on_mask, qos)
    pub = node.create_publisher(Image, 'image', qos)
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    frames = [numpy_to_image(render_scene(s, H, W).image, 'rgb8') for s in range(8)]
    deadline = time.monotonic() + 60
    while pub.get_subscription_count() == 0 or node.count_publishers(f'{args.ns}/seg/mask') == 0:
        if time.monotonic() > deadline:
            raise SystemExit('camera: the node never showed up')
        time.sleep(0.05)
    time.sleep(1.0)  # let both directions finish matching
    published = {}
    next_ns = [1]

    def publish(i):
        msg = frames[i % len(frames)]
        stamp = next_ns[0]
        next_ns[0] += 1
        msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp, 10**9)
        published[stamp] = time.monotonic()
        pub.publish(msg)
        return stamp

    # Latency: one frame at a time, the next only after the mask is back (+ a pause), so
    # nothing waits in the slot and each frame meets an idle worker.
    latency_stamps = []
    for i in range(args.warmup + args.frames):
        stamp = publish(i)
        with cond:
            cond.wait_for(lambda: stamp in received, timeout=30)
        if stamp not in received:
            raise SystemExit(f'camera: no mask for frame {i}')
        if i >= args.warmup:
            latency_stamps.append(stamp)
        time.sleep(args.pause)
    # Throughput: camera faster than the model for a while.
    t0 = time.monotonic()
    flood_stamps = []
    i = 0
    while time.monotonic() - t0 < args.seconds:
        flood_stamps.append(publish(i))
        i += 1
        time.sleep(max(0.0, t0 + i / args.camera_hz - time.monotonic()))
    time.sleep(2.0)  # the last frames come back
    out = {
        'latency': [(s, published[s], received[s]) for s in latency_stamps],
        'flood': {'first': flood_stamps[0], 'last': flood_stamps[-1], 't0': t0,
                  't1': published[flood_stamps[-1]], 'sent': len(flood_stamps),
                  'received': [(s, received[s]) for s in flood_stamps if s in received]},
    }
    executor.shutdown(timeout_sec=2.0)
    spinner.join(2.0)
    node.destroy_node()
    rclpy.try_shutdown()
    print('BENCH_JSON ' + json.dumps(out), flush=True)


# ------------------------------------------------------------------ node + analysis (parent)

def bare_runtime(model_path, seconds):
    """Segmenter.segment back to back on 640x480 frames: per-frame ms and frames/s."""
    from bluelm_ros.runtime import shipped_models
    from bluelm_ros.runtime.segmenter import Segmenter
    from bluelm_ros.data.synthetic import render_scene

    seg = Segmenter(shipped_models.resolve(model_path, shipped_models.DSNET), threads=0)
    frames = [render_scene(s, H, W).image for s in range(8)]
    for f in frames[:3]:
        seg.segment(f)
    model_ms, total_ms = [], []
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        r = seg.segment(frames[len(model_ms) % len(frames)])
        model_ms.append(r.model_ms)
        total_ms.append(r.total_ms)
    rate = len(model_ms) / (time.monotonic() - t0)
    return {'model_ms_median': statistics.median(model_ms),
            'segment_ms_median': statistics.median(total_ms), 'fps': rate, 'n': len(model_ms)}


def run_model(name, args):
    import rclpy  # noqa: F401 (initialized by main)
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.parameter import Parameter

    from bluelm_ros.ros.segmentation_node import SegmentationNode

    bare = bare_runtime(MODELS[name], args.bare_seconds)
    camera_hz = args.camera_hz or max(30.0, 2.0 * bare['fps'])
    ns = f'{NS}_{name}'  # a fresh node name per model (rosout keeps one per name)
    node = SegmentationNode('seg', namespace=ns, parameter_overrides=[
        Parameter('model_path', value=MODELS[name]),
        Parameter('qos.reliability', value='reliable')])
    executor = SingleThreadedExecutor()  # what run_node() uses
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    cmd = [sys.executable, os.path.abspath(__file__), '--camera', '--ns', ns,
           '--frames', str(args.frames), '--warmup', str(args.warmup),
           '--pause', str(args.pause), '--seconds', str(args.seconds),
           '--camera-hz', str(camera_hz)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    finally:
        executor.shutdown(timeout_sec=2.0)
        spinner.join(2.0)
        node.destroy_node()
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith('BENCH_JSON ')]
    if proc.returncode or not lines:
        raise SystemExit(f'camera process failed:\n{proc.stdout}\n{proc.stderr}')
    cam = json.loads(lines[-1][len('BENCH_JSON '):])
    log = {entry[0]: entry for entry in node.frame_log}
    # Bare rate again: other load on the machine drifts; average before and after.
    bare_after = bare_runtime(MODELS[name], args.bare_seconds)
    bare['fps_before'], bare['fps_after'] = bare['fps'], bare_after['fps']
    bare['fps'] = (bare['fps'] + bare_after['fps']) / 2

    overhead, to_publish, t_in, t_node, t_out, e2e, model = [], [], [], [], [], [], []
    pre_post, own = [], []
    for stamp, t_pub, t_recv in cam['latency']:
        _, n_recv, n_pub, model_ms, segment_ms = log[stamp]
        pre_post.append(segment_ms - model_ms)  # the runtime's resize/normalize/argmax
        own.append((n_pub - n_recv) * 1e3 - segment_ms)  # mailbox, decode, mask msg, publish
        e2e.append((t_recv - t_pub) * 1e3)
        model.append(model_ms)
        overhead.append(e2e[-1] - model_ms)
        to_publish.append((n_pub - t_pub) * 1e3 - model_ms)
        t_in.append((n_recv - t_pub) * 1e3)
        t_node.append((n_pub - n_recv) * 1e3 - model_ms)
        t_out.append((t_recv - n_pub) * 1e3)
    flood = cam['flood']
    got = [t for s, t in flood['received']]
    # Masks per second while the camera outpaced the model (first to last mask back).
    out_rate = (len(got) - 1) / (max(got) - min(got)) if len(got) > 1 else 0.0
    # Load-independent view of the same thing: the share of wall time the worker spent
    # inside Segmenter.segment while frames were waiting (1.0 = the node adds nothing).
    busy = sorted((e[2], e[4]) for s, e in log.items() if flood['first'] <= s <= flood['last'])
    busy_fraction = (sum(ms for _, ms in busy[1:]) / 1e3 / (busy[-1][0] - busy[0][0])
                     if len(busy) > 2 else float('nan'))
    med = statistics.median
    return {
        'model': name, 'dds': args.dds, 'input': f'{W}x{H} rgb8',
        'bare_runtime': bare,
        'latency_frames': len(overhead),
        'overhead_ms_median': med(overhead),
        'overhead_ms_p90': float(np.percentile(overhead, 90)),
        'overhead_to_mask_publish_ms_median': med(to_publish),
        'overhead_ms': overhead,
        'breakdown_ms_median': {'transport_in': med(t_in), 'node_work': med(t_node),
                                'runtime_pre_post': med(pre_post), 'node_own': med(own),
                                'transport_out': med(t_out)},
        'end_to_end_ms_median': med(e2e),
        'model_ms_median_in_node': med(model),
        'camera_hz': flood['sent'] / (flood['t1'] - flood['t0']),
        'frames_sent': flood['sent'], 'masks_received': len(got),
        'output_fps': out_rate,
        'output_vs_bare': out_rate / bare['fps'],
        'worker_in_runtime_fraction': busy_fraction,
        'node_stats': node.stats,
    }


def run_setup(args):
    """All models under one DDS set-up, in this process; return the result list."""
    profile = None
    from bluelm_ros.ros.common import fastdds_profiles_variable
    variable = fastdds_profiles_variable()  # Humble/Jazzy: FASTRTPS_..., Kilted: FASTDDS_...
    if args.dds == 'large_shm' and variable not in os.environ:
        import tempfile
        fd, profile = tempfile.mkstemp(suffix='.xml', prefix='bench_seg_dds_')
        with os.fdopen(fd, 'w') as f:
            f.write(LARGE_SHM_PROFILE)
        os.environ[variable] = profile  # the camera inherits it
    import rclpy
    rclpy.init()
    try:
        return [run_model(name, args) for name in args.models]
    finally:
        rclpy.try_shutdown()
        if profile:
            os.remove(profile)


def report(results):
    print(f'{"model":5} {"dds":9} {"model":>6} {"overhead":>8} {"p90":>6} {"to pub":>6} '
          f'{"in":>6} {"node":>5} {"pre":>5} {"own":>5} {"out":>5} {"bare":>6} {"node":>6} '
          f'{"ratio":>6} {"busy":>5}')
    print(f'{"":15} {"ms":>6} {"ms":>8} {"ms":>6} {"ms":>6} {"ms":>6} {"ms":>5} {"ms":>5} '
          f'{"ms":>5} {"ms":>5} {"fps":>6} {"fps":>6}')
    for r in results:
        b = r['breakdown_ms_median']
        print(f'{r["model"]:5} {r["dds"]:9} {r["model_ms_median_in_node"]:6.1f} '
              f'{r["overhead_ms_median"]:8.2f} {r["overhead_ms_p90"]:6.2f} '
              f'{r["overhead_to_mask_publish_ms_median"]:6.2f} '
              f'{b["transport_in"]:6.2f} {b["node_work"]:5.2f} {b["runtime_pre_post"]:5.2f} '
              f'{b["node_own"]:5.2f} {b["transport_out"]:5.2f} '
              f'{r["bare_runtime"]["fps"]:6.2f} {r["output_fps"]:6.2f} '
              f'{100 * r["output_vs_bare"]:5.1f}% {100 * r["worker_in_runtime_fraction"]:4.1f}%')


def plot(results, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    labels = [f'{r["model"]}\n{r["dds"]}' for r in results]
    ax1.boxplot([r['overhead_ms'] for r in results], showfliers=True)
    ax1.set_xticks(range(1, len(results) + 1), labels)
    ax1.axhline(5.0, color='r', ls='--', lw=1, label='target 5 ms')
    ax1.set_ylim(bottom=0)
    ax1.set_ylabel('ms')
    ax1.set_title(f'node overhead per frame at {W}x{H}\n(mask back - frame sent - model)')
    ax1.legend()
    x = np.arange(len(results))
    ax2.bar(x - 0.2, [r['bare_runtime']['fps'] for r in results], 0.4, label='bare runtime')
    ax2.bar(x + 0.2, [r['output_fps'] for r in results], 0.4, label='node output')
    for i, r in enumerate(results):
        ax2.text(i + 0.2, r['output_fps'], f'{100 * r["output_vs_bare"]:.0f}%\n'
                 f'busy {100 * r["worker_in_runtime_fraction"]:.0f}%',
                 ha='center', va='bottom', fontsize=8)
    top = max(max(r['output_fps'], r['bare_runtime']['fps']) for r in results)
    ax2.set_ylim(0, top * 1.25)
    ax2.set_xticks(x, [f'{lb}\ncamera {r["camera_hz"]:.0f} Hz'
                       for lb, r in zip(labels, results)])
    ax2.set_ylabel('frames / s')
    ax2.set_title('output rate, camera faster than the model')
    ax2.legend(loc='lower right')
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f'saved {path}')


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--models', nargs='+', default=['int8', 'fp32'], choices=list(MODELS))
    ap.add_argument('--dds', default='both', choices=DDS_SETUPS + ('both',))
    ap.add_argument('--frames', type=int, default=40, help='latency frames per model')
    ap.add_argument('--warmup', type=int, default=5)
    ap.add_argument('--pause', type=float, default=0.05, help='s between latency frames')
    ap.add_argument('--seconds', type=float, default=10.0, help='throughput phase length')
    ap.add_argument('--bare-seconds', type=float, default=5.0)
    ap.add_argument('--camera-hz', type=float, default=0.0,
                    help='camera rate in the throughput phase (0: max(30, 2x bare fps))')
    ap.add_argument('--camera', action='store_true', help=argparse.SUPPRESS)
    ap.add_argument('--json-out', help=argparse.SUPPRESS)
    ap.add_argument('--ns', default=NS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.camera:
        return camera(args)
    # Own DDS domain on localhost (inherited by the camera process): no other participants.
    os.environ.setdefault('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')
    os.environ.setdefault('ROS_DOMAIN_ID', str(1 + os.getpid() % 100))
    if args.dds != 'both':
        results = run_setup(args)
        if args.json_out:
            with open(args.json_out, 'w') as f:
                json.dump(results, f)
            return
    else:
        import tempfile
        results = []
        for dds in DDS_SETUPS:  # one process per set-up: Fast DDS reads XML once
            with tempfile.NamedTemporaryFile(suffix='.json') as out:
                cmd = [a for a in sys.argv if a != '--dds']
                subprocess.run([sys.executable, *cmd, '--dds', dds, '--json-out', out.name],
                               check=True)
                results += json.load(open(out.name))
    report(results)
    load = os.getloadavg()
    save('seg_node', {'machine': machine(), 'load_average_1_5_15': load,
                      'definition': {
                          'overhead_ms': '(mask received by the camera process - frame '
                                         'published) - model time (session.run)',
                          'overhead_to_mask_publish_ms': '(mask published by the node - '
                                                         'frame published) - model time',
                          'setup': 'camera in another process, reliable QoS, '
                                   'SingleThreadedExecutor + worker, ORT threads=0'},
                      'results': results})
    plot(results, plot_path('seg_node'))
    if load[0] > (os.cpu_count() or 1):
        print(f'note: load average {load[0]:.1f} on {os.cpu_count()} CPUs: other work '
              'competed for the cores; rerun on an idle machine for clean numbers')


if __name__ == '__main__':
    main()
