"""Scene QA as a service: questions about the newest camera frame, one model worker.

No ROS here: the node (ros/scene_qa_node.py) maps messages and parameters onto this class,
and tests and library users drive it directly.

Threading: :meth:`SceneQAService.put_frame` only keeps the newest frame (decoded later, by
the worker). ONE worker thread takes questions in FIFO order; when the queue is empty and
eager encoding is on, it encodes the newest frame and prefills the prompt up to the end
of the image (the paper's decoupled image encoding), so a later question only pays for
its text. That eager work gives way to a question that arrives meanwhile, between tile
batches and prefill chunks (counted as ``eager_interrupted``): the question is about the
new frame if its encoding finished (the question prefills what the eager pass left), else
about the previous one. Questions beyond ``queue_size`` are refused "busy"; one still
queued or running after ``request_timeout`` gets "timeout". Every submitted question gets
exactly one :class:`Answer`, also handed to ``on_answer``.

Which frame a question is about: its own image if it has one; else, with eager encoding
on, the newest frame that is already encoded (at most about one ``1 /
eager_encoding_rate`` period older than the newest received frame); else the newest
received frame, encoded on demand. ``Answer.frame_tag`` says which frame it was.
"""
import collections
from dataclasses import dataclass, field
import itertools
import logging
import math
import threading
import time
from typing import Any, Callable, Optional

import numpy as np

from bluelm_ros.runtime.image import ImageError
from bluelm_ros.runtime.vlm.results import ContextOverflowError, Interrupted, Timings
from bluelm_ros.runtime.workers import LatestSlot, WorkerThread

ERRORS = ('no_image', 'bad_request', 'bad_image', 'busy', 'timeout', 'cancelled',
          'not_ready', 'empty_answer', 'internal')
# (min, max) of each generation setting a request may choose
GENERATION_LIMITS = {'max_new_tokens': (1, 4096), 'temperature': (0.0, 5.0),
                     'top_k': (0, 100000), 'top_p': (0.0, 1.0)}
# Seconds a waiting caller gives a running job past its deadline before answering
# "timeout" itself (the worker normally stops it within one token).
TIMEOUT_GRACE = 5.0
# Keys of received frames, unique in the process: an engine's image cache never mistakes
# one service's frame for another's.
_frame_ids = itertools.count(1)
log = logging.getLogger(__name__)


def empty_answer_reason(stop_reason, stop_strings):
    """Say why generation gave no text (an empty answer is never a success).

    A client could not tell an empty success from a lost answer, and a stop string that
    matches at once usually means the stop strings, not the model, are wrong.
    """
    if stop_reason == 'stop_string':
        return (f'the answer began with a stop string (stop = {list(stop_strings)!r}): '
                'nothing came before it')
    if stop_reason == 'eos':
        return 'the model ended the answer before any text'
    return f'no text generated (stopped by {stop_reason})'


class RequestError(Exception):
    """A question that cannot be answered: ``code`` is one of ERRORS."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Generation:
    """How to generate one answer (the engine's generate_ids options)."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop_strings: tuple = ()


@dataclass(frozen=True)
class Settings:
    """What the service reads for every question and idle step (the node's parameters)."""

    queue_size: int = 8
    request_timeout: float = 60.0
    eager_encoding: bool = True
    eager_encoding_rate: float = 1.0
    max_question_chars: int = 500
    system_prompt: Optional[str] = None  # with the scene context, if any
    generation: Generation = Generation()


@dataclass(frozen=True)
class Frame:
    """A decoded camera frame: RGB pixels, the caller's tag (e.g. its header), a key."""

    rgb: np.ndarray
    tag: Any
    key: str  # unique per received frame: two frames never share an encoding


@dataclass(frozen=True)
class EncodedFrame:
    """The camera frame encoded last, and the system prompt its prefix was prepared with.

    The system prompt stays with the frame, so a newer scene context does not invalidate
    the prefix already in the KV cache.
    """

    frame: Frame
    system: Optional[str]


@dataclass
class Answer:
    """The outcome of one question: the text, or an error code and message."""

    question: str
    text: str = ''
    error_code: str = ''  # '' = success, else one of ERRORS
    error_message: str = ''
    frame_tag: Any = None  # tag of the frame (or request image) the answer is about
    timings: Optional[Timings] = None  # the engine's, when the model ran
    queue_ms: float = 0.0
    total_ms: float = 0.0

    @property
    def success(self):
        return not self.error_code


@dataclass(eq=False)
class Job:
    """One question on its way through the queue and the model worker."""

    question: str
    generation: Generation
    image: Optional[np.ndarray] = None  # RGB uint8 from the request, or None: the camera
    image_tag: Any = None               # returned as the answer's frame_tag
    on_text: Optional[Callable] = None  # (delta, full_text, n_tokens) while streaming
    on_stage: Optional[Callable] = None  # (stage, queue_position): queued, encoding, prefill
    cancel: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    t_submit: float = field(default_factory=time.monotonic)
    deadline: float = math.inf
    answer: Optional[Answer] = None
    stage: str = 'queued'  # queued, running, timeout, shutdown


@dataclass(frozen=True)
class Status:
    """A snapshot for diagnostics."""

    queue_depth: int
    running: bool
    encoded: Optional[EncodedFrame]
    last_success: Optional[Answer]
    worker_error: Optional[BaseException]


class SceneQAService:
    """Questions about camera frames, answered by a VLMEngine on one worker thread.

    settings: returns the current :class:`Settings` (read for every question and idle
    step, so live changes apply at once). decode_frame: ``raw -> (rgb uint8, tag)``,
    raising ImageError; called on the worker for the newest frame only. on_answer: called
    once with every Answer, rejections included. warn: ``(key, message)`` for problems that
    are not an answer (undecodable frames, failed eager encodings).
    """

    def __init__(self, settings: Callable[[], Settings], decode_frame: Callable,
                 on_answer: Callable = lambda answer: None,
                 warn: Callable = lambda key, message: log.warning(message)):
        self.settings, self.decode_frame = settings, decode_frame
        self.on_answer, self.warn = on_answer, warn
        self.counters = collections.Counter()
        self.camera = 'the camera'
        self.engine = None
        self._cv = threading.Condition()
        self._finish_lock = threading.Lock()
        self._queue = collections.deque()
        self._accepting = False
        self._worker = None
        self._current = None
        self._slot = LatestSlot()
        self._frames_seen = 0      # frames put since start()
        self._newest = None        # Frame: the newest decoded frame
        self._encoded = None       # EncodedFrame: the camera frame encoded last
        self._restore_prefix = False  # a question may have replaced the frame's KV prefix
        self._next_eager = 0.0
        self._last_success = None

    # ------------------------------------------------------------------ lifecycle

    def start(self, engine, camera='the camera'):
        """Answer with ``engine`` (loaded) from now on; ``camera`` names the frame source."""
        self.engine, self.camera = engine, camera
        self._slot.reopen()
        self._slot.clear()
        self._frames_seen = 0
        self._newest = self._encoded = None
        self._restore_prefix, self._next_eager = False, 0.0
        self._worker = WorkerThread(self._work, 'scene_qa_worker', wake=self._wake).start()
        with self._cv:
            self._accepting = True

    def stop(self, reason, timeout=2.0):
        """Stop taking questions and answer every pending one "not_ready" with ``reason``.

        Queued questions are answered at once; the running one stops at its next token
        (the worker is given ``timeout`` seconds, then it is answered anyway).
        """
        worker, self._worker = self._worker, None
        with self._cv:
            self._accepting = False
            if worker is not None:
                worker.stop_event.set()  # the worker pops jobs under this lock: no new one
            current = self._current
            queued, self._queue = list(self._queue), collections.deque()
        for job in queued:
            self._finish(job, error=('not_ready', reason))
        if current is not None:
            current.stage = 'shutdown'
            current.cancel.set()  # the generation stops at the next token
        if worker is not None and not worker.stop(timeout=timeout):
            self.warn('stop', 'scene QA worker still finishing a model call')
        self._slot.clear()
        if current is not None:  # no-op if the worker finished it
            self._finish(current, error=('not_ready', reason))
        self._newest = self._encoded = None

    @property
    def accepting(self):
        return self._accepting

    def _wake(self):
        with self._cv:
            self._cv.notify_all()

    # ------------------------------------------------------------------ input

    def put_frame(self, raw):
        """Keep ``raw`` as the newest camera frame (any thread; never blocks, never decodes)."""
        self._frames_seen += 1
        self._slot.put(raw)

    def frame_counts(self):
        """Frames received / dropped unseen / taken by the worker."""
        return self._slot.counts()

    def submit(self, question, image=None, image_tag=None, generation=None, on_text=None,
               on_stage=None):
        """Queue a question; return its Job. Raises RequestError when it cannot be queued.

        image: RGB uint8 (None: the camera). generation: None for the settings' default.
        Wait with :meth:`wait` (or on ``job.done``; then ``job.answer`` is the Answer).
        """
        settings = self.settings()
        question = self.check_question(question)
        job = Job(question, generation or settings.generation, image=image,
                  image_tag=image_tag, on_text=on_text, on_stage=on_stage)
        with self._cv:
            if not self._accepting:
                raise RequestError('not_ready', 'not answering now')
            if image is None and not self._frames_seen and self._newest is None:
                raise RequestError('no_image', f'no camera frame received yet on '
                                   f'{self.camera} and the request has no image')
            if len(self._queue) >= settings.queue_size:
                self.counters['busy'] += 1
                raise RequestError('busy', f'{len(self._queue)} requests are already waiting '
                                   f'(queue_size); try again later')
            job.deadline = job.t_submit + settings.request_timeout
            position = len(self._queue)
            # under the lock: the worker cannot start the job (and stream text) before this
            self._stage(job, 'queued', position)
            self._queue.append(job)
            self.counters['accepted'] += 1
            self._cv.notify_all()
        return job

    def check_question(self, question):
        """Return the question stripped; RequestError('bad_request') if empty or too long."""
        question = (question or '').strip()
        if not question:
            raise RequestError('bad_request', 'the question is empty')
        limit = self.settings().max_question_chars
        if len(question) > limit:
            raise RequestError('bad_request', f'the question has {len(question)} characters; '
                               f'the limit is {limit} (parameter max_question_chars)')
        return question

    def reject(self, question, code, message):
        """Answer a question that was never queued (counted, handed to on_answer)."""
        answer = Answer(question=question or '', error_code=code, error_message=message)
        self.counters[f'error.{code}'] += 1
        self.on_answer(answer)
        return answer

    def cancel(self, job):
        """Cancel a job: at once if still queued, else at the next generated token."""
        if not self._withdraw(job, 'cancelled', 'cancelled before it started'):
            job.cancel.set()

    def wait(self, job, cancel_requested=lambda: False, timeout=None):
        """Block until the job is answered; return its Answer.

        ``cancel_requested`` is polled (e.g. an action client's cancel). Past the job's
        deadline a queued job is withdrawn with "timeout"; a running one gets
        TIMEOUT_GRACE more seconds to stop. ``timeout``: the caller's own limit in
        seconds, after which the job is cancelled.
        """
        give_up = math.inf if timeout is None else time.monotonic() + timeout
        while not job.done.wait(0.05):
            if cancel_requested():
                self.cancel(job)
            now = time.monotonic()
            if now > give_up:
                self.cancel(job)
                if not job.done.wait(TIMEOUT_GRACE):
                    self._finish(job, error=('timeout', f'no answer within {timeout} s'))
                break
            if now > job.deadline:
                if self._withdraw(job, 'timeout', 'timed out waiting in the queue '
                                  f'(request_timeout {self.settings().request_timeout} s)'):
                    break
                if now > job.deadline + TIMEOUT_GRACE:
                    job.cancel.set()
                    self._finish(job, error=('timeout', 'request timed out'))
        return job.answer

    def ask(self, question, image=None, generation=None, timeout=None):
        """Queue a question and wait for its Answer (rejections are answers too)."""
        try:
            job = self.submit(question, image=image, generation=generation)
        except RequestError as exc:
            return self.reject(question, exc.code, str(exc))
        return self.wait(job, timeout=timeout)

    def _withdraw(self, job, code, message):
        """Remove a job that is still queued and finish it with an error; True if done so."""
        with self._cv:
            try:
                self._queue.remove(job)
            except ValueError:
                return False
        self._finish(job, error=(code, message))
        return True

    # ------------------------------------------------------------------ status

    def status(self):
        with self._cv:
            depth, running = len(self._queue), self._current is not None
        worker = self._worker
        return Status(depth, running, self._encoded, self._last_success,
                      worker.error if worker is not None else None)

    # ------------------------------------------------------------------ the worker

    def _work(self, stop):
        while not stop.is_set():
            with self._cv:
                if not self._queue:
                    self._cv.wait(timeout=0.05)
                job = self._queue.popleft() if self._queue and not stop.is_set() else None
                self._current = job
            try:
                if job is not None:
                    self._answer(job)
                elif self.settings().eager_encoding and not stop.is_set():
                    self._eager_encode()
            except Exception as exc:  # one bad request or frame must not kill the worker
                if job is not None:
                    self._finish(job, error=self._exception_error(exc))
                else:
                    self.warn('eager', f'eager encoding failed: {type(exc).__name__}: {exc}')
            finally:
                with self._cv:
                    self._current = None

    @staticmethod
    def _exception_error(exc):
        if isinstance(exc, ContextOverflowError):
            return ('bad_request', f'{exc}')
        if isinstance(exc, ImageError):
            return ('bad_image', f'{exc}')
        return ('internal', f'{type(exc).__name__}: {exc}')

    def _refresh_newest(self):
        """Decode the newest camera frame, if a new one arrived; return the newest Frame."""
        raw = self._slot.take(timeout=0)
        if raw is not None:
            try:
                rgb, tag = self.decode_frame(raw)
                self._newest = Frame(rgb, tag, f'frame:{next(_frame_ids)}')
            except ImageError as exc:
                self.counters[f'bad_frames.{exc.reason}'] += 1
                self.warn(exc.reason, f'skipped a camera frame from {self.camera}: '
                                      f'{exc.reason}: {exc}')
        return self._newest

    def _eager_encode(self):
        encoded = self._encoded
        if (self._restore_prefix and encoded is not None
                and self.engine.cached_image(encoded.frame.key) is not None):
            # A question replaced (or extended) the frame's prefix in the KV cache, or a
            # question interrupted it: prefill it again (only what differs runs).
            if self._prepare(image_key=encoded.frame.key, system=encoded.system):
                self._restore_prefix = False
            return
        now = time.monotonic()
        if now < self._next_eager:
            return
        newest = self._refresh_newest()
        if newest is None or (encoded is not None and newest.key == encoded.frame.key):
            return
        # Encode and prefill up to the end of the image: a question then only pays for its
        # own tokens (the engine reuses the cached prefix).
        system = self.settings().system_prompt
        done = self._prepare(newest.rgb, image_key=newest.key, system=system)
        if not done and self.engine.cached_image(newest.key) is None:
            return  # gave way while encoding: the previous frame and its prefix stay
        # encoded (the prefill maybe cut short: a question then finishes it, or the next
        # idle turn does)
        self._encoded, self._restore_prefix = EncodedFrame(newest, system), not done
        self._next_eager = now + 1.0 / self.settings().eager_encoding_rate
        self.counters['eager_encodings'] += 1

    def _prepare(self, image=None, **kwargs) -> bool:
        """Eager encoding + prefill that gives way to a queued question; True if finished.

        It stops between tile batches and prefill chunks: at a 3B model's scale the whole
        of it takes ~20 s on two cores.
        """
        try:
            self.engine.prepare(image, cancel=lambda: bool(self._queue), **kwargs)
            return True
        except Interrupted:
            self.counters['eager_interrupted'] += 1
            return False

    def _frame_for_question(self, eager):
        newest = self._refresh_newest()
        encoded = self._encoded
        if eager and encoded is not None \
                and self.engine.cached_image(encoded.frame.key) is not None:
            return encoded.frame
        return newest

    def _answer(self, job):
        if job.cancel.is_set():
            return self._finish(job, error=('cancelled', 'cancelled before it started'))
        settings = self.settings()
        if time.monotonic() > job.deadline:
            return self._finish(job, error=('timeout', 'timed out waiting in the queue '
                                            f'(request_timeout {settings.request_timeout} s)'))
        job.stage = 'running'
        queue_ms = (time.monotonic() - job.t_submit) * 1e3
        frame, system = None, settings.system_prompt
        image = job.image  # read once: answering the job (e.g. stop) clears it
        if job.done.is_set():
            return None
        if image is not None:
            tag, key = job.image_tag, None  # keyed by its pixels
        else:
            frame = self._frame_for_question(settings.eager_encoding)
            if frame is None:
                return self._finish(job, error=(
                    'no_image', f'no usable camera frame yet on {self.camera} (frames '
                    f'received but not decodable: see the warnings and /diagnostics)'))
            image, tag, key = frame.rgb, frame.tag, frame.key
            encoded = self._encoded
            if encoded is not None and encoded.frame.key == frame.key:
                system = encoded.system
        text, tokens = [], [0]

        def on_token(delta, token_id):
            # one call per generated token (delta may be '' while a character or a possible
            # stop string is incomplete), plus token_id -1 for text held back to the end
            if token_id >= 0:
                tokens[0] += 1
            if delta:
                text.append(delta)
            on_text = job.on_text  # None once the job is answered (e.g. by stop)
            if on_text is not None and (delta or token_id >= 0):
                try:
                    on_text(delta, ''.join(text), tokens[0])
                except Exception:  # a streaming consumer never stops the answer
                    self.counters['feedback_errors'] += 1
            if time.monotonic() > job.deadline and job.stage == 'running':
                job.stage = 'timeout'
            return job.stage == 'running' and not job.cancel.is_set()

        g = job.generation
        self._restore_prefix = True  # whatever the question leaves in the KV cache
        result = self.engine.generate(
            job.question, image=image, image_key=key, system=system,
            on_stage=lambda stage: self._stage(job, stage),
            max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_k=g.top_k,
            top_p=g.top_p, seed=g.seed, stop_strings=list(g.stop_strings),
            on_token=on_token, cancel=job.cancel)
        if frame is not None:
            self._encoded = EncodedFrame(frame, system)
        error = None
        if job.stage == 'timeout':
            error = ('timeout', f'generation passed request_timeout '
                     f'({settings.request_timeout} s); partial answer returned')
        elif job.stage == 'shutdown':
            error = ('not_ready', 'the node stopped during generation; partial answer returned')
        elif result.stop_reason == 'cancelled':
            error = ('cancelled', 'cancelled by the client; partial answer returned')
        elif not result.text.strip():
            error = ('empty_answer', empty_answer_reason(result.stop_reason, g.stop_strings))
        self._finish(job, text=result.text.strip(), timings=result.timings, tag=tag,
                     queue_ms=queue_ms, error=error)

    def _stage(self, job, stage, position=0):
        on_stage = job.on_stage  # None once the job is answered
        if on_stage is not None:
            try:
                on_stage(stage, position)
            except Exception:
                self.counters['feedback_errors'] += 1

    def _finish(self, job, text='', timings=None, tag=None, queue_ms=None, error=None):
        """Complete a job exactly once (later calls are no-ops); hand it to on_answer."""
        with self._finish_lock:
            if job.done.is_set():
                return
            now = time.monotonic()
            answer = Answer(question=job.question, text=text, frame_tag=tag, timings=timings,
                            queue_ms=(now - job.t_submit) * 1e3 if queue_ms is None
                            else queue_ms, total_ms=(now - job.t_submit) * 1e3)
            if error is not None:
                answer.error_code, answer.error_message = error
            job.answer = answer
            # Nothing of the request outlives its answer: the image may be megabytes, the
            # callbacks hold the client's goal handle.
            job.image = job.on_text = job.on_stage = None
            job.done.set()
        self.counters['answered' if answer.success else f'error.{answer.error_code}'] += 1
        if answer.success:
            self._last_success = answer
        self.on_answer(answer)
