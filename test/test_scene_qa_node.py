"""Scene QA node end to end: real rclpy, real DDS, a real (random-weight) VLM bundle.

Most tests run on a tiny random-weight bundle built once per session from
configs/tiny-test.json (conftest.tiny_vlm_bundle): the answers are gibberish, but the
image transport, tiling, encoding, prefill, decoding, queueing, cancellation and errors
are all real. To hold requests in flight for long enough (cancel, 20 concurrent
clients, deactivate), some tests slow the engine down per generated token (SlowEngine).
Queueing, deadlines, eager encoding and frame choice are tested without ROS on the
service itself (test_scene_qa_service.py); here the node's interfaces around it.

The last tests need the trained model that ships at bluelm_ros/models/vlm/scene-tiny/:
they check that the node gives the *right* answer about a published synthetic frame via
service, action and topic, and skip (saying so) while that bundle is not installed.

Every test gets its own namespace. Waits are generous (2 shared cores); nothing here
asserts a duration: bench/bench_scene_qa.py measures performance.
"""
import os
import shutil
import signal
import time

import cv2
import pytest

rclpy = pytest.importorskip('rclpy')

from action_msgs.msg import GoalStatus  # noqa: E402
from action_msgs.srv import CancelGoal  # noqa: E402
from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from lifecycle_msgs.srv import GetState  # noqa: E402
from rclpy.action import ActionClient  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy  # noqa: E402
from sensor_msgs.msg import CompressedImage, Image  # noqa: E402
from std_msgs.msg import String  # noqa: E402

from bluelm_ros.ros import image_codec, interfaces  # noqa: E402
from bluelm_ros.ros import common  # noqa: E402
from bluelm_ros.ros.scene_qa_node import SceneQANode  # noqa: E402
from bluelm_ros.runtime.shipped_models import VLM_BUNDLE  # noqa: E402
from bluelm_ros.data.synthetic import render_scene  # noqa: E402

from engine_helpers import SlowEngine  # noqa: E402
from ros_helpers import Inbox, NodeProcess, wait_until  # noqa: E402

WAIT = 30.0  # seconds to wait for anything that should happen
RELIABLE = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10,
                      reliability=ReliabilityPolicy.RELIABLE)
ANSWERS_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=200,
                         reliability=ReliabilityPolicy.RELIABLE)
MSG = interfaces.load('msg')
SRV = interfaces.load('srv')
ACTION = interfaces.load('action')
SHIPPED_MISSING = ('the shipped VLM bundle bluelm_ros/models/vlm/scene-tiny/ is not installed '
                   'yet (it lands with the trained model; re-run scripts/setup.sh then)')


def stamp_of(header):
    return (header.stamp.sec, header.stamp.nanosec)


def frame(seed=1, h=120, w=160):
    return render_scene(seed, h, w).image


def options(**kw):
    return MSG.GenerationOptions(**kw)


class Rig:
    """A SceneQANode in namespace /<ns> and a probe node (its own executor) talking to it.

    Every entity of the probe is created here, before any executor spins the probe: rclpy
    registers an ActionClient with its node before the client is fully built, so creating
    one while an executor spins that node can fail ('ActionClient' object has no attribute
    '_lock'). Tests that need more clients ask for them here (``clients``,
    ``action_clients``).
    """

    def __init__(self, node, probe, clients=1, action_clients=1):
        self.node, self.probe = node, probe
        self.name = node.get_name()
        self.clients = [probe.create_client(SRV.AskScene, f'{self.name}/ask')
                        for _ in range(clients)]
        self.action_clients = [self.make_action_client() for _ in range(action_clients)]
        self.client, self.action_client = self.clients[0], self.action_clients[0]
        self.answers = Inbox()
        probe.create_subscription(MSG.SceneAnswer, f'{self.name}/answer', self.answers,
                                  ANSWERS_QOS)
        self.diagnostics = Inbox()
        probe.create_subscription(DiagnosticArray, '/diagnostics', self.diagnostics, 10)
        self.question_pub = probe.create_publisher(String, f'{self.name}/question', RELIABLE)
        self.image_pub = probe.create_publisher(Image, 'image', RELIABLE)
        self.compressed_pub = probe.create_publisher(CompressedImage, 'image/compressed',
                                                     RELIABLE)
        self.context_pub = probe.create_publisher(MSG.ClassStats, 'scene_context', RELIABLE)

    def make_action_client(self, node=None):
        # streaming clients want every delta: a deep feedback history (as the server's)
        return ActionClient(node or self.probe, ACTION.AskScene, f'{self.name}/ask_stream',
                            feedback_sub_qos_profile=QoSProfile(depth=1000))

    def wait_connected(self):
        assert all(c.wait_for_service(timeout_sec=WAIT) for c in self.clients)
        assert all(c.wait_for_server(timeout_sec=WAIT) for c in self.action_clients)
        assert wait_until(lambda: self.node._answer_pub.get_subscription_count() > 0)
        assert wait_until(lambda: self.question_pub.get_subscription_count() > 0)
        # wait_for_service only sees the request channel matched; until the server has also
        # discovered a client's response reader, Fast DDS drops the reply. A round trip per
        # client (an empty question: refused at once, retried if its reply is lost) makes
        # sure both directions work before a test counts on them.
        for client in self.clients:
            assert self.round_trip(lambda: client.call_async(
                SRV.AskScene.Request(question=''))), 'service replies never arrive'
        for client in self.action_clients:
            assert self.round_trip(lambda: self.goal_result(client)), 'no action result'
        assert wait_until(lambda: len(self.answers.matching(lambda m: m.question == ''))
                          >= len(self.clients) + len(self.action_clients))

    @staticmethod
    def round_trip(send, attempts=5):
        """Send until one reply arrives (5 s each); True if one did."""
        for _ in range(attempts):
            if wait_until(send().done, timeout=5):
                return True
        return False

    @staticmethod
    def goal_result(client):
        """The result future of an (empty, refused) goal; a never-done one if lost."""
        sent = client.send_goal_async(ACTION.AskScene.Goal(question=''))
        if not wait_until(sent.done, timeout=5):
            return sent
        return sent.result().get_result_async()

    @property
    def service(self):
        return self.node.service

    def publish_frame(self, rgb, sec, frame_id='camera', encoding='rgb8', wait_encoded=None):
        """Publish until the node has it (best effort may drop one); optionally wait until
        eager encoding has encoded it."""
        assert wait_until(lambda: self.image_pub.get_subscription_count() > 0)
        arr = rgb[:, :, ::-1].copy() if encoding == 'bgr8' else rgb
        msg = image_codec.numpy_to_image(arr, encoding)
        msg.header.stamp.sec, msg.header.frame_id = sec, frame_id
        for _ in range(3):
            self.image_pub.publish(msg)
            if wait_until(lambda: (self.node.last_frame_header is not None and stamp_of(
                    self.node.last_frame_header) == (sec, 0)), timeout=WAIT / 3):
                break
        else:
            raise AssertionError(f'the node never received frame {sec}')
        eager = self.node.get_parameter('eager_encoding').value
        if wait_encoded if wait_encoded is not None else eager:
            assert wait_until(lambda: self.node.encoded_header is not None and stamp_of(
                self.node.encoded_header) == (sec, 0)), f'frame {sec} never encoded'
        return msg.header

    def ask_async(self, question, image=None, compressed=None, opts=None, client=None):
        req = SRV.AskScene.Request(question=question)
        if image is not None:
            req.image = image
        if compressed is not None:
            req.compressed_image = compressed
        if opts is not None:
            req.options = opts
        return (client or self.client).call_async(req)

    def ask(self, question, **kw):
        future = self.ask_async(question, **kw)
        assert wait_until(future.done, timeout=WAIT * 2), f'no answer to {question!r}'
        return future.result()

    def send_goal(self, question, opts=None, client=None):
        """Send a goal; return (goal handle, feedback list)."""
        feedback = []
        goal = ACTION.AskScene.Goal(question=question)
        if opts is not None:
            goal.options = opts
        sent = (client or self.action_client).send_goal_async(
            goal, feedback_callback=lambda fb: feedback.append(fb.feedback))
        assert wait_until(sent.done), 'goal not acknowledged'
        handle = sent.result()
        assert handle.accepted
        return handle, feedback

    @staticmethod
    def result(handle, timeout=WAIT * 2):
        future = handle.get_result_async()
        assert wait_until(future.done, timeout=timeout), 'no action result'
        res = future.result()
        return res.status, res.result

    def slow(self, delay):
        self.service.engine = SlowEngine(self.service.engine, delay)

    def fast(self):
        self.service.engine = self.service.engine._engine


@pytest.fixture
def rig(spin, tiny_vlm_bundle):
    """Factory: rig(ns, **params) -> Rig with the node active (autostart) and spinning."""
    made = []

    def make(ns, bundle=None, clients=1, action_clients=1, **params):
        params.setdefault('bundle_path', bundle or tiny_vlm_bundle)
        params.setdefault('threads', 1)
        overrides = [Parameter(k, value=v) for k, v in params.items()]
        node = SceneQANode('scene_qa', namespace=f'/{ns}', parameter_overrides=overrides)
        probe = rclpy.create_node('scene_qa_probe', namespace=f'/{ns}')
        rig = Rig(node, probe, clients, action_clients)  # every entity before spinning
        made.append((node, probe, spin(node, num_threads=node.executor_threads),
                     spin(probe)))
        assert common.lifecycle_state(node) == 'active', node.configure_error
        rig.wait_connected()
        return rig

    yield make
    for node, probe, node_spin, probe_spin in made:
        node.stop_workers()  # answers anything still waiting, so executor threads return
        node_spin.stop()
        probe_spin.stop()
        node.destroy_node()
        probe.destroy_node()


def test_service_answers_about_the_latest_frame_and_echoes_its_stamp(rig):
    r = rig('svc')
    header = r.publish_frame(frame(1), 101, frame_id='cam_front')
    res = r.ask('What is in front of the car?')
    assert res.success, res.error_message
    assert res.answer and res.error_code == ''
    assert stamp_of(res.image_header) == (101, 0) and res.image_header.frame_id == 'cam_front'
    t = res.timings
    assert t.generated_tokens > 0 and t.prompt_tokens > 0 and t.image_tiles >= 1
    assert t.total_ms >= t.queue_ms >= 0
    # Eager encoding had encoded the frame before the question: only the text was paid for.
    assert t.image_cached and t.image_encode_ms == 0.0
    # The same answer went out on ~/answer.
    pub = r.answers.wait_for(lambda m: m.question == 'What is in front of the car?')
    assert pub is not None and pub.success and pub.answer == res.answer
    assert stamp_of(pub.header) == stamp_of(header)
    # A newer frame, once encoded, is the one the next question is about (bgr8 camera).
    r.publish_frame(frame(2), 102, encoding='bgr8')
    res = r.ask('And now?')
    assert res.success and stamp_of(res.image_header) == (102, 0)
    assert r.service.counters['eager_encodings'] >= 2


def test_without_eager_encoding_the_newest_frame_is_encoded_on_demand(rig):
    r = rig('on_demand', eager_encoding=False)
    r.publish_frame(frame(3), 201)
    res = r.ask('What color is the car?')
    assert res.success and stamp_of(res.image_header) == (201, 0)
    assert not res.timings.image_cached and res.timings.image_encode_ms > 0
    r.publish_frame(frame(4), 202)
    res = r.ask('What color is the car?')
    assert res.success and stamp_of(res.image_header) == (202, 0)
    assert not res.timings.image_cached
    # Asked again about the same frame: the encoding is cached now.
    res = r.ask('Is there a bus?')
    assert res.success and stamp_of(res.image_header) == (202, 0) and res.timings.image_cached
    assert r.service.counters['eager_encodings'] == 0


def test_request_image_overrides_the_latest_frame(rig):
    r = rig('req_image')
    r.publish_frame(frame(5), 301)
    img = image_codec.numpy_to_image(frame(6, 90, 200), 'rgb8')
    img.header.stamp.sec, img.header.frame_id = 777, 'request_cam'
    res = r.ask('What is this?', image=img)
    assert res.success, res.error_message
    assert stamp_of(res.image_header) == (777, 0)
    assert res.image_header.frame_id == 'request_cam'
    assert not res.timings.image_cached
    res = r.ask('What is this, again?', image=img)  # same pixels: the encoding is reused
    assert res.success and res.timings.image_cached
    jpeg = image_codec.encode_compressed(frame(7), 'jpeg')
    jpeg.header.stamp.sec = 778
    res = r.ask('And this one?', compressed=jpeg)
    assert res.success and stamp_of(res.image_header) == (778, 0)
    # The camera frame is still used when the request has no image.
    res = r.ask('And the camera?')
    assert res.success and stamp_of(res.image_header) == (301, 0)


def test_action_streams_feedback_and_returns_the_answer(rig):
    r = rig('action')
    r.publish_frame(frame(8), 401)
    r.slow(0.01)
    handle, feedback = r.send_goal('Describe the scene.', options(max_new_tokens=12))
    status, res = r.result(handle)
    assert status == GoalStatus.STATUS_SUCCEEDED, res.error_message
    assert res.success and res.answer
    assert stamp_of(res.image_header) == (401, 0)
    assert wait_until(lambda: any(f.stage == 'decoding' for f in feedback))
    stages = [f.stage for f in feedback]
    assert stages[0] == 'queued'
    assert 'prefill' in stages and stages.index('prefill') < stages.index('decoding')
    # Feedback and result travel on different channels: the last deltas may land after
    # the result.
    assert wait_until(lambda: ''.join(f.new_text for f in feedback
                                      if f.stage == 'decoding').strip() == res.answer)
    decoding = [f for f in feedback if f.stage == 'decoding']
    # Every delta arrives, in order, and adds up to the answer.
    assert ''.join(f.new_text for f in decoding) == decoding[-1].partial_answer
    assert decoding[-1].partial_answer.strip() == res.answer
    assert [f.generated_tokens for f in decoding] == sorted(f.generated_tokens for f in decoding)
    assert res.timings.generated_tokens <= 12


def test_action_cancel_mid_generation_returns_the_partial_answer(rig):
    r = rig('cancel')
    r.publish_frame(frame(9), 501)
    r.slow(0.05)
    handle, feedback = r.send_goal('Tell me everything.', options(max_new_tokens=400))
    assert wait_until(lambda: sum(f.stage == 'decoding' for f in feedback) >= 3)
    cancel = handle.cancel_goal_async()
    assert wait_until(cancel.done)
    assert cancel.result().return_code == CancelGoal.Response.ERROR_NONE
    status, res = r.result(handle)
    assert status == GoalStatus.STATUS_CANCELED
    assert not res.success and res.error_code == 'cancelled'
    assert res.answer and 3 <= res.timings.generated_tokens < 400
    assert stamp_of(res.image_header) == (501, 0)
    # The node goes on answering.
    r.fast()
    assert r.ask('Still there?').success


def test_cancel_of_a_queued_goal_is_immediate_and_cancel_after_completion_is_refused(rig):
    r = rig('cancel_queued')
    r.publish_frame(frame(10), 601)
    r.slow(0.05)
    running, running_fb = r.send_goal('Long answer.', options(max_new_tokens=400))
    assert wait_until(lambda: any(f.stage == 'decoding' for f in running_fb))
    queued, queued_fb = r.send_goal('Waiting in line.')
    assert wait_until(lambda: r.service.status().queue_depth == 1 and len(queued_fb) > 0)
    assert queued_fb[0].stage == 'queued' and queued_fb[0].queue_position == 0
    assert wait_until(queued.cancel_goal_async().done)
    status, res = r.result(queued, timeout=WAIT)
    assert status == GoalStatus.STATUS_CANCELED and res.error_code == 'cancelled'
    assert res.answer == '' and 'before it started' in res.error_message
    assert r.service.status().running  # the first one is still being answered
    assert wait_until(running.cancel_goal_async().done)
    assert r.result(running)[1].error_code == 'cancelled'
    r.fast()
    # Cancelling a goal that already finished: refused by the action server, no harm done.
    done, _ = r.send_goal('Short one.', options(max_new_tokens=4))
    status, res = r.result(done)
    assert status == GoalStatus.STATUS_SUCCEEDED and res.success
    late = done.cancel_goal_async()
    assert wait_until(late.done)
    assert late.result().return_code == CancelGoal.Response.ERROR_GOAL_TERMINATED
    assert r.ask('Fine?').success


def test_topic_question_gets_an_answer_on_the_answer_topic(rig):
    r = rig('topic')
    r.publish_frame(frame(11), 701, frame_id='cam_topic')
    r.question_pub.publish(String(data='How many cars are there?'))
    got = r.answers.wait_for(lambda m: m.question == 'How many cars are there?')
    assert got is not None and got.success and got.answer
    assert stamp_of(got.header) == (701, 0) and got.header.frame_id == 'cam_topic'
    assert got.timings.generated_tokens > 0
    # A bad question on the topic gets its error on the same topic.
    r.question_pub.publish(String(data='   '))
    bad = r.answers.wait_for(lambda m: m.error_code == 'bad_request' and m.question == '   ')
    assert bad is not None and not bad.success and 'empty' in bad.error_message


def test_no_frame_yet_and_no_image_is_refused_with_no_image(rig):
    r = rig('no_image')
    res = r.ask('What do you see?')
    assert not res.success and res.error_code == 'no_image'
    assert '/no_image/image' in res.error_message
    handle, _ = r.send_goal('What do you see?')
    status, res = r.result(handle)
    assert status == GoalStatus.STATUS_ABORTED and res.error_code == 'no_image'
    # Frames that arrive but cannot be decoded: still no image to talk about.
    bad = Image(height=10, width=10, encoding='rgb8', step=30, data=b'\0' * 100)
    bad.header.stamp.sec = 5
    r.image_pub.publish(bad)
    assert wait_until(lambda: r.service.counters['bad_frames.truncated'] >= 1)
    res = r.ask('What do you see now?')
    assert res.error_code == 'no_image' and 'no usable camera frame' in res.error_message
    # A good frame fixes it.
    r.publish_frame(frame(12), 6)
    assert r.ask('What do you see now?').success


def _corrupt_images():
    good = image_codec.numpy_to_image(frame(13, 40, 60), 'rgb8')
    jpeg = bytes(image_codec.encode_compressed(frame(13, 40, 60), 'jpeg').data)
    return [
        ('truncated raw', dict(image=Image(height=40, width=60, encoding='rgb8', step=180,
                                           data=bytes(good.data)[:-100]))),
        ('unsupported encoding', dict(image=Image(height=40, width=60, encoding='32FC1',
                                                  step=240, data=b'\0' * 9600))),
        ('step too small', dict(image=Image(height=40, width=60, encoding='rgb8', step=100,
                                            data=bytes(good.data)))),
        ('huge header', dict(image=Image(height=100_000, width=100_000, encoding='mono8',
                                         step=100_000, data=b'\0' * 64))),
        ('corrupt jpeg', dict(compressed=CompressedImage(
            format='jpeg', data=b'\xff\xd8' + bytes(range(256)) * 4 + b'\xff\xd9'))),
        ('half a jpeg', dict(compressed=CompressedImage(format='jpeg',
                                                        data=jpeg[:len(jpeg) // 2]))),
        ('tiff', dict(compressed=CompressedImage(format='tiff', data=b'II*\0' + b'\0' * 64))),
    ]


def test_bad_requests_get_clear_errors_and_the_node_stays_up(rig):
    r = rig('bad', max_question_chars=50)
    r.publish_frame(frame(14), 801)
    cases = [
        ('', None, 'bad_request', 'empty'),
        ('   \n ', None, 'bad_request', 'empty'),
        ('x' * 51, None, 'bad_request', 'max_question_chars'),
        ('q', options(max_new_tokens=0), 'bad_request', 'options.max_new_tokens'),
        ('q', options(max_new_tokens=5000), 'bad_request', 'options.max_new_tokens'),
        ('q', options(temperature=9.0), 'bad_request', 'options.temperature'),
        ('q', options(temperature=float('nan')), 'bad_request', 'options.temperature'),
        ('q', options(top_p=0.0), 'bad_request', 'options.top_p'),
        ('q', options(top_p=1.5), 'bad_request', 'options.top_p'),
        ('q', options(top_k=1_000_000), 'bad_request', 'options.top_k'),
    ]
    for question, opts, code, words in cases:
        res = r.ask(question, opts=opts)
        assert not res.success and res.error_code == code, (question, opts, res)
        assert words in res.error_message, res.error_message
    for label, kw in _corrupt_images():
        res = r.ask('What is this?', **kw)
        assert not res.success and res.error_code == 'bad_image', (label, res)
        assert 'request image' in res.error_message, res.error_message
    # Through the action too.
    handle, _ = r.send_goal('y' * 51)
    status, res = r.result(handle)
    assert status == GoalStatus.STATUS_ABORTED and res.error_code == 'bad_request'
    # Valid options are applied: a seeded sampled answer, and the answer length limit.
    res = r.ask('q', opts=options(max_new_tokens=3, temperature=0.7, top_k=20, top_p=0.9,
                                  seed=1))
    assert res.success and res.timings.generated_tokens <= 3
    assert r.ask('Still fine?').success
    assert common.lifecycle_state(r.node) == 'active' and r.service.status().worker_error is None


def test_twenty_concurrent_clients_all_get_an_answer_or_a_clear_error(rig):
    # request_timeout leaves the 4 accepted questions time to finish on a loaded machine
    # (1.5 s did not, twice in 20 runs); the queue of 3 makes most others busy at once.
    r = rig('crowd', clients=12, action_clients=5, queue_size=3, request_timeout=5.0)
    r.publish_frame(frame(15), 901)
    r.slow(0.02)
    opts = options(max_new_tokens=15)
    services, actions = r.clients, r.action_clients
    # All at once: 12 service calls, 5 goals, 3 topic questions.
    futures = {f'service {i}': r.ask_async(f'service {i}', opts=opts, client=c)
               for i, c in enumerate(services)}
    goals = {f'action {i}': a.send_goal_async(ACTION.AskScene.Goal(
        question=f'action {i}', options=opts)) for i, a in enumerate(actions)}
    for i in range(3):
        r.question_pub.publish(String(data=f'topic {i}'))
    outcomes = {}
    for q, fut in futures.items():
        assert wait_until(fut.done, timeout=WAIT * 2), (
            f'{q}: no response; counters {dict(r.service.counters)}, '
            f'{r.service.status()}, answers {[m.question for m in r.answers.msgs]}, '
            f'{[f.done() for f in futures.values()]}')
        res = fut.result()
        outcomes[q] = 'ok' if res.success else res.error_code
    for q, sent in goals.items():
        assert wait_until(sent.done), f'{q}: goal not acknowledged'
        status, res = r.result(sent.result())
        outcomes[q] = 'ok' if res.success else res.error_code
        assert status == (GoalStatus.STATUS_SUCCEEDED if res.success
                          else GoalStatus.STATUS_ABORTED)
    for i in range(3):
        got = r.answers.wait_for(lambda m: m.question == f'topic {i}', timeout=WAIT * 2)
        assert got is not None, f'topic {i}: no answer'
        outcomes[f'topic {i}'] = 'ok' if got.success else got.error_code
    print('outcomes:', sorted(outcomes.items()))
    assert len(outcomes) == 20
    assert set(outcomes.values()) <= {'ok', 'busy', 'timeout'}, outcomes
    assert 'ok' in outcomes.values() and 'busy' in outcomes.values(), outcomes
    # ~/answer carries exactly one answer per request, agreeing with what the client got.
    for q, outcome in outcomes.items():
        published = r.answers.matching(lambda m: m.question == q)
        assert len(published) == 1, (q, published)
        assert ('ok' if published[0].success else published[0].error_code) == outcome
    # The node is still up, with nothing left behind.
    assert wait_until(lambda: r.service.status().queue_depth == 0
                      and not r.service.status().running)
    state = r.probe.create_client(GetState, f'{r.name}/get_state').call_async(
        GetState.Request())
    assert wait_until(state.done) and state.result().current_state.label == 'active'
    r.fast()
    assert r.ask('After the crowd?').success


def test_clients_that_disappear_mid_request_do_not_hurt_the_node(rig, spin):
    r = rig('vanish')
    r.publish_frame(frame(16), 1001)
    r.slow(0.03)
    other = rclpy.create_node('vanishing_client', namespace='/vanish')
    try:
        client = r.make_action_client(other)  # entities first, then spin (see Rig)
        srv_client = other.create_client(SRV.AskScene, f'{r.name}/ask')
        spinner = spin(other)
        assert client.wait_for_server(timeout_sec=WAIT)
        assert srv_client.wait_for_service(timeout_sec=WAIT)
        assert r.round_trip(lambda: r.goal_result(client))  # replies arrive (see Rig)
        assert r.round_trip(lambda: srv_client.call_async(SRV.AskScene.Request(question='')))
        handle, feedback = r.send_goal('Streaming to nobody.', options(max_new_tokens=60),
                                       client=client)
        r.ask_async('Service caller leaving.', opts=options(max_new_tokens=5),
                    client=srv_client)
        assert wait_until(lambda: any(f.stage == 'decoding' for f in feedback))
        spinner.stop()
    finally:
        other.destroy_node()
    # Both requests are still answered (on ~/answer), and the node keeps serving.
    for q in ('Streaming to nobody.', 'Service caller leaving.'):
        got = r.answers.wait_for(lambda m: m.question == q, timeout=WAIT * 2)
        assert got is not None and got.success, q
    r.fast()
    assert r.ask('Anyone left?').success


def test_deactivate_answers_pending_requests_and_activate_serves_again(rig):
    r = rig('lifecycle')
    r.publish_frame(frame(17), 1101)
    r.slow(0.05)
    futures = [r.ask_async(f'pending {i}', opts=options(max_new_tokens=300)) for i in range(3)]
    assert wait_until(lambda: r.service.status().running
                      and r.service.status().queue_depth == 2)
    r.node.trigger_deactivate()
    assert common.lifecycle_state(r.node) == 'inactive'
    for fut in futures:
        assert wait_until(fut.done), 'a pending request was never answered'
        res = fut.result()
        assert not res.success and res.error_code == 'not_ready', res
    res = r.ask('Inactive?')
    assert res.error_code == 'not_ready' and 'inactive' in res.error_message
    r.fast()
    r.node.trigger_activate()
    assert common.lifecycle_state(r.node) == 'active'
    r.publish_frame(frame(17), 1102)
    assert r.ask('Active again?').success


def test_parameters_live_and_by_lifecycle_state(rig, tiny_vlm_bundle):
    r = rig('params')
    node = r.node

    def set_one(name, value):
        return node.set_parameters([Parameter(name, value=value)])[0]

    res = set_one('bundle_path', '/elsewhere')
    assert not res.successful and 'Reconfigure' in res.reason
    res = set_one('input_type', 'compressed')
    assert not res.successful and 'deactivate' in res.reason
    assert not set_one('request_timeout', 0.0).successful  # descriptor range
    assert not set_one('queue_size', 20).successful  # read-only
    assert set_one('generation.max_new_tokens', 2).successful  # live
    r.publish_frame(frame(18), 1201)
    res = r.ask('Short?')
    assert res.success and res.timings.generated_tokens <= 2
    # Compressed input after a deactivate; the remapped `image` + /compressed.
    node.trigger_deactivate()
    assert set_one('input_type', 'compressed').successful
    assert not set_one('input_type', 'h264').successful
    node.trigger_activate()
    assert node.input_topic == '/params/image/compressed'
    pub = r.compressed_pub
    assert wait_until(lambda: pub.get_subscription_count() > 0)
    jpeg = image_codec.encode_compressed(frame(19), 'jpeg')
    jpeg.header.stamp.sec = 1202
    pub.publish(jpeg)
    assert wait_until(lambda: node.encoded_header is not None
                      and node.encoded_header.stamp.sec == 1202)
    res = r.ask('From the compressed stream?')
    assert res.success and stamp_of(res.image_header) == (1202, 0)


def test_scene_context_from_the_segmentation_goes_into_the_prompt(rig):
    r = rig('context', use_scene_context=True)
    pub = r.context_pub
    assert wait_until(lambda: pub.get_subscription_count() > 0)
    r.publish_frame(frame(20), 1301)
    before = r.ask('What is there?')
    pub.publish(MSG.ClassStats(class_ids=[0, 13, 11], class_names=['road', 'car', 'person'],
                               pixel_share=[0.41, 0.12, 0.005]))
    assert wait_until(lambda: 'road 41%' in r.node.scene_context)
    assert r.node.scene_context == 'The segmentation sees: road 41%, car 12%.'
    # The frame encoded before the context keeps its prompt (its prefilled prefix stays
    # valid); the next frame is prepared with the context in the system prompt.
    same = r.ask('What is there?')
    assert same.success and same.timings.prompt_tokens == before.timings.prompt_tokens
    r.publish_frame(frame(20), 1302)
    assert 'road 41%' in r.service.status().encoded.system
    after = r.ask('What is there?')
    assert after.success and stamp_of(after.image_header) == (1302, 0)
    assert after.timings.prompt_tokens > before.timings.prompt_tokens


def test_diagnostics(rig):
    r = rig('diag')
    inbox = r.diagnostics
    r.publish_frame(frame(21), 1401)
    assert r.ask('Diagnose?').success
    mine = f'{r.name}: scene_qa'
    msg = inbox.wait_for(lambda m: m.status and m.status[0].name == mine
                         and common.diagnostic_values(m).get('answered') == '1')
    assert msg is not None
    values = common.diagnostic_values(msg)
    for key in ('queue_depth', 'image_age_s', 'last_latency_ms', 'last_tokens_per_second',
                'last_ttft_ms', 'bundle_path', 'eager_encodings', 'input_topic'):
        assert key in values, key
    assert values['state'] == 'active' and values['input_topic'] == '/diag/image'
    assert msg.status[0].level == bytes([common.DiagnosticsPublisher.OK])


def _flip_byte(path, offset=100):
    with open(path, 'r+b') as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def test_missing_or_corrupt_bundle_fails_configure_naming_the_file_and_the_fix(
        ros_context, tiny_vlm_bundle, tmp_path):
    corrupt = tmp_path / 'corrupt'
    shutil.copytree(tiny_vlm_bundle, corrupt)
    _flip_byte(corrupt / 'decoder_int4.onnx.data')
    no_manifest = tmp_path / 'no_manifest'
    shutil.copytree(tiny_vlm_bundle, no_manifest)
    os.remove(no_manifest / 'manifest.json')
    missing_file = tmp_path / 'missing_file'
    shutil.copytree(tiny_vlm_bundle, missing_file)
    os.remove(missing_file / 'vision_int8.onnx.data')
    cases = [
        ({'bundle_path': str(tmp_path / 'nowhere')}, str(tmp_path / 'nowhere'),
         'bluelm-ros vlm-export'),
        ({'bundle_path': str(corrupt)}, 'decoder_int4.onnx.data', 're-export'),
        ({'bundle_path': str(no_manifest)}, 'manifest.json', 'bluelm-ros vlm-export'),
        ({'bundle_path': str(missing_file)}, 'vision_int8.onnx.data', 're-export'),
        ({'bundle_path': tiny_vlm_bundle, 'decoder_precision': 'fp32'}, 'manifest.json',
         '--decoder fp32'),
    ]
    if not VLM_BUNDLE.available():
        cases.append(({'bundle_path': ''}, os.path.join('models', 'vlm', 'scene-tiny'),
                      'train_scene_vlm.sh'))
    for i, (params, file_part, fix_part) in enumerate(cases):
        overrides = [Parameter(k, value=v) for k, v in params.items()]
        node = SceneQANode(f'bad_bundle_{i}', namespace='/bad_bundle',
                           parameter_overrides=overrides)  # autostart tries configure
        try:
            assert common.lifecycle_state(node) == 'unconfigured', params
            err = node.configure_error
            assert file_part in err and fix_part in err, (params, err)
            status = node.publish_diagnostics().status[0]
            assert status.level == bytes([common.DiagnosticsPublisher.ERROR])
            assert file_part in status.message
            ans = node.ask('Anyone home?')
            assert ans.error_code == 'not_ready' and file_part in ans.error_message
        finally:
            node.destroy_node()
    # Unconfigured, the bundle may change; then configure succeeds.
    node = SceneQANode('bad_bundle_fixed', namespace='/bad_bundle', parameter_overrides=[
        Parameter('bundle_path', value=str(corrupt)), Parameter('threads', value=1)])
    try:
        assert node.set_parameters([Parameter('bundle_path', value=tiny_vlm_bundle)])[0] \
            .successful
        assert common.lifecycle_autostart(node)
        assert common.lifecycle_state(node) == 'active' and node.configure_error == ''
        ans = node.ask('Hello?', image=frame(22), timeout=WAIT)
        assert ans.success, ans.error_message
    finally:
        node.destroy_node()


def _node_process(ns, bundle, tmp_path, *params):
    return NodeProcess.node('bluelm_ros.ros.scene_qa_node', tmp_path / f'{ns}.log', tmp_path,
                            '-r', f'__ns:=/{ns}', '-p', f'bundle_path:={bundle}',
                            '-p', 'threads:=1', *params)


def test_ctrl_c_of_the_real_executable_with_requests_in_flight(
        spin, tiny_vlm_bundle, tmp_path):
    """SIGINT while answering, with requests queued: exits at once, no traceback."""
    ns = 'sigint_qa'
    # request_timeout far beyond the test: waiting service callbacks must not hold the exit.
    with _node_process(ns, tiny_vlm_bundle, tmp_path, '-p', 'request_timeout:=600.0',
                       '-p', 'qos.reliability:=reliable') as node:
        probe = rclpy.create_node('sigint_qa_probe', namespace=f'/{ns}')
        client = probe.create_client(SRV.AskScene, 'scene_qa_node/ask')
        spinner = spin(probe)
        try:
            assert client.wait_for_service(timeout_sec=60), 'the node never came up'
            img = image_codec.numpy_to_image(frame(23), 'rgb8')
            first = client.call_async(SRV.AskScene.Request(question='Ready?', image=img))
            assert wait_until(first.done, timeout=60)
            assert first.result().success, node.output()
            # The node's executor has queue_size + 4 = 12 threads (run_node reads the
            # node's executor_threads): 8 long requests block 8 of them at once.
            req = SRV.AskScene.Request(question='Long one.', image=img,
                                       options=options(max_new_tokens=1900))
            pending = [client.call_async(req) for _ in range(8)]
            assert wait_until(lambda: any(f.done() for f in pending), timeout=60)
            answered_before = sum(f.done() for f in pending)
            assert answered_before < 8, 'too fast: nothing was in flight at SIGINT'
            t0 = time.monotonic()
            node.proc.send_signal(signal.SIGINT)
            node.proc.wait(timeout=WAIT)
            time.sleep(0.5)
            codes = [f.result().error_code for f in pending if f.done()]
            print(f'exited {time.monotonic() - t0:.2f} s after SIGINT with '
                  f'{8 - answered_before} calls in flight; responses: {codes}')
        finally:
            spinner.stop()
            probe.destroy_node()
    node.assert_exited_cleanly()


def test_bad_startup_parameter_exits_with_the_reason(tiny_vlm_bundle, tmp_path):
    with _node_process('badparam_qa', tiny_vlm_bundle, tmp_path,
                       '-p', 'decoder_precision:=int3') as node:
        node.proc.wait(timeout=120)
    output = node.output()
    assert node.proc.returncode == 1, output
    assert "decoder_precision must be one of 'int4', 'fp32'; got 'int3'" in output
    assert 'Traceback' not in output, output


# ------------------------------------------------------------------ the shipped model


@pytest.fixture(scope='module')
def shipped():
    """The shipped scene-tiny bundle, its engine (the oracle) and the scenes to ask about."""
    if not VLM_BUNDLE.available():
        pytest.skip(SHIPPED_MISSING)
    from bluelm_ros.runtime.vlm.engine import VLMEngine
    from bluelm_ros.data.scene_qa import is_correct, SceneQAGenerator
    engine = VLMEngine(VLM_BUNDLE.default_path, threads=1)
    gen = SceneQAGenerator()
    scenes = []
    for seed in (3, 11, 29):
        scene, qas = gen.scene_questions(seed)
        # The questions the model itself answers right about this image (asked directly,
        # in this process): the node must give the same right answer through ROS.
        known = []
        for qtype, question, answer in qas:
            out = engine.generate(question, image=scene.image, max_new_tokens=32).text
            if is_correct(out, answer):
                known.append((qtype, question, answer))
        scenes.append((seed, scene, qas, known))
    n_known = sum(len(s[3]) for s in scenes)
    n_all = sum(len(s[2]) for s in scenes)
    assert n_known >= 3, (f'the shipped model answers only {n_known} of {n_all} questions '
                          'right when asked directly: is it the trained bundle?')
    engine.close()
    return scenes


def _check_known(res_or_msg, answer_text, question, expected, stamp):
    from bluelm_ros.data.scene_qa import is_correct
    header = getattr(res_or_msg, 'image_header', None) or res_or_msg.header
    assert res_or_msg.success, (question, res_or_msg.error_message)
    assert stamp_of(header) == (stamp, 0), question
    assert is_correct(answer_text, expected), (question, answer_text, expected)


def test_shipped_model_right_answers_via_service_action_and_topic(rig, shipped):
    r = rig('shipped', bundle=VLM_BUNDLE.default_path, threads=0,
            **{'qos.reliability': 'reliable'})
    misses = []
    for i, (seed, scene, _, known) in enumerate(shipped):
        stamp = 2000 + i
        r.publish_frame(scene.image, stamp, frame_id=f'scene_{seed}')
        for j, (qtype, question, expected) in enumerate(known):
            via = ('service', 'action', 'topic')[j % 3]
            if via == 'service':
                res = r.ask(question)
                text = res.answer
            elif via == 'action':
                handle, feedback = r.send_goal(question)
                # Feedback first: rclpy's ActionClient drops the feedback callback once the
                # result arrives, and a one-token answer's feedback can come in with the
                # result (seen on Jazzy under load), so ask for the result only after it.
                assert wait_until(lambda: any(f.stage == 'decoding' for f in feedback),
                                  timeout=WAIT), [f.stage for f in feedback]
                status, res = r.result(handle)
                assert status == GoalStatus.STATUS_SUCCEEDED
                text = res.answer
            else:
                r.question_pub.publish(String(data=question))
                res = r.answers.wait_for(lambda m: m.question == question
                                         and stamp_of(m.header) == (stamp, 0))
                assert res is not None, f'no answer on the topic to {question!r}'
                text = res.answer
            try:
                _check_known(res, text, question, expected, stamp)
            except AssertionError as exc:
                misses.append(f'{via}: {exc}')
    assert not misses, misses


def test_shipped_model_answers_about_an_image_in_the_request(rig, shipped):
    from bluelm_ros.data.scene_qa import is_correct
    r = rig('shipped_req', bundle=VLM_BUNDLE.default_path, threads=0)
    seed, scene, _, known = shipped[-1]
    img = image_codec.numpy_to_image(scene.image, 'rgb8')
    img.header.stamp.sec = 3000
    jpeg = CompressedImage(format='png', data=cv2.imencode('.png', scene.image[:, :, ::-1])[1]
                           .tobytes())
    jpeg.header.stamp.sec = 3001
    for qtype, question, expected in known:
        res = r.ask(question, image=img)
        assert res.success and stamp_of(res.image_header) == (3000, 0)
        assert is_correct(res.answer, expected), (question, res.answer, expected)
        res = r.ask(question, compressed=jpeg)  # lossless: the same pixels
        assert res.success and is_correct(res.answer, expected), (question, res.answer)


def test_shipped_model_bundle_layout():
    if not VLM_BUNDLE.available():
        pytest.skip(SHIPPED_MISSING)
    from bluelm_ros.runtime.vlm.bundle import Bundle
    b = Bundle(VLM_BUNDLE.default_path)
    assert 'int8' in b.precisions('vision') and 'int4' in b.precisions('decoder')
    b.verify()
    assert b.config.name == 'scene-tiny'


# Five unseen scenes per question type (seeds outside training, held-out and curve ranges).
# Deterministic on a given machine; the shipped INT4 bundle gets 26/30 of them right
# (presence 5, count 4, color 4, position 5, largest 5, caption 3).
END_TO_END_BASE = 1_500_100_000


@pytest.mark.parametrize('qtype', ['presence', 'count', 'color', 'position', 'largest',
                                   'caption'])
def test_shipped_model_answers_each_question_type_right_through_the_service(rig, qtype):
    """A rendered scene goes in as the request image; the ground-truth answer comes out."""
    if not VLM_BUNDLE.available():
        pytest.skip(SHIPPED_MISSING)
    from bluelm_ros.data.scene_qa import heldout_samples, is_correct
    r = rig(f'e2e_{qtype}', bundle=VLM_BUNDLE.default_path, threads=0)
    samples = [s for s in heldout_samples(5, base=END_TO_END_BASE) if s.qtype == qtype]
    right, wrong = 0, []
    for i, s in enumerate(samples):
        img = image_codec.numpy_to_image(s.image, 'rgb8')
        img.header.stamp.sec = 4000 + i
        res = r.ask(s.question, image=img)
        assert res.success, (s.question, res.error_message)
        assert stamp_of(res.image_header) == (4000 + i, 0)
        if is_correct(res.answer, s.answer):
            right += 1
        else:
            wrong.append((s.question, res.answer, s.answer))
    assert len(samples) == 5 and right >= 3, wrong
