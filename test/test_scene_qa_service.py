"""The scene-QA service without ROS: frames in, questions in, plain answers out.

A real engine on the tiny random-weight bundle (conftest.tiny_vlm_bundle): the answers are
gibberish, but tiling, encoding, prefill, prefix reuse and decoding are real. Frames are
``(rgb, tag)`` pairs decoded by a small function that refuses non-images, as the node's
codec does. SlowEngine holds questions in flight where a test needs them queued.
"""
import threading

import numpy as np
import pytest

from bluelm_ros.data.synthetic import render_scene
from bluelm_ros.runtime.image import ImageError, to_rgb_uint8
from bluelm_ros.runtime.scene_qa_service import (Generation, RequestError, SceneQAService,
                                                 Settings)
from bluelm_ros.runtime.vlm.engine import VLMEngine
from engine_helpers import EagerGate, SlowEngine
from ros_helpers import wait_until


def frame(seed, h=120, w=160):
    return render_scene(seed, h, w).image


def decode(raw):
    rgb, tag = raw
    if not isinstance(rgb, np.ndarray):
        raise ImageError(f'not an image: {rgb!r}', 'truncated')
    return to_rgb_uint8(rgb).copy(), tag


class Harness:
    """A service with live-editable settings, every answer and warning recorded."""

    def __init__(self, engine, **settings):
        self.engine = engine
        self.settings = Settings(**{'eager_encoding_rate': 100.0, **settings})
        self.answers, self.warnings = [], []
        self.service = SceneQAService(lambda: self.settings, decode,
                                      on_answer=self.answers.append,
                                      warn=lambda key, msg: self.warnings.append((key, msg)))

    def start(self):
        self.service.start(self.engine, camera='test camera')
        return self.service

    def encoded_tag(self):
        encoded = self.service.status().encoded
        return encoded.frame.tag if encoded is not None else None


@pytest.fixture(scope='module')
def engine(tiny_vlm_bundle):
    eng = VLMEngine(tiny_vlm_bundle, threads=1, verify='size').load()
    yield eng
    eng.close()


@pytest.fixture
def harness(engine):
    made = []

    def make(**settings):
        engine.reset()
        h = Harness(engine, **settings)
        made.append(h)
        return h

    yield make
    for h in made:
        h.service.stop('test over')


def test_eager_encoding_prefills_the_frame_so_a_question_pays_only_for_its_text(
        harness, engine):
    h = harness()
    service = h.start()
    service.put_frame((frame(1), 'frame 1'))
    assert wait_until(lambda: h.encoded_tag() == 'frame 1')
    prefix = engine.cached_tokens
    assert prefix > 0 and service.counters['eager_encodings'] == 1
    answer = service.ask('what is in front ?')
    assert answer.success and answer.text and answer.frame_tag == 'frame 1'
    t = answer.timings
    assert t.image_cached and t.image_encode_ms == 0.0
    assert t.reused_prefix_tokens == prefix  # only the question was prefilled
    assert answer.total_ms >= answer.queue_ms >= 0
    assert h.answers == [answer]

    # A request image replaces the prefix in the KV cache; idle again, the service puts
    # the camera frame's prefix back, so the next camera question reuses it again.
    other = service.ask('and this ?', image=frame(2, 90, 200))
    assert other.success and not other.timings.image_cached and other.frame_tag is None
    assert wait_until(lambda: engine.cached_tokens == prefix)
    again = service.ask('and the camera ?')
    assert again.frame_tag == 'frame 1' and again.timings.reused_prefix_tokens == prefix
    # A newer frame is encoded in the background and becomes the one questions are about.
    service.put_frame((frame(3), 'frame 3'))
    assert wait_until(lambda: h.encoded_tag() == 'frame 3')
    assert service.ask('now ?').frame_tag == 'frame 3'


def test_eager_work_gives_way_to_a_question_that_arrives_meanwhile(harness, engine):
    gate = EagerGate(engine)
    h = harness()
    h.engine = gate
    service = h.start()
    service.put_frame((frame(1), 'frame 1'))
    assert wait_until(lambda: h.encoded_tag() == 'frame 1')
    prefix = engine.cached_tokens
    gate.armed = True
    service.put_frame((frame(2), 'frame 2'))
    assert gate.holding.wait(10)  # frame 2 encoded, its prefill not started
    answer = service.ask('what is in front ?')
    # the eager pass stopped before its first prefill chunk; the question is about the
    # newer frame (already encoded) and prefilled its prefix itself
    assert service.counters['eager_interrupted'] == 1
    assert answer.success and answer.frame_tag == 'frame 2'
    assert answer.timings.image_cached and answer.timings.reused_prefix_tokens < prefix
    # idle again, the service finishes frame 2's prefix: the next question reuses it
    assert wait_until(lambda: engine.cached_tokens == prefix)
    again = service.ask('and now ?')
    assert again.frame_tag == 'frame 2' and again.timings.reused_prefix_tokens == prefix


def test_without_eager_encoding_the_newest_frame_is_encoded_on_demand(harness):
    h = harness(eager_encoding=False)
    service = h.start()
    service.put_frame((frame(4), 'a'))
    first = service.ask('what color is the car ?')
    assert first.frame_tag == 'a' and not first.timings.image_cached
    assert first.timings.image_encode_ms > 0
    service.put_frame((frame(5), 'b'))
    second = service.ask('what color is the car ?')
    assert second.frame_tag == 'b' and not second.timings.image_cached
    third = service.ask('is there a bus ?')  # the same frame: its encoding is cached
    assert third.frame_tag == 'b' and third.timings.image_cached
    assert service.counters['eager_encodings'] == 0


def test_the_queue_is_bounded_and_every_question_is_answered_once(harness, engine):
    h = harness(queue_size=2)
    service = h.start()
    service.put_frame((frame(6), 'f'))
    assert wait_until(lambda: h.encoded_tag() == 'f')
    service.engine = SlowEngine(engine, 0.05)
    long = Generation(max_new_tokens=400)
    stages = []
    running = service.submit('long answer', generation=long,
                             on_stage=lambda stage, position: stages.append(stage))
    assert wait_until(lambda: service.status().running)
    queued = [service.submit(f'queued {i}') for i in range(2)]
    with pytest.raises(RequestError) as busy:
        service.submit('one too many')
    assert busy.value.code == 'busy' and service.counters['busy'] == 1
    service.cancel(queued[1])  # still queued: answered at once
    assert queued[1].answer.error_code == 'cancelled'
    assert 'before it started' in queued[1].answer.error_message
    service.stop('the test stopped it')  # the running one stops at its next token
    assert running.answer.error_code == 'not_ready'
    assert running.answer.timings.generated_tokens > 0  # stopped mid-answer
    assert queued[0].answer.error_code == 'not_ready'
    assert queued[0].answer.error_message == 'the test stopped it'
    assert stages[:2] == ['queued', 'prefill']  # the frame was encoded before
    assert sorted(a.question for a in h.answers) == ['long answer', 'queued 0', 'queued 1']
    with pytest.raises(RequestError) as stopped:
        service.submit('after stop')
    assert stopped.value.code == 'not_ready'


def test_deadlines_and_cancel_while_running(harness, engine):
    h = harness(request_timeout=1.0)
    service = h.start()
    service.put_frame((frame(7), 'f'))
    service.engine = SlowEngine(engine, 0.05)
    job = service.submit('too long', generation=Generation(max_new_tokens=400))
    answer = service.wait(job)
    assert answer.error_code == 'timeout' and 'partial answer' in answer.error_message
    assert 0 < answer.timings.generated_tokens < 400
    h.settings = Settings(eager_encoding_rate=100.0, request_timeout=60.0)
    texts = []
    job = service.submit('cancel me', generation=Generation(max_new_tokens=400),
                         on_text=lambda delta, text, n: texts.append(text))
    assert wait_until(lambda: len(texts) >= 3)
    cancel = threading.Event()
    cancel.set()
    answer = service.wait(job, cancel_requested=cancel.is_set)
    assert answer.error_code == 'cancelled' and answer.text == texts[-1].strip()


def test_no_frame_bad_frames_and_bad_questions(harness):
    h = harness()
    service = h.service
    with pytest.raises(RequestError) as not_ready:
        service.submit('before start')
    assert not_ready.value.code == 'not_ready'
    service = h.start()
    answer = service.ask('what do you see ?')
    assert answer.error_code == 'no_image' and 'test camera' in answer.error_message
    service.put_frame(('garbage', 'bad'))  # decoded by the worker: refused, counted
    answer = service.ask('what do you see now ?')
    assert answer.error_code == 'no_image' and 'no usable camera frame' in answer.error_message
    assert service.counters['bad_frames.truncated'] == 1
    assert h.warnings and h.warnings[0][0] == 'truncated'
    for question, words in (('', 'empty'), ('  \n', 'empty'), ('x' * 501, 'max_question')):
        with pytest.raises(RequestError, match=words) as bad:
            service.submit(question)
        assert bad.value.code == 'bad_request'
    answer = service.ask('about this ?', image=frame(8))  # a request image needs no camera
    assert answer.success
    assert service.counters['error.no_image'] == 2 and service.counters['answered'] == 1


def test_an_answer_cut_to_nothing_by_a_stop_string_is_an_error(harness):
    h = harness(eager_encoding=False)
    service = h.start()
    image = frame(9)
    full = service.ask('what is this ?', image=image, generation=Generation(max_new_tokens=8))
    assert full.success and full.text, full
    # A stop string that is the answer's first character: nothing comes before it.
    stop = full.text[0]
    cut = service.ask('what is this ?', image=image,
                      generation=Generation(max_new_tokens=8, stop_strings=(stop,)))
    assert not cut.success and cut.error_code == 'empty_answer', cut
    assert 'stop string' in cut.error_message and repr(stop) in cut.error_message
    assert service.counters['error.empty_answer'] == 1


def test_stop_answers_the_queue_at_once_and_no_answered_job_keeps_its_image(harness, engine):
    h = harness(queue_size=4)
    service = h.start()
    service.put_frame((frame(10), 'f'))
    service.engine = SlowEngine(engine, 0.05)
    long = Generation(max_new_tokens=400)
    running = service.submit('long', image=frame(11), generation=long,
                             on_text=lambda *a: None)
    assert wait_until(lambda: service.status().running)
    queued = [service.submit(f'queued {i}', image=frame(12 + i)) for i in range(3)]
    service.stop('stopping')
    for job in [running] + queued:
        assert job.answer.error_code == 'not_ready', job.answer
        assert job.image is None and job.on_text is None and job.on_stage is None
    assert len(h.answers) == 4
