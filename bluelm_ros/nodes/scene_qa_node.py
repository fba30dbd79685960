"""Scene QA node: questions about what the camera sees, answered by a BlueLM-V model.

Interfaces: service ``~/ask`` (AskScene), action ``~/ask_stream`` (partial text as
feedback, cancellable), topic ``~/question`` (std_msgs/String) -> ``~/answer``
(SceneAnswer; every answer, whatever interface asked, is also published there).

Threading: the camera callback only keeps the newest frame. ONE model worker takes
requests in FIFO order; when the queue is empty and eager encoding is on, it encodes the
newest frame in the background (the paper's decoupled image encoding), so a later
question only pays for the text. Requests beyond ``queue_size`` get "busy" at once; a
request still queued or running after ``request_timeout`` gets "timeout". Service and
action callbacks wait for their request on their own executor thread (a reentrant
callback group; the executor has ``queue_size + 4`` threads), so waiting requests never
starve the camera or other callbacks. Every call gets an answer or an error.

A lifecycle node: configure loads the bundle (the shipped default when ``bundle_path`` is
empty), deactivate stops the worker and frees the sessions, autostart (default) makes
``ros2 run bluelm_ros scene_qa_node`` just work.
"""
import collections
from dataclasses import dataclass, field
import os
import threading
import time

from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.lifecycle import Node as LifecycleNode
from rclpy.lifecycle import TransitionCallbackReturn
from std_msgs.msg import Header, String

from bluelm_ros import image_codec, interfaces
from bluelm_ros.nodes import common
from bluelm_ros.seg.segmenter import ImageError, to_rgb_uint8

DEFAULT_BUNDLE = ('models', 'vlm', 'scene-tiny')
BUNDLE_HINT = ('Set bundle_path to a folder made by `bluelm-ros vlm-export` (or empty for the '
               'shipped default).')
INPUT_TYPES = ('raw', 'compressed')
ERRORS = ('no_image', 'bad_request', 'bad_image', 'busy', 'timeout', 'cancelled',
          'not_ready', 'internal')


def resolve_bundle_path(value):
    """Return the bundle folder for bundle_path ('' = shipped default)."""
    if not value:
        return common.package_file(*DEFAULT_BUNDLE)
    path = os.path.expanduser(value)
    if not os.path.isabs(path) and not os.path.exists(path):
        shipped = common.package_file('models', 'vlm', path)
        if os.path.exists(shipped):
            return shipped
    return path


class RequestError(Exception):
    """A request that cannot be answered: code is one of ERRORS."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


@dataclass
class Job:
    """One question on its way through the queue and the model worker."""

    question: str
    options: dict
    image: object = None          # RGB uint8 from the request, or None: latest frame
    header: object = None         # header of the request's image
    on_text: object = None        # callable(delta, full_text, n_tokens) for streaming
    cancel: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    t_submit: float = field(default_factory=time.monotonic)
    deadline: float = 0.0
    answer: object = None         # the SceneAnswer message once done
    stage: str = 'queued'


class SceneQANode(LifecycleNode):
    """BlueLM-V scene question answering on the newest camera frame."""

    def __init__(self, node_name='scene_qa_node', **kwargs):
        super().__init__(node_name, **kwargs)
        self.msg = interfaces.load('msg')
        self.srv = interfaces.load('srv')
        self.action = interfaces.load('action')
        self._declare_parameters()
        self.engine = None
        self.bundle_path = ''
        self.configure_error = ''
        self.slot = common.LatestSlot()
        self.warnings = common.ThrottledWarnings(self.get_logger(), 5.0)
        self._queue = collections.deque()
        self._cv = threading.Condition()
        self._worker = None
        self._sub = None
        self._context_sub = None
        self._scene_context = ''
        self._latest = None  # (rgb, header, key) of the newest decoded frame
        self._encoded_key = None
        self._next_eager = 0.0
        self.counters = collections.Counter()
        self.last = {}
        self.executor_threads = int(self.get_parameter('queue_size').value) + 4
        group = ReentrantCallbackGroup()
        # Interfaces exist in every state; requests while not active get "not_ready".
        self._answer_pub = self.create_publisher(self.msg.SceneAnswer, '~/answer', 10)
        self.create_service(self.srv.AskScene, '~/ask', self._on_ask, callback_group=group)
        self._action_server = ActionServer(
            self, self.action.AskScene, '~/ask_stream', self._on_goal_execute,
            goal_callback=lambda goal: GoalResponse.ACCEPT,
            cancel_callback=lambda handle: CancelResponse.ACCEPT, callback_group=group)
        self.create_subscription(String, '~/question', self._on_question, 10,
                                 callback_group=group)
        self.diagnostics = common.DiagnosticsPublisher(self)
        self.create_timer(self.get_parameter('diagnostics_period').value,
                          self.publish_diagnostics)
        common.lifecycle_autostart(self)

    def _declare_parameters(self):
        p = common.declare_param
        p(self, 'autostart', True, 'Configure and activate at startup.')
        p(self, 'bundle_path', '', f'VLM bundle folder. {BUNDLE_HINT}')
        p(self, 'vision_precision', 'int8', 'Vision graph to run.', choices=('int8', 'fp32'))
        p(self, 'decoder_precision', 'int4', 'Decoder graph to run.',
          choices=('int4', 'fp32'))
        p(self, 'providers', ['CPUExecutionProvider'], 'ONNX Runtime providers, in order.')
        p(self, 'threads', 0, 'ONNX Runtime intra-op threads (0 = all cores).',
          value_range=(0, 256))
        p(self, 'prefill_chunk', 128, 'Prompt tokens per decoder call (chunked prefill).',
          value_range=(1, 4096))
        p(self, 'input_type', 'raw', 'Subscribe to Image (raw) or image/compressed.',
          choices=INPUT_TYPES)
        common.declare_qos_parameters(self, 'qos', what='image')
        p(self, 'max_input_pixels', image_codec.DEFAULT_MAX_PIXELS,
          'Frames (or request images) larger than this are refused.',
          value_range=(1, 2**31 - 1))
        p(self, 'generation.max_new_tokens', 32, 'Default answer length limit (tokens).',
          value_range=(1, 4096))
        p(self, 'generation.temperature', 0.0, 'Default temperature (0 = greedy).',
          value_range=(0.0, 5.0))
        p(self, 'generation.top_k', 0, 'Default top-k (0 = off).', value_range=(0, 100000))
        p(self, 'generation.top_p', 1.0, 'Default nucleus mass (1 = off).',
          value_range=(0.0, 1.0))
        p(self, 'queue_size', 8, 'Requests waiting for the model; more get "busy".',
          value_range=(1, 256), read_only=True)
        p(self, 'request_timeout', 60.0, 'Seconds a request may wait + run before "timeout".',
          value_range=(0.1, 3600.0))
        p(self, 'eager_encoding', True,
          'Encode new frames in the background (decoupled image encoding).')
        p(self, 'eager_encoding_rate', 1.0, 'Max eager encodings per second.',
          value_range=(0.01, 100.0))
        p(self, 'max_question_chars', 500, 'Longer questions are refused.',
          value_range=(1, 100000))
        p(self, 'system_prompt', '', 'Optional system prompt for every question.')
        p(self, 'use_scene_context', False,
          'Add the segmentation class shares (scene_context topic) to the system prompt. '
          'The shipped model was not trained with it: use it with models that were.')
        p(self, 'diagnostics_period', 1.0, 'Seconds between /diagnostics messages.',
          value_range=(0.1, 60.0), read_only=True)

    def _param(self, name):
        return self.get_parameter(name).value

    # ------------------------------------------------------------------ lifecycle

    def on_configure(self, state):
        from bluelm_ros.vlm.runtime import VLMEngine
        path = resolve_bundle_path(self._param('bundle_path'))
        try:
            if not os.path.isdir(path):
                raise FileNotFoundError(f'VLM bundle folder not found: {path}. {BUNDLE_HINT}')
            engine = VLMEngine(path, vision_precision=self._param('vision_precision'),
                               decoder_precision=self._param('decoder_precision'),
                               threads=self._param('threads'),
                               prefill_chunk=self._param('prefill_chunk'),
                               providers=list(self._param('providers')))
            engine.load()
        except Exception as exc:  # BundleError/ModelFileError name the file and the fix
            self.configure_error = f'{exc}'
            if path not in self.configure_error:
                self.configure_error = f'cannot load VLM bundle {path}: {exc}. {BUNDLE_HINT}'
            self.get_logger().error(f'configure failed: {self.configure_error}')
            return TransitionCallbackReturn.FAILURE
        self.engine, self.bundle_path, self.configure_error = engine, path, ''
        self.get_logger().info(f'loaded VLM bundle {path} (vision '
                               f'{engine.vision_precision}, decoder {engine.decoder_precision})')
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state):
        from sensor_msgs.msg import CompressedImage, Image
        compressed = self._param('input_type') == 'compressed'
        topic = self.resolve_topic_name('image') + '/compressed' if compressed else 'image'
        self.slot.reopen()
        self.slot.clear()
        self._sub = self.create_subscription(
            CompressedImage if compressed else Image, topic, self.slot.put,
            common.qos_from_parameters(self, 'qos'))
        if self._param('use_scene_context'):
            self._context_sub = self.create_subscription(
                self.msg.ClassStats, 'scene_context', self._on_scene_context, 1)
        self._worker = common.WorkerThread(self._work, 'scene_qa_worker',
                                           wake=self._wake).start()
        self.get_logger().info(f'active: camera {self._sub.topic_name}, service '
                               f'{self.get_fully_qualified_name()}/ask')
        return TransitionCallbackReturn.SUCCESS

    def on_deactivate(self, state):
        self._stop()
        if self.engine is not None:
            self.engine.close()  # frees the sessions; configure/activate loads them again
        return TransitionCallbackReturn.SUCCESS

    def on_cleanup(self, state):
        self._stop()
        self.engine = None
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state):
        return self.on_cleanup(state)

    def on_error(self, state):
        return self.on_cleanup(state)

    def _stop(self):
        worker, self._worker = self._worker, None
        if worker is not None and not worker.stop(timeout=2.0):
            self.get_logger().warning('scene QA worker still finishing a model call')
        for sub in (self._sub, self._context_sub):
            if sub is not None:
                self.destroy_subscription(sub)
        self._sub = self._context_sub = None
        self.slot.clear()
        self._latest = None
        # Nothing queued is lost silently: every waiting request gets an error.
        with self._cv:
            pending, self._queue = list(self._queue), collections.deque()
        for job in pending:
            self._finish(job, error=('not_ready', 'the node was deactivated'))

    def destroy_node(self):
        """Stop the worker (bounded wait) before the node's handles go away."""
        if hasattr(self, '_cv'):  # the constructor may have failed on a bad parameter
            self._stop()
        super().destroy_node()

    def _wake(self):
        with self._cv:
            self._cv.notify_all()

    # ------------------------------------------------------------------ requests in

    def _on_scene_context(self, msg):
        parts = [f'{n} {100 * s:.0f}%' for n, s in zip(msg.class_names, msg.pixel_share)
                 if s >= 0.01]
        self._scene_context = 'The segmentation sees: ' + ', '.join(parts[:8]) + '.'

    def _on_question(self, msg):
        try:
            self.submit(msg.data)
        except RequestError as exc:
            self._answer_pub.publish(self._error_answer(msg.data, exc.code, str(exc)))

    def _on_ask(self, request, response):
        answer = self._ask_blocking(request)
        return self._fill_result(response, answer)

    def _on_goal_execute(self, goal_handle):
        goal = goal_handle.request
        fb_type = self.action.AskScene.Feedback

        def on_text(delta, text, n):
            goal_handle.publish_feedback(fb_type(stage='decoding', partial_answer=text,
                                                 new_text=delta, generated_tokens=n))
        job = None
        try:
            job = self._job_from_request(goal, on_text)
            position = self._enqueue(job)
            goal_handle.publish_feedback(fb_type(stage='queued', queue_position=position))
            while not job.done.wait(0.05):
                if goal_handle.is_cancel_requested:
                    job.cancel.set()
                if time.monotonic() > job.deadline + 5.0:
                    job.cancel.set()
                    self._finish(job, error=('timeout', 'request timed out'))
            answer = job.answer
        except RequestError as exc:
            answer = self._error_answer(goal.question, exc.code, str(exc))
        result = self._fill_result(self.action.AskScene.Result(), answer)
        if goal_handle.is_cancel_requested:
            goal_handle.canceled()
        elif answer.success:
            goal_handle.succeed()
        else:
            goal_handle.abort()
        return result

    def _ask_blocking(self, request):
        try:
            job = self._job_from_request(request)
            self._enqueue(job)
        except RequestError as exc:
            return self._error_answer(request.question, exc.code, str(exc))
        # Waits on this callback's own executor thread (reentrant group), never the worker.
        if not job.done.wait(max(job.deadline - time.monotonic(), 0) + 5.0):
            job.cancel.set()
            self._finish(job, error=('timeout', 'request timed out'))
        return job.answer

    def submit(self, question, image=None, options=None, on_text=None):
        """Queue a question (library use and the topic interface); return the Job."""
        job = Job(question=self._check_question(question),
                  options=self._options(options), image=image, on_text=on_text)
        self._enqueue(job)
        return job

    def _job_from_request(self, req, on_text=None):
        question = self._check_question(req.question)
        options = self._options(req.options)
        image, header = None, None
        try:
            if req.image.width or req.image.height or len(req.image.data):
                arr, order = image_codec.image_to_numpy(req.image,
                                                        self._param('max_input_pixels'))
                image, header = to_rgb_uint8(arr, order).copy(), req.image.header
            elif len(req.compressed_image.data):
                arr, order = image_codec.compressed_to_numpy(req.compressed_image,
                                                             self._param('max_input_pixels'))
                image, header = to_rgb_uint8(arr, order).copy(), req.compressed_image.header
        except (image_codec.FrameError, ImageError) as exc:
            raise RequestError('bad_image', f'the request image cannot be used: {exc}')
        return Job(question=question, options=options, image=image, header=header,
                   on_text=on_text)

    def _check_question(self, question):
        question = (question or '').strip()
        if not question:
            raise RequestError('bad_request', 'the question is empty')
        limit = self._param('max_question_chars')
        if len(question) > limit:
            raise RequestError('bad_request', f'the question has {len(question)} characters; '
                               f'the limit is {limit} (parameter max_question_chars)')
        return question

    def _options(self, opts):
        """Merge GenerationOptions (negative = default) with the node's parameters."""
        d = {'max_new_tokens': self._param('generation.max_new_tokens'),
             'temperature': self._param('generation.temperature'),
             'top_k': self._param('generation.top_k'),
             'top_p': self._param('generation.top_p'), 'seed': None, 'stop_strings': []}
        if opts is None:
            return d
        checks = (('max_new_tokens', 1, 4096), ('temperature', 0.0, 5.0),
                  ('top_k', 0, 100000), ('top_p', 0.0, 1.0))
        for name, lo, hi in checks:
            value = getattr(opts, name)
            if value < 0:
                continue
            if not lo <= value <= hi or (name == 'top_p' and value == 0.0):
                raise RequestError('bad_request', f'options.{name} = {value} is outside '
                                   f'[{lo}, {hi}] (negative = node default)')
            d[name] = value
        if opts.seed >= 0:
            d['seed'] = int(opts.seed)
        d['stop_strings'] = [s for s in opts.stop if s]
        return d

    def _enqueue(self, job):
        if common.lifecycle_state(self) != 'active' or self.engine is None:
            raise RequestError('not_ready', f'the node is {common.lifecycle_state(self)}'
                               + (f' ({self.configure_error})' if self.configure_error else ''))
        if job.image is None and not self.slot.pending() and self._latest is None:
            raise RequestError('no_image', 'no camera frame received yet on '
                               f'{self._sub.topic_name} and the request has no image')
        job.deadline = job.t_submit + self._param('request_timeout')
        with self._cv:
            if len(self._queue) >= self._param('queue_size'):
                self.counters['busy'] += 1
                raise RequestError('busy', f'{len(self._queue)} requests are already waiting '
                                   f'(queue_size); try again later')
            self._queue.append(job)
            self.counters['accepted'] += 1
            self._cv.notify_all()
            return len(self._queue) - 1

    # ------------------------------------------------------------------ model worker

    def _work(self, stop):
        while not stop.is_set():
            with self._cv:
                if not self._queue:
                    self._cv.wait(timeout=0.05)
                job = self._queue.popleft() if self._queue else None
            if stop.is_set():
                if job is not None:
                    self._finish(job, error=('not_ready', 'the node is shutting down'))
                break
            try:
                if job is not None:
                    self._answer(job)
                elif self._param('eager_encoding'):
                    self._eager_encode()
            except Exception as exc:  # one bad request or frame must not kill the worker
                if job is not None and not job.done.is_set():
                    self._finish(job, error=('internal', f'{type(exc).__name__}: {exc}'))
                else:
                    self.warnings.warn('internal', f'eager encoding failed: {exc}')

    def _refresh_latest(self):
        """Decode the newest camera frame, if a new one arrived; return (rgb, header, key)."""
        msg = self.slot.take(timeout=0)
        if msg is not None:
            try:
                arr, order = image_codec.frame_to_numpy(msg, self._param('max_input_pixels'))
                rgb = to_rgb_uint8(arr, order).copy()
                stamp = msg.header.stamp
                key = f'{msg.header.frame_id}@{stamp.sec}.{stamp.nanosec:09d}'
                self._latest = (rgb, msg.header, key)
            except (image_codec.FrameError, ImageError) as exc:
                reason = getattr(exc, 'reason', 'bad_image')
                self.counters[f'bad_frames.{reason}'] += 1
                self.warnings.warn(reason, f'skipped a camera frame: {exc}')
        return self._latest

    def _eager_encode(self):
        now = time.monotonic()
        if now < self._next_eager:
            return
        latest = self._refresh_latest()
        if latest is None or latest[2] == self._encoded_key:
            return
        rgb, _, key = latest
        self.engine.encode_image(rgb, key=key)
        self._encoded_key = key
        self._next_eager = now + 1.0 / self._param('eager_encoding_rate')
        self.counters['eager_encodings'] += 1

    def _answer(self, job):
        if job.cancel.is_set():
            return self._finish(job, error=('cancelled', 'cancelled before it started'))
        if time.monotonic() > job.deadline:
            return self._finish(job, error=('timeout', 'timed out waiting in the queue'))
        queue_ms = (time.monotonic() - job.t_submit) * 1e3
        if job.image is not None:
            image, key, header = job.image, None, job.header
        else:
            latest = self._refresh_latest()
            if latest is None:
                return self._finish(job, error=('no_image', 'no usable camera frame yet'))
            image, header, key = latest
        text = []

        def on_token(delta, token_id):
            if delta:
                text.append(delta)
                if job.on_text is not None:
                    job.on_text(delta, ''.join(text), len(text))
            if time.monotonic() > job.deadline:
                job.stage = 'timeout'
                return False
            return not job.cancel.is_set()

        system = self._param('system_prompt') or None
        if self._param('use_scene_context') and self._scene_context:
            system = ((system + ' ') if system else '') + self._scene_context
        o = job.options
        result = self.engine.generate(
            job.question, image=image, image_key=key, system=system,
            max_new_tokens=o['max_new_tokens'], temperature=o['temperature'],
            top_k=o['top_k'], top_p=o['top_p'], seed=o['seed'],
            stop_strings=o['stop_strings'], on_token=on_token, cancel=job.cancel)
        error = None
        if job.stage == 'timeout':
            error = ('timeout', f'generation passed request_timeout '
                     f'({self._param("request_timeout")} s); partial answer returned')
        elif result.stop_reason == 'cancelled':
            error = ('cancelled', 'cancelled by the client; partial answer returned')
        self._finish(job, result=result, header=header, queue_ms=queue_ms, error=error)

    def _finish(self, job, result=None, header=None, queue_ms=0.0, error=None):
        if job.done.is_set():
            return
        msg = self.msg.SceneAnswer()
        msg.header = header if header is not None else Header()
        msg.question = job.question
        if result is not None:
            msg.answer = result.text.strip()
            t = result.timings
            msg.timings = self.msg.Timings(
                queue_ms=float(queue_ms), image_encode_ms=float(t.image_encode_ms),
                image_cached=bool(t.image_cached), image_tiles=int(t.image_tiles),
                prefill_ms=float(t.prefill_ms), prompt_tokens=int(t.prompt_tokens),
                decode_ms=float(t.decode_ms), generated_tokens=int(t.generated_tokens),
                tokens_per_second=float(t.tokens_per_second))
        msg.timings.total_ms = float((time.monotonic() - job.t_submit) * 1e3)
        msg.success = error is None
        if error is not None:
            msg.error_code, msg.error_message = error
        job.answer = msg
        job.done.set()
        self.counters['answered' if msg.success else f'error.{msg.error_code}'] += 1
        if msg.success:
            self.last = {'latency_ms': msg.timings.total_ms,
                         'tokens_per_second': msg.timings.tokens_per_second}
        try:
            self._answer_pub.publish(msg)
        except Exception:  # publisher gone during shutdown: the caller still has it
            pass

    def _error_answer(self, question, code, message):
        msg = self.msg.SceneAnswer(question=question or '', success=False, error_code=code,
                                   error_message=message)
        self.counters[f'error.{code}'] += 1
        return msg

    @staticmethod
    def _fill_result(out, answer):
        out.success, out.answer = answer.success, answer.answer
        out.error_code, out.error_message = answer.error_code, answer.error_message
        out.image_header, out.timings = answer.header, answer.timings
        return out

    # ------------------------------------------------------------------ status

    def publish_diagnostics(self):
        """Publish queue depth, latency, tokens/s and image age on /diagnostics."""
        state = common.lifecycle_state(self)
        with self._cv:
            depth = len(self._queue)
        age = float('nan')
        if self._latest is not None:
            s = self._latest[1].stamp
            age = (self.get_clock().now().nanoseconds - (s.sec * 10**9 + s.nanosec)) / 1e9
        values = {'state': state, 'queue_depth': depth, 'image_age_s': age,
                  'last_latency_ms': self.last.get('latency_ms', float('nan')),
                  'last_tokens_per_second': self.last.get('tokens_per_second', float('nan')),
                  'bundle_path': self.bundle_path}
        values.update({k: v for k, v in sorted(self.counters.items())})
        values.update({f'frames.{k}': v for k, v in self.slot.counts().items()})
        level, message = common.DiagnosticsPublisher.OK, state
        if self.configure_error:
            level, message = common.DiagnosticsPublisher.ERROR, self.configure_error
        elif self._worker is not None and self._worker.error is not None:
            level, message = (common.DiagnosticsPublisher.ERROR,
                              f'worker died: {self._worker.error!r}')
        elif state == 'active':
            message = f'active: {depth} queued'
        return self.diagnostics.publish(level, message, values)


def main(args=None):
    """Entry point of `ros2 run bluelm_ros scene_qa_node`."""
    code = common.run_node(SceneQANode, args=args, executor_threads=16)
    if code:
        raise SystemExit(code)
