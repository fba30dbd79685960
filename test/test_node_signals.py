"""Signals to the real executables: any number of SIGINT/SIGTERM, a clean exit.

What a process manager does: `ros2 launch` without a terminal forwards a group Ctrl-C, so
each node gets SIGINT twice; systemd and `docker stop` send SIGTERM (and again). Each
executable must end with exit code 0, without a traceback, within EXIT_LIMIT seconds of
the first signal; the scene-QA node first answers every service call and action goal it
holds (queued or running), so no client waits forever. The later signals arrive while the
node is shutting down (the cleanup that used to print a KeyboardInterrupt traceback).

Clients keep every reply (KEEP_ALL), as docs/scene-qa-node.md tells users to: Fast DDS
delivers each reply of a service to every client's reader, so a default client (keep last
10) loses its own reply when a burst of others' replies arrives first, which is a client
setting, not a node fault (test_scene_qa_requests.py counts that case separately).
"""
import os
import re
import signal
import sys
import time

import pytest

rclpy = pytest.importorskip('rclpy')

from action_msgs.msg import GoalStatus  # noqa: E402
from rclpy.action import ActionClient  # noqa: E402
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402

from bluelm_ros.data.synthetic import render_scene  # noqa: E402
from bluelm_ros.ros import common, image_codec, interfaces  # noqa: E402
from bluelm_ros.ros.bringup import default_params_file  # noqa: E402
from bluelm_ros.runtime.shipped_models import VLM_BUNDLE  # noqa: E402

from ros_helpers import Inbox, NodeProcess, wait_until  # noqa: E402

WAIT = 60.0
LARGE_FRAMES_PROFILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))), 'config', 'fastdds_large_frames.xml')
EXIT_LIMIT = 2.0  # seconds from the first signal to the exit
GAP = 0.15  # seconds between signals: the later ones land in the shutdown
SEQUENCES = {
    'sigint_twice': (signal.SIGINT, signal.SIGINT),
    'sigterm_twice': (signal.SIGTERM, signal.SIGTERM),
}
RELIABLE = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10,
                      reliability=ReliabilityPolicy.RELIABLE)
KEEP_ALL = QoSProfile(history=HistoryPolicy.KEEP_ALL, reliability=ReliabilityPolicy.RELIABLE)
MSG = interfaces.load('msg')
SRV = interfaces.load('srv')
ACTION = interfaces.load('action')


def dds_segments():
    """Fast DDS shared-memory segments in /dev/shm (a process's data pools)."""
    try:
        return {f for f in os.listdir('/dev/shm') if re.fullmatch(r'fastdds_[0-9a-f]{16}', f)}
    except FileNotFoundError:
        return set()


def own_segments():
    """Segments this test process has mapped (its own probe nodes' and their peers')."""
    with open('/proc/self/maps') as f:
        return {os.path.basename(line.split()[-1]) for line in f if '/dev/shm/' in line}


def send_signals(plan):
    """Send each process its signal sequence ({process: signals}), GAP apart, all at once;
    return {process: seconds from the first signal to its exit}."""
    t0 = time.monotonic()
    times = {}

    def note_exits():
        for p in plan:
            if p not in times and p.proc.poll() is not None:
                times[p] = time.monotonic() - t0
    for step in range(max(len(seq) for seq in plan.values())):
        for p, seq in plan.items():
            if step < len(seq) and p.proc.poll() is None:
                p.proc.send_signal(seq[step])
        end = time.monotonic() + GAP
        while time.monotonic() < end:
            note_exits()
            time.sleep(0.01)
    while len(times) < len(plan) and time.monotonic() < t0 + WAIT:
        note_exits()
        time.sleep(0.01)
    return times


def assert_clean(proc, seconds):
    output = proc.assert_exited_cleanly()
    assert seconds is not None and seconds <= EXIT_LIMIT, (
        f'exit {seconds} s after the first signal (limit {EXIT_LIMIT} s)\n{output}')
    return output


# ------------------------------------------------------------------ the scene-QA node


class Clients:
    """Keep-all service and action clients on one probe node, created before spinning."""

    def __init__(self, spin, ns, services=4, actions=3):
        self.node = rclpy.create_node('signals_probe', namespace=f'/{ns}')
        self.services = [self.node.create_client(SRV.AskScene, 'scene_qa_node/ask',
                                                 qos_profile=KEEP_ALL)
                         for _ in range(services)]
        self.actions = [ActionClient(self.node, ACTION.AskScene, 'scene_qa_node/ask_stream',
                                     goal_service_qos_profile=KEEP_ALL,
                                     result_service_qos_profile=KEEP_ALL)
                        for _ in range(actions)]
        self.spinner = spin(self.node)

    def connect(self):
        assert all(c.wait_for_service(timeout_sec=WAIT) for c in self.services), 'no service'
        assert all(a.wait_for_server(timeout_sec=WAIT) for a in self.actions), 'no action'
        # A reply is dropped while the server has not yet discovered a client's reply
        # reader: one retried round trip per client (an empty question, refused at once).
        for c in self.services:
            assert _round_trip(lambda: c.call_async(SRV.AskScene.Request(question=''))), \
                'service replies never arrive'
        for a in self.actions:
            assert _round_trip(lambda: _goal_then_result(a, ACTION.AskScene.Goal())), \
                'action results never arrive'

    def close(self):
        self.spinner.stop()
        self.node.destroy_node()


def _round_trip(send, attempts=5):
    for _ in range(attempts):
        if wait_until(send().done, timeout=5):
            return True
    return False


class _Never:
    def done(self):
        return False


def _goal_then_result(client, goal, feedback=None):
    """Send a goal and, once accepted, ask for its result (as clients do); the future."""
    sent = client.send_goal_async(goal, feedback_callback=feedback)
    if not wait_until(sent.done, timeout=10):
        return _Never()
    return sent.result().get_result_async()


def _scene_qa_process(ns, bundle, tmp_path):
    # request_timeout far beyond the test: only the shutdown may answer the requests.
    return NodeProcess.scene_qa(ns, bundle, tmp_path, '-p', 'request_timeout:=600.0',
                                '-p', 'qos.reliability:=reliable')


@pytest.mark.parametrize('sequence', list(SEQUENCES), ids=list(SEQUENCES))
def test_scene_qa_node_answers_every_pending_call_and_goal_then_exits(
        spin, tiny_vlm_bundle, tmp_path, sequence):
    ns = f'signals_qa_{sequence}'
    with _scene_qa_process(ns, tiny_vlm_bundle, tmp_path) as node:
        clients = Clients(spin, ns)
        try:
            clients.connect()
            img = image_codec.numpy_to_image(render_scene(23, 120, 160).image, 'rgb8')
            first = clients.services[0].call_async(SRV.AskScene.Request(question='Ready?',
                                                                        image=img))
            assert wait_until(first.done, timeout=WAIT) and first.result().success, \
                node.output()
            # Long answers about the request image: 9 goals (3 per client) first, so the
            # worker is on a goal; then 8 calls (2 per client) queue behind them.
            opts = MSG.GenerationOptions(max_new_tokens=1900)
            decoding = Inbox()
            goals = [_goal_then_result(a, ACTION.AskScene.Goal(question=f'goal {i}', image=img,
                                                               options=opts),
                                       lambda fb: decoding(fb.feedback.stage))
                     for i in range(3) for a in clients.actions]
            calls = [c.call_async(SRV.AskScene.Request(question=f'call {i}', image=img,
                                                       options=opts))
                     for i in range(2) for c in clients.services]
            assert decoding.wait_for(lambda stage: stage == 'decoding'), 'nothing running'
            in_flight = sum(not f.done() for f in goals + calls)
            assert in_flight >= 15, 'too fast: little was in flight at the signal'
            times = send_signals({node: SEQUENCES[sequence]})
            # Replies were sent before the exit; give the probe's executor a moment.
            wait_until(lambda: all(f.done() for f in goals + calls), timeout=2.0)
        finally:
            clients.close()
    call_codes = [f.result().error_code if f.done() else 'NO REPLY' for f in calls]
    goal_outcomes = [(f.result().status, f.result().result.error_code) if f.done()
                     else 'NO RESULT' for f in goals]
    answered = sum(f.done() for f in goals + calls)
    print(f'{sequence}: exit {times.get(node)} s after the first signal; '
          f'{answered}/{len(goals) + len(calls)} pending calls and goals answered; '
          f'calls {call_codes}; goals {goal_outcomes}')
    output = assert_clean(node, times.get(node))
    assert all(code in ('', 'not_ready') for code in call_codes), (call_codes, output)
    for outcome in goal_outcomes:
        assert outcome != 'NO RESULT', (goal_outcomes, output)
        status, code = outcome
        assert (status, code) in ((GoalStatus.STATUS_ABORTED, 'not_ready'),
                                  (GoalStatus.STATUS_SUCCEEDED, '')), (goal_outcomes, output)
    assert 'cannot set the goal state' not in output, output


# ------------------------------------------------------------------ the other executables


def _bringup_params(tmp_path, bundle):
    """The shipped config; bundle_path to the test bundle when none is shipped."""
    path = default_params_file()
    if VLM_BUNDLE.available():
        return path
    text = open(path).read().replace('bundle_path: ""', f'bundle_path: "{bundle}"', 1)
    out = tmp_path / 'bluelm_ros.yaml'
    out.write_text(text)
    return str(out)


def test_segmentation_camera_and_bringup_exit_cleanly_while_working(
        spin, tiny_vlm_bundle, tmp_path):
    """All three at once: a camera feeding a segmentation node, and a whole bringup.

    They also leave no Fast DDS shared-memory segment behind (``exit_process`` skips the
    interpreter's teardown: the DDS participant must be destroyed before it).
    """
    ns = 'signals_others'
    before = dds_segments()
    camera = NodeProcess.node('bluelm_ros.ros.camera_source_node', tmp_path / 'camera.log',
                              tmp_path, '-r', f'__ns:=/{ns}', '-p', 'rate:=20.0',
                              '-p', 'width:=320', '-p', 'height:=240', '-p', 'reliable:=true')
    # the shipped large-frame profile: its 128 MiB segments are what a leak would leave
    profile = {common.fastdds_profiles_variable(): LARGE_FRAMES_PROFILE,
               'RMW_FASTRTPS_USE_QOS_FROM_XML': '1'}
    seg = NodeProcess.node('bluelm_ros.ros.segmentation_node', tmp_path / 'seg.log', tmp_path,
                           '-r', f'__ns:=/{ns}', '-p', 'qos.reliability:=reliable',
                           env=profile)
    bringup = NodeProcess([sys.executable, '-c', 'from bluelm_ros.ros.bringup import main; '
                           'main()', '--params', _bringup_params(tmp_path, tiny_vlm_bundle),
                           '--namespace', f'/{ns}_bringup', '--camera-source', 'synthetic'],
                          tmp_path / 'bringup.log', tmp_path)
    # each its own sequence: SIGINT twice, SIGTERM twice, and both mixed
    plan = {'segmentation_node': (seg, (signal.SIGINT, signal.SIGINT)),
            'camera_source_node': (camera, (signal.SIGTERM, signal.SIGTERM)),
            'bringup': (bringup, (signal.SIGINT, signal.SIGTERM, signal.SIGINT))}
    with camera, seg, bringup:
        probe = rclpy.create_node('signals_probe', namespace=f'/{ns}')
        masks, bringup_masks = Inbox(), Inbox()
        probe.create_subscription(Image, 'segmentation_node/mask', masks, RELIABLE)
        probe.create_subscription(Image, f'/{ns}_bringup/segmentation_node/mask',
                                  bringup_masks, RELIABLE)
        spinner = spin(probe)
        try:
            assert masks.wait_for(timeout=WAIT * 2), f'no masks: {seg.output()}'
            assert bringup_masks.wait_for(timeout=WAIT * 2), \
                f'no masks from bringup: {bringup.output()}'
            times = send_signals({p: seq for p, seq in plan.values()})
        finally:
            spinner.stop()
            probe.destroy_node()
    print({name: times.get(p) for name, (p, _) in plan.items()})
    for p, _ in plan.values():
        assert_clean(p, times.get(p))
    left = dds_segments() - before - own_segments()
    assert not left, f'shared-memory segments left in /dev/shm by the exited nodes: {left}'
