"""Scene-QA requests as a fleet sends them: bursts, memory, and what options mean.

* A burst of 100 service calls from 100 clients: the node queues every one (queue_size
  128; it answered most "busy" at once before) and answers each exactly once; clients
  with keep-all reply QoS (the docs' advice) get every reply. Clients with rclpy's
  default QoS (keep last 10) are counted, not asserted: Fast DDS hands every reply of a
  service to every client's reader, so a client whose executor lets 10 replies (to
  anyone) arrive between two takes loses its own; nothing on the server changes that
  (docs/scene-qa-node.md, "Clients").
* 100 action goals with a 1280x720 image each: the node's memory comes back within
  50 MB of where it started (the images are dropped when each goal ends; finished goals
  are kept RESULT_TIMEOUT s, not rclpy's 10 s / 900 s; big blocks are mmapped, see the
  heap_mmap_threshold parameter).
* GenerationOptions: only -1 means "node default"; other negatives are refused.

The node runs as its own process (the real executable), as a robot runs it.
"""
import math
import time

import pytest

rclpy = pytest.importorskip('rclpy')

from rclpy.action import ActionClient  # noqa: E402
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402

from bluelm_ros.data.synthetic import render_scene  # noqa: E402
from bluelm_ros.ros import image_codec, interfaces  # noqa: E402
from bluelm_ros.ros import scene_qa_messages as messages  # noqa: E402
from bluelm_ros.runtime.scene_qa_service import Generation, RequestError  # noqa: E402

from ros_helpers import Inbox, NodeProcess, wait_until  # noqa: E402

WAIT = 60.0
MSG = interfaces.load('msg')
SRV = interfaces.load('srv')
ACTION = interfaces.load('action')
RELIABLE = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10,
                      reliability=ReliabilityPolicy.RELIABLE)
ALL_ANSWERS = QoSProfile(history=HistoryPolicy.KEEP_ALL,
                         reliability=ReliabilityPolicy.RELIABLE)


def _connect(clients, attempts=10):
    """One round trip per client (an empty question, refused at once), all at once.

    A reply is dropped while the server has not yet discovered a client's reply reader;
    clients without a reply ask again. True when every client got one.
    """
    waiting = list(clients)
    for _ in range(attempts):
        sent = {c: c.call_async(SRV.AskScene.Request(question='')) for c in waiting}
        wait_until(lambda: all(f.done() for f in sent.values()), timeout=3)
        waiting = [c for c, f in sent.items() if not f.done()]
        if not waiting:
            return True
    return False


# ------------------------------------------------------------------ options


@pytest.mark.parametrize('field, value', [
    ('max_new_tokens', -5), ('max_new_tokens', -2), ('temperature', -math.inf),
    ('temperature', -0.5), ('top_k', -3), ('top_p', -2.0), ('seed', -7),
    ('temperature', math.nan), ('temperature', math.inf)])
def test_only_minus_one_means_node_default(field, value):
    default = Generation(max_new_tokens=32)
    with pytest.raises(RequestError) as refused:
        messages.generation(MSG.GenerationOptions(**{field: value}), default)
    assert refused.value.code == 'bad_request'
    assert f'options.{field}' in str(refused.value) and '-1' in str(refused.value)


def test_minus_one_and_valid_values():
    default = Generation(max_new_tokens=32, temperature=0.0, top_k=0, top_p=1.0)
    assert messages.generation(MSG.GenerationOptions(), default) == default
    got = messages.generation(MSG.GenerationOptions(max_new_tokens=3, temperature=0.0,
                                                    top_k=0, top_p=1.0, seed=0,
                                                    stop=['.', '']), default)
    assert (got.max_new_tokens, got.seed, got.stop_strings) == (3, 0, ('.',))


# ------------------------------------------------------------------ a burst of 100 clients


def test_a_burst_of_100_clients_is_queued_and_answered_once_each(
        spin, tiny_vlm_bundle, tmp_path):
    """100 clients ask at once: half with rclpy's default QoS, half as the docs advise."""
    ns = 'burst100'
    n = 100
    with NodeProcess.scene_qa(ns, tiny_vlm_bundle, tmp_path,
                              '-p', 'qos.reliability:=reliable') as node:
        probe = rclpy.create_node('burst_probe', namespace=f'/{ns}')
        # even: default QoS (keep last 10); odd: keep all (docs/scene-qa-node.md, Clients)
        clients = [probe.create_client(SRV.AskScene, 'scene_qa_node/ask',
                                       **({} if i % 2 == 0 else {'qos_profile': ALL_ANSWERS}))
                   for i in range(n)]
        answers = Inbox()
        probe.create_subscription(MSG.SceneAnswer, 'scene_qa_node/answer', answers,
                                  ALL_ANSWERS)
        camera = probe.create_publisher(Image, 'image', RELIABLE)
        spinner = spin(probe)
        try:
            assert all(c.wait_for_service(timeout_sec=WAIT) for c in clients), node.output()
            assert _connect(clients), 'some clients never got a reply'
            frame = image_codec.numpy_to_image(render_scene(31, 120, 160).image, 'rgb8')
            assert wait_until(lambda: camera.get_subscription_count() > 0)
            ready = None
            for _ in range(20):  # until the node has the frame
                camera.publish(frame)
                ready = clients[0].call_async(SRV.AskScene.Request(question='Ready?'))
                assert wait_until(ready.done, timeout=WAIT)
                if ready.result().error_code != 'no_image':
                    break
            assert ready.result().success, ready.result()
            t0 = time.monotonic()
            futures = [c.call_async(SRV.AskScene.Request(question=f'burst {i}'))
                       for i, c in enumerate(clients)]

            def published():
                return answers.matching(lambda m: m.question.startswith('burst '))
            assert wait_until(lambda: len(published()) >= n, timeout=WAIT * 2), node.output()
            seconds = time.monotonic() - t0
            wait_until(lambda: all(f.done() for f in futures), timeout=2.0)
            got = {i: f.result() for i, f in enumerate(futures) if f.done()}
            answered = published()
        finally:
            spinner.stop()
            probe.destroy_node()
    default = sum(i in got for i in range(0, n, 2))
    keep_all = sum(i in got for i in range(1, n, 2))
    codes = sorted({m.error_code or 'ok' for m in answered})
    print(f'burst of {n}: node answered {len(answered)} in {seconds:.1f} s ({codes}); replies '
          f'received: default-QoS clients {default}/{n // 2}, keep-all clients '
          f'{keep_all}/{n // 2}')
    # The node queued all of them (none "busy") and answered each exactly once.
    assert sorted(m.question for m in answered) == sorted(f'burst {i}' for i in range(n))
    assert codes == ['ok'], codes
    # Clients as the docs advise get every reply; each reply is the client's own.
    assert keep_all == n // 2, f'{n // 2 - keep_all} keep-all replies lost'
    assert all(res.success for res in got.values())


# ------------------------------------------------------------------ memory


def test_memory_returns_after_100_image_goals(spin, tiny_vlm_bundle, tmp_path):
    ns = 'goal_memory'
    n, batch = 100, 10
    with NodeProcess.scene_qa(ns, tiny_vlm_bundle, tmp_path,
                              '-p', 'eager_encoding:=false') as node:
        probe = rclpy.create_node('memory_probe', namespace=f'/{ns}')
        client = ActionClient(probe, ACTION.AskScene, 'scene_qa_node/ask_stream')
        spinner = spin(probe)
        try:
            assert client.wait_for_server(timeout_sec=WAIT), node.output()
            img = image_codec.numpy_to_image(render_scene(5, 720, 1280).image, 'rgb8')
            opts = MSG.GenerationOptions(max_new_tokens=2)

            def run_goals(count):
                sent = [client.send_goal_async(ACTION.AskScene.Goal(
                    question='What is there?', image=img, options=opts))
                    for _ in range(count)]
                assert wait_until(lambda: all(s.done() for s in sent), timeout=WAIT * 2)
                results = [s.result().get_result_async() for s in sent]
                assert wait_until(lambda: all(r.done() for r in results), timeout=WAIT * 2)
                return [r.result().result for r in results]

            idle = node.rss_mb()
            # One batch first, to show what the first use costs (DDS buffers for 10 goals
            # of 2.7 MB in flight, ONNX Runtime's arena) apart from any growth per goal.
            assert all(r.success for r in run_goals(batch)), 'warm-up goals failed'
            time.sleep(2.0)
            start = node.rss_mb()
            trace = []
            for _ in range(n // batch):
                results = run_goals(batch)
                assert all(r.success for r in results), [r.error_message for r in results]
                trace.append(round(node.rss_mb()))
            t_end = time.monotonic()
            samples = []
            while time.monotonic() - t_end < 20.0:
                samples.append(node.rss_mb())
                if samples[-1] - idle <= 50:
                    break
                time.sleep(0.5)
            after = samples[-1]
            waited = time.monotonic() - t_end
        finally:
            spinner.stop()
            probe.destroy_node()
    print(f'RSS: {idle:.0f} MB idle, {start:.0f} MB after a warm-up batch; during {n} image '
          f'goals (1280x720 rgb8, 2.7 MB each, {batch} at a time) {trace} MB; {after:.0f} MB '
          f'{waited:.1f} s after the last')
    assert after - idle <= 50, (idle, start, trace, samples)
    assert after - start <= 25, 'memory grows with every image goal'  # flat, measured +3
