"""Scene QA node: questions about what the camera sees, answered by a BlueLM-V model.

Interfaces: service ``~/ask`` (AskScene), action ``~/ask_stream`` (partial text as
feedback, cancellable), topic ``~/question`` (std_msgs/String) -> ``~/answer``
(SceneAnswer; every answer and every error, whatever interface asked, is also published
there).

Threading: the camera callback only keeps the newest frame. ONE model worker takes
requests in FIFO order; when the queue is empty and eager encoding is on, it encodes the
newest frame in the background and prefills the prompt up to the end of the image (the
paper's decoupled image encoding), so a later question only pays for the text. Requests
beyond ``queue_size`` get "busy" at once; a request still queued or running after
``request_timeout`` gets "timeout". Service and action callbacks wait for their request
on their own executor thread (a reentrant callback group; ``run_node`` gives the executor
``queue_size + 4`` threads), so waiting requests never starve the camera or other
callbacks. Every call gets an answer or an error; no callback ever raises into the
executor.

Which frame a question is about: the request's own image if it has one; else, with eager
encoding on, the newest frame that is already encoded (at most about one
``1 / eager_encoding_rate`` period older than the newest received frame); else the newest
received frame, encoded on demand. ``image_header`` of the answer says which frame it was.

A lifecycle node: configure loads the bundle (the shipped default when ``bundle_path`` is
empty) and fails with a message naming the file and the fix; activate subscribes and
starts the worker; deactivate stops the worker, answers whatever is queued with
"not_ready" and frees the ONNX Runtime sessions (activate loads them again); autostart
(default) makes ``ros2 run bluelm_ros scene_qa_node`` just work. See docs/scene-qa-node.md.
"""
import collections
from dataclasses import dataclass, field
import math
import os
import threading
import time

from rcl_interfaces.msg import SetParametersResult
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.lifecycle import Node as LifecycleNode
from rclpy.lifecycle import TransitionCallbackReturn
from rclpy.qos import QoSProfile
from std_msgs.msg import Header, String

from bluelm_ros.ros import common, image_codec, interfaces
from bluelm_ros.runtime import shipped_models
from bluelm_ros.runtime.image import ImageError, MAX_PIXELS, to_rgb_uint8
from bluelm_ros.runtime.workers import LatestSlot, WorkerThread

EXPORT_CMD = 'bluelm-ros vlm-export'
BUNDLE_HINT = (f'Set bundle_path to a bundle folder written by `{EXPORT_CMD} MODEL_DIR OUT_DIR` '
               '(or leave it empty for the shipped scene-tiny bundle).')
DEFAULT_BUNDLE_HINT = (
    'The shipped scene-tiny bundle is not installed in this copy of bluelm_ros: train and '
    'export it (scripts/train_scene_vlm.sh, then '
    f'`{EXPORT_CMD} runs/scene-tiny bluelm_ros/models/vlm/scene-tiny` and '
    'scripts/setup.sh), or set bundle_path to another bundle folder.')
INPUT_TYPES = ('raw', 'compressed')
ERRORS = ('no_image', 'bad_request', 'bad_image', 'busy', 'timeout', 'cancelled',
          'not_ready', 'internal')

# Applied when the bundle is loaded (configure): changeable only while unconfigured.
MODEL_PARAMS = ('bundle_path', 'vision_precision', 'decoder_precision', 'providers', 'threads',
                'prefill_chunk')
# Applied when the subscriptions are created (activate): changeable while not active.
SUBSCRIPTION_PARAMS = ('input_type', 'qos.reliability', 'qos.durability', 'qos.depth',
                       'use_scene_context')
CHOICES = {'vision_precision': ('int8', 'fp32'), 'decoder_precision': ('int4', 'fp32'),
           'input_type': INPUT_TYPES, 'qos.reliability': common.RELIABILITY_CHOICES,
           'qos.durability': common.DURABILITY_CHOICES}
# Seconds a waiting service/action callback gives a running job past its deadline before
# answering "timeout" itself (the worker normally stops it within one token).
TIMEOUT_GRACE = 5.0
FEEDBACK_DEPTH = 100


def _request_qos():
    """Reliable, keep-all: a burst of requests waits in DDS instead of being overwritten."""
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, ReliabilityPolicy
    return QoSProfile(history=HistoryPolicy.KEEP_ALL, depth=0,
                      reliability=ReliabilityPolicy.RELIABLE,
                      durability=DurabilityPolicy.VOLATILE)


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
    image: object = None          # RGB uint8 from the request, or None: a camera frame
    header: object = None         # header of the request's image
    on_text: object = None        # callable(delta, full_text, n_tokens) for streaming
    on_stage: object = None       # callable(stage) for 'encoding', 'prefill'
    via: str = 'library'          # service, action, topic or library
    cancel: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    t_submit: float = field(default_factory=time.monotonic)
    deadline: float = math.inf
    answer: object = None         # the SceneAnswer message once done
    stage: str = 'queued'         # queued, running, timeout, shutdown


class SceneQANode(LifecycleNode):
    """BlueLM-V scene question answering on the newest camera frame."""

    def __init__(self, node_name='scene_qa_node', **kwargs):
        super().__init__(node_name, **kwargs)
        self.msg = interfaces.load('msg')
        self.srv = interfaces.load('srv')
        self.action = interfaces.load('action')
        # Everything _stop()/destroy_node() touch exists before the first thing that can
        # raise (a bad -p value in _declare_parameters).
        self._queue = collections.deque()
        self._cv = threading.Condition()
        self._finish_lock = threading.Lock()
        self._accepting = False
        self._worker = None
        self._current = None
        self._sub = None
        self._context_sub = None
        self._action_server = None
        self.slot = LatestSlot()
        self._declare_parameters()
        self.engine = None
        self.bundle_path = ''
        self.configure_error = ''
        self.input_topic = ''
        self.warnings = common.ThrottledWarnings(self.get_logger(), 5.0)
        self._scene_context = ''
        self._last_frame_header = None  # header of the newest received frame
        self._newest = None    # (rgb, header, key) of the newest decoded frame
        self._encoded = None   # (rgb, header, key) of the newest frame already encoded
        self._encoded_system = None  # the system prompt it was prepared with
        self._prepared = None  # (image key, system prompt) whose prefix is in the KV cache
        self._frame_seq = 0
        self._next_eager = 0.0
        self.counters = collections.Counter()
        self.last = {}
        self.executor_threads = int(self._param('queue_size')) + 4
        group = ReentrantCallbackGroup()
        # Interfaces exist in every state; requests while not active get "not_ready".
        self._answer_pub = self.create_publisher(self.msg.SceneAnswer, '~/answer', 10)
        # Requests are kept until the executor takes them (KEEP_ALL): with the default
        # keep-last-10 service QoS a burst of more than 10 calls silently loses the oldest.
        requests = _request_qos()
        self.create_service(self.srv.AskScene, '~/ask', self._on_ask, qos_profile=requests,
                            callback_group=group)
        self._action_server = ActionServer(
            self, self.action.AskScene, '~/ask_stream', self._on_goal_execute,
            goal_callback=lambda goal: GoalResponse.ACCEPT,
            cancel_callback=lambda handle: CancelResponse.ACCEPT, callback_group=group,
            goal_service_qos_profile=requests, result_service_qos_profile=requests,
            cancel_service_qos_profile=requests,
            # one feedback per token: a deeper history so a burst is not overwritten before
            # a client takes it (clients joining new_text need every one)
            feedback_pub_qos_profile=QoSProfile(depth=FEEDBACK_DEPTH))
        self.create_subscription(String, '~/question', self._on_question, requests,
                                 callback_group=group)
        self.diagnostics = common.DiagnosticsPublisher(self, f'{self.get_name()}: scene_qa')
        self.create_timer(self._param('diagnostics_period'), self.publish_diagnostics)
        self.add_on_set_parameters_callback(self._on_set_parameters)
        common.lifecycle_autostart(self)

    # ------------------------------------------------------------------ parameters

    def _declare_parameters(self):
        p = common.declare_param
        p(self, 'autostart', True,
          'Configure and activate on startup (off: wait for lifecycle transitions).',
          read_only=True)
        p(self, 'bundle_path', '',
          f'VLM bundle folder. {BUNDLE_HINT} A relative path is also looked up under the '
          'package models/vlm/ folder. Reconfigure to change.')
        p(self, 'vision_precision', 'int8', 'Vision graph to run. Reconfigure to change.',
          choices=CHOICES['vision_precision'])
        p(self, 'decoder_precision', 'int4', 'Decoder graph to run. Reconfigure to change.',
          choices=CHOICES['decoder_precision'])
        p(self, 'providers', ['CPUExecutionProvider'],
          'ONNX Runtime providers, in order of preference. Reconfigure to change.')
        p(self, 'threads', 0,
          'ONNX Runtime intra-op threads (0 = one per core). Reconfigure to change.',
          value_range=(0, 256))
        p(self, 'prefill_chunk', 128,
          'Prompt tokens per decoder call (chunked prefill). Reconfigure to change.',
          value_range=(1, 4096))
        p(self, 'input_type', 'raw',
          "raw: sensor_msgs/Image on 'image'; compressed: sensor_msgs/CompressedImage on "
          "'<resolved image topic>/compressed'. Change while inactive.", choices=INPUT_TYPES)
        common.declare_qos_parameters(self, 'qos', what='image')
        p(self, 'max_input_pixels', MAX_PIXELS,
          'Frames (or request images) larger than this are refused.',
          value_range=(1, MAX_PIXELS))
        p(self, 'generation.max_new_tokens', 32, 'Default answer length limit (tokens).',
          value_range=(1, 4096))
        p(self, 'generation.temperature', 0.0, 'Default temperature (0 = greedy).',
          value_range=(0.0, 5.0))
        p(self, 'generation.top_k', 0, 'Default top-k (0 = off).', value_range=(0, 100000))
        p(self, 'generation.top_p', 1.0, 'Default nucleus mass (1 = off).',
          value_range=(0.0, 1.0))
        p(self, 'queue_size', 8,
          'Requests waiting for the model (the running one not counted); more get "busy". '
          'The executor of run_node gets queue_size + 4 threads.',
          value_range=(1, 256), read_only=True)
        p(self, 'request_timeout', 60.0,
          'Seconds a request may wait + run before "timeout" (a running answer stops at the '
          'next token and returns its partial text).', value_range=(0.1, 3600.0))
        p(self, 'eager_encoding', True,
          'Encode new frames in the background (decoupled image encoding); questions are '
          'then about the newest encoded frame.')
        p(self, 'eager_encoding_rate', 1.0, 'Max eager encodings per second.',
          value_range=(0.01, 100.0))
        p(self, 'max_question_chars', 500, 'Longer questions are refused.',
          value_range=(1, 100000))
        p(self, 'system_prompt', '', 'Optional system prompt for every question.')
        p(self, 'use_scene_context', False,
          'Add the segmentation class shares (scene_context topic, bluelm_ros/ClassStats) to '
          'the system prompt. The shipped model was not trained with it: use it with models '
          'that were. Change while inactive.')
        p(self, 'diagnostics_period', 1.0, 'Seconds between /diagnostics messages.',
          value_range=(0.1, 60.0), read_only=True)

    def _param(self, name):
        return self.get_parameter(name).value

    def _on_set_parameters(self, params):
        state = common.lifecycle_state(self)
        for param in params:
            reason = common.parameter_change_reason(
                param.name, param.value, state, load_params=MODEL_PARAMS,
                subscription_params=SUBSCRIPTION_PARAMS, choices=CHOICES, loaded='bundle')
            if reason:
                return SetParametersResult(successful=False, reason=reason)
        return SetParametersResult(successful=True)

    # ------------------------------------------------------------------ lifecycle

    def on_configure(self, state):
        from bluelm_ros.runtime.ort_session import ModelFileError
        from bluelm_ros.runtime.vlm.bundle import BundleError
        from bluelm_ros.runtime.vlm.engine import VLMEngine
        path = shipped_models.resolve(self._param('bundle_path'), shipped_models.VLM_BUNDLE)
        try:
            if not os.path.isdir(path):
                hint = (DEFAULT_BUNDLE_HINT if not self._param('bundle_path')
                        else BUNDLE_HINT)
                raise BundleError(f'{path}: VLM bundle folder not found. {hint}')
            engine = VLMEngine(path, vision_precision=self._param('vision_precision'),
                               decoder_precision=self._param('decoder_precision'),
                               threads=self._param('threads'),
                               prefill_chunk=self._param('prefill_chunk'),
                               providers=list(self._param('providers')))
            engine.load()
        except Exception as exc:  # BundleError/ModelFileError name the file and the fix
            self.configure_error = str(exc)
            if not isinstance(exc, (BundleError, ModelFileError)) or path not in str(exc):
                self.configure_error = (f'cannot load VLM bundle {path}: '
                                        f'{type(exc).__name__}: {exc}. {BUNDLE_HINT}')
            self.get_logger().error(f'configure failed: {self.configure_error}')
            return TransitionCallbackReturn.FAILURE
        self.engine, self.bundle_path, self.configure_error = engine, path, ''
        self.get_logger().info(f'loaded VLM bundle {path} (vision '
                               f'{engine.vision_precision}, decoder {engine.decoder_precision}, '
                               f'context {engine.max_context} tokens)')
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state):
        from sensor_msgs.msg import CompressedImage, Image
        try:
            self.engine.load()  # deactivate freed the sessions
        except Exception as exc:
            self.get_logger().error(f'activate failed: cannot create the ONNX Runtime '
                                    f'sessions of {self.bundle_path}: {exc}')
            return TransitionCallbackReturn.FAILURE
        compressed = self._param('input_type') == 'compressed'
        # image_transport convention: one remap of `image` serves raw and compressed.
        topic = self.resolve_topic_name('image') + '/compressed' if compressed else 'image'
        self.input_topic = self.resolve_topic_name(topic)  # Subscription.topic_name: Iron+
        self.slot.reopen()
        self.slot.clear()
        self._newest = self._encoded = self._last_frame_header = self._prepared = None
        self._next_eager = 0.0
        self._sub = self.create_subscription(
            CompressedImage if compressed else Image, topic, self._on_image,
            common.qos_from_parameters(self, 'qos'))
        if self._param('use_scene_context'):
            self._context_sub = self.create_subscription(
                self.msg.ClassStats, 'scene_context', self._on_scene_context, 1)
        self._worker = WorkerThread(self._work, 'scene_qa_worker', wake=self._wake).start()
        with self._cv:
            self._accepting = True
        self.get_logger().info(f'active: camera {self.input_topic}, service '
                               f'{self.get_fully_qualified_name()}/ask')
        return TransitionCallbackReturn.SUCCESS

    def on_deactivate(self, state):
        self._stop('the node was deactivated')
        if self.engine is not None:
            self.engine.close()  # frees the sessions; activate loads them again
        return TransitionCallbackReturn.SUCCESS

    def on_cleanup(self, state):
        self._stop('the node was cleaned up')
        self.engine = None
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state):
        return self.on_cleanup(state)

    def on_error(self, state):
        return self.on_cleanup(state)

    def stop_workers(self):
        """Stop taking requests and answer every pending one (before executor shutdown).

        ``common.run_node`` and ``Bringup.stop`` call this first, so service and action
        callbacks waiting for an answer return and the executor can shut down at once.
        """
        self._stop('the node is shutting down')

    def _stop(self, reason):
        worker, self._worker = self._worker, None
        with self._cv:
            self._accepting = False
            if worker is not None:
                worker.stop_event.set()  # the worker pops jobs under this lock: no new one
            current = self._current
        if current is not None:
            current.stage = 'shutdown'
            current.cancel.set()  # the generation stops at the next token
        if worker is not None and not worker.stop(timeout=2.0):
            self.get_logger().warning('scene QA worker still finishing a model call')
        for sub in (self._sub, self._context_sub):
            if sub is not None:
                self.destroy_subscription(sub)
        self._sub = self._context_sub = None
        self.slot.clear()
        # Nothing queued is lost silently: every waiting request gets an error.
        with self._cv:
            pending, self._queue = list(self._queue), collections.deque()
        if current is not None:
            pending.append(current)  # no-op if the worker finished it
        for job in pending:
            self._finish(job, error=('not_ready', reason))
        self._newest = self._encoded = self._prepared = None

    def destroy_node(self):
        """Stop the worker (bounded wait) and answer pending requests, then destroy."""
        if hasattr(self, '_cv'):  # the constructor may have failed before it existed
            self._stop('the node is shutting down')
        server = getattr(self, '_action_server', None)
        if server is not None:  # rclpy's destroy_node leaves waitables (action servers)
            self._action_server = None
            server.destroy()
        super().destroy_node()

    def _wake(self):
        with self._cv:
            self._cv.notify_all()

    # ------------------------------------------------------------------ requests in

    def _on_image(self, msg):
        # Executor thread: only keep the newest frame; the worker decodes it.
        self._last_frame_header = msg.header
        self.slot.put(msg)

    def _on_scene_context(self, msg):
        parts = [f'{n} {100 * s:.0f}%' for n, s in zip(msg.class_names, msg.pixel_share)
                 if s >= 0.01]
        self._scene_context = ('The segmentation sees: ' + ', '.join(parts[:8]) + '.'
                               if parts else '')

    def _on_question(self, msg):
        try:
            self.submit(msg.data, via='topic')
        except RequestError as exc:
            self._error_answer(msg.data, exc.code, str(exc))
        except Exception as exc:  # never raise into the executor
            self._error_answer(msg.data, 'internal', f'{type(exc).__name__}: {exc}')

    def _on_ask(self, request, response):
        try:
            answer = self._ask_blocking(request)
        except Exception as exc:  # never raise into the executor (it would stop spinning)
            answer = self._error_answer(request.question, 'internal',
                                        f'{type(exc).__name__}: {exc}')
        return self._fill_result(response, answer)

    def _on_goal_execute(self, goal_handle):
        goal = goal_handle.request
        try:
            answer = self._run_goal(goal_handle)
        except Exception as exc:
            answer = self._error_answer(goal.question, 'internal',
                                        f'{type(exc).__name__}: {exc}')
        result = self._fill_result(self.action.AskScene.Result(), answer)
        try:
            # CANCELING -> SUCCEEDED/ABORTED is allowed: a cancel that came too late to stop
            # the answer still gets the full answer.
            if answer.error_code == 'cancelled' and goal_handle.is_cancel_requested:
                goal_handle.canceled()
            elif answer.success:
                goal_handle.succeed()
            else:
                goal_handle.abort()
        except Exception as exc:  # e.g. the node is being destroyed
            self.get_logger().warning(f'cannot set the goal state: {exc}')
        return result

    def _run_goal(self, goal_handle):
        goal = goal_handle.request
        fb_type = self.action.AskScene.Feedback

        def feedback(**fields):
            try:
                goal_handle.publish_feedback(fb_type(**fields))
            except Exception:  # a feedback that cannot go out never stops the answer
                self.counters['feedback_errors'] += 1

        try:
            job = self._job_from_request(goal, via='action')
            job.on_text = lambda delta, text, n: feedback(
                stage='decoding', partial_answer=text, new_text=delta, generated_tokens=n)
            job.on_stage = lambda stage, position=0: feedback(
                stage=stage, queue_position=position)
            self._enqueue(job)
        except RequestError as exc:
            return self._error_answer(goal.question, exc.code, str(exc))
        return self._wait(job, goal_handle)

    def _ask_blocking(self, request):
        try:
            job = self._job_from_request(request, via='service')
            self._enqueue(job)
        except RequestError as exc:
            return self._error_answer(request.question, exc.code, str(exc))
        return self._wait(job)

    def _wait(self, job, goal_handle=None):
        """Wait (on this callback's own executor thread) until the job is answered."""
        while not job.done.wait(0.05):
            if goal_handle is not None and goal_handle.is_cancel_requested:
                self._cancel(job)
            now = time.monotonic()
            if now > job.deadline:
                if self._withdraw(job, 'timeout', 'timed out waiting in the queue '
                                  f'(request_timeout {self._param("request_timeout")} s)'):
                    break
                if now > job.deadline + TIMEOUT_GRACE:
                    job.cancel.set()
                    self._finish(job, error=('timeout', 'request timed out'))
        return job.answer

    def submit(self, question, image=None, options=None, on_text=None, via='library'):
        """Queue a question (library use and the topic interface); return the Job.

        image: an RGB uint8 array (None: the camera). options: a GenerationOptions message
        (None: the node's defaults). Raises RequestError when it cannot be queued; wait on
        ``job.done``, then ``job.answer`` is the SceneAnswer.
        """
        job = Job(question=self._check_question(question), options=self._options(options),
                  image=image, on_text=on_text, via=via)
        self._enqueue(job)
        return job

    def ask(self, question, image=None, options=None, timeout=None):
        """Blocking library call: queue a question and return its SceneAnswer."""
        try:
            job = self.submit(question, image=image, options=options)
        except RequestError as exc:
            return self._error_answer(question, exc.code, str(exc))
        if not job.done.wait(timeout):
            self._cancel(job)
            if not job.done.wait(TIMEOUT_GRACE):
                self._finish(job, error=('timeout', f'no answer within {timeout} s'))
        return job.answer

    def _job_from_request(self, req, via):
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
        except ImageError as exc:
            reason = getattr(exc, 'reason', 'bad_image')
            raise RequestError('bad_image', f'the request image cannot be used ({reason}): '
                                            f'{exc}')
        return Job(question=question, options=options, image=image, header=header, via=via)

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
            # written so that NaN fails too
            if not lo <= value <= hi or (name == 'top_p' and value == 0.0):
                what = '(0, 1]' if name == 'top_p' else f'[{lo}, {hi}]'
                raise RequestError('bad_request', f'options.{name} = {value} is outside '
                                   f'{what} (negative = node default)')
            d[name] = value
        if opts.seed >= 0:
            d['seed'] = int(opts.seed)
        d['stop_strings'] = [s for s in opts.stop if s]
        return d

    def _enqueue(self, job):
        with self._cv:
            if not self._accepting or self.engine is None:
                state = common.lifecycle_state(self)
                detail = f' ({self.configure_error})' if self.configure_error else ''
                raise RequestError('not_ready', f'the node is {state}{detail}; it answers '
                                   'when active')
            if job.image is None and self._last_frame_header is None and self._newest is None:
                raise RequestError('no_image', f'no camera frame received yet on '
                                   f'{self.input_topic} and the request has no image')
            if len(self._queue) >= self._param('queue_size'):
                self.counters['busy'] += 1
                raise RequestError('busy', f'{len(self._queue)} requests are already waiting '
                                   f'(queue_size); try again later')
            job.deadline = job.t_submit + self._param('request_timeout')
            position = len(self._queue)
            # under the lock: the worker cannot start the job (and stream text) before this
            self._stage(job, 'queued', position)
            self._queue.append(job)
            self.counters['accepted'] += 1
            self._cv.notify_all()
            return position

    def _withdraw(self, job, code, message):
        """Remove a job that is still queued and finish it with an error; True if done so."""
        with self._cv:
            try:
                self._queue.remove(job)
            except ValueError:
                return False
        self._finish(job, error=(code, message))
        return True

    def _cancel(self, job):
        """Cancel a job: at once if still queued, else at the next generated token."""
        if not self._withdraw(job, 'cancelled', 'cancelled before it started'):
            job.cancel.set()

    # ------------------------------------------------------------------ model worker

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
                elif self._param('eager_encoding') and not stop.is_set():
                    self._eager_encode()
            except Exception as exc:  # one bad request or frame must not kill the worker
                if job is not None:
                    self._finish(job, error=self._exception_error(exc))
                else:
                    self.warnings.warn('eager', f'eager encoding failed: '
                                                f'{type(exc).__name__}: {exc}')
            finally:
                with self._cv:
                    self._current = None

    @staticmethod
    def _exception_error(exc):
        from bluelm_ros.runtime.vlm.engine import ContextOverflowError
        if isinstance(exc, ContextOverflowError):
            return ('bad_request', f'{exc}')
        if isinstance(exc, ImageError):
            return ('bad_image', f'{exc}')
        return ('internal', f'{type(exc).__name__}: {exc}')

    def _refresh_latest(self):
        """Decode the newest camera frame, if a new one arrived; return (rgb, header, key)."""
        msg = self.slot.take(timeout=0)
        if msg is not None:
            try:
                arr, order = image_codec.frame_to_numpy(msg, self._param('max_input_pixels'))
                rgb = to_rgb_uint8(arr, order).copy()
                self._frame_seq += 1
                # unique per received message: two frames never share an encoding, even with
                # equal (or zero) stamps
                self._newest = (rgb, msg.header, f'frame:{self._frame_seq}')
            except ImageError as exc:
                reason = getattr(exc, 'reason', 'bad_image')
                self.counters[f'bad_frames.{reason}'] += 1
                self.warnings.warn(reason, f'skipped a camera frame from {self.input_topic}: '
                                           f'{reason}: {exc}')
        return self._newest

    def _system_prompt(self):
        system = self._param('system_prompt') or None
        if self._param('use_scene_context') and self._scene_context:
            system = ((system + ' ') if system else '') + self._scene_context
        return system

    def _eager_encode(self):
        encoded, system = self._encoded, self._encoded_system
        if (encoded is not None and self._prepared != (encoded[2], system)
                and self.engine.cached_image(encoded[2]) is not None):
            # A question about a request image replaced the frame's prefix in the KV
            # cache: prefill it again (the encoding is cached; only the prefill runs).
            self.engine.prepare(image_key=encoded[2], system=system)
            self._prepared = (encoded[2], system)
            return
        now = time.monotonic()
        if now < self._next_eager:
            return
        latest = self._refresh_latest()
        if latest is None or (encoded is not None and latest[2] == encoded[2]):
            return
        rgb, _, key = latest
        # Encode and prefill up to the end of the image: a question then only pays for
        # its own tokens (the engine reuses the cached prefix). The system prompt (with
        # the scene context of this moment) stays with the frame, so a newer scene
        # context does not invalidate the prefix.
        system = self._system_prompt()
        self._prepared = None
        self.engine.prepare(rgb, image_key=key, system=system)
        self._encoded, self._encoded_system, self._prepared = latest, system, (key, system)
        self._next_eager = now + 1.0 / self._param('eager_encoding_rate')
        self.counters['eager_encodings'] += 1

    def _frame_for_question(self):
        latest = self._refresh_latest()
        encoded = self._encoded
        if (self._param('eager_encoding') and encoded is not None
                and self.engine.cached_image(encoded[2]) is not None):
            return encoded
        return latest

    def _answer(self, job):
        if job.cancel.is_set():
            return self._finish(job, error=('cancelled', 'cancelled before it started'))
        if time.monotonic() > job.deadline:
            return self._finish(job, error=('timeout', 'timed out waiting in the queue '
                                            f'(request_timeout {self._param("request_timeout")}'
                                            ' s)'))
        job.stage = 'running'
        engine = self.engine
        queue_ms = (time.monotonic() - job.t_submit) * 1e3
        frame = None
        if job.image is not None:
            image, header, key = job.image, job.header, engine.image_key(job.image)
        else:
            frame = self._frame_for_question()
            if frame is None:
                return self._finish(job, error=(
                    'no_image', f'no usable camera frame yet on {self.input_topic} (frames '
                    f'received but not decodable: see the warnings and /diagnostics)'))
            image, header, key = frame
        emb = engine.cached_image(key)
        cached = emb is not None
        system = self._system_prompt()
        if frame is not None and self._encoded is not None and frame[2] == self._encoded[2]:
            system = self._encoded_system
        if not cached:
            self._stage(job, 'encoding')
            emb = engine.encode_image(image, key=key)
            if frame is not None:
                self._encoded, self._encoded_system = frame, system
        self._stage(job, 'prefill')
        text, tokens = [], [0]

        def on_token(delta, token_id):
            # one call per generated token (delta may be '' while a character or a possible
            # stop string is incomplete), plus token_id -1 for text held back to the end
            if token_id >= 0:
                tokens[0] += 1
            if delta:
                text.append(delta)
            if job.on_text is not None and (delta or token_id >= 0):
                try:
                    job.on_text(delta, ''.join(text), tokens[0])
                except Exception:  # a streaming consumer never stops the answer
                    self.counters['feedback_errors'] += 1
            if time.monotonic() > job.deadline and job.stage == 'running':
                job.stage = 'timeout'
            return job.stage == 'running' and not job.cancel.is_set()

        o = job.options
        self._prepared = None  # unknown until generate returns
        result = engine.generate(
            job.question, image=emb, system=system,
            max_new_tokens=o['max_new_tokens'], temperature=o['temperature'],
            top_k=o['top_k'], top_p=o['top_p'], seed=o['seed'],
            stop_strings=o['stop_strings'], on_token=on_token, cancel=job.cancel)
        self._prepared = (key, system)
        t = result.timings
        t.image_cached = cached
        t.image_encode_ms = 0.0 if cached else emb.encode_ms
        error = None
        if job.stage == 'timeout':
            error = ('timeout', f'generation passed request_timeout '
                     f'({self._param("request_timeout")} s); partial answer returned')
        elif job.stage == 'shutdown':
            error = ('not_ready', 'the node stopped during generation; partial answer returned')
        elif result.stop_reason == 'cancelled':
            error = ('cancelled', 'cancelled by the client; partial answer returned')
        self._finish(job, result=result, header=header, queue_ms=queue_ms, error=error)

    def _stage(self, job, stage, position=0):
        if job.on_stage is not None:
            try:
                job.on_stage(stage, position)
            except Exception:
                self.counters['feedback_errors'] += 1

    def _finish(self, job, result=None, header=None, queue_ms=0.0, error=None):
        """Complete a job exactly once (later calls are no-ops); publish it on ~/answer."""
        with self._finish_lock:
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
            else:
                msg.timings.queue_ms = float((time.monotonic() - job.t_submit) * 1e3)
            msg.timings.total_ms = float((time.monotonic() - job.t_submit) * 1e3)
            msg.success = error is None
            if error is not None:
                msg.error_code, msg.error_message = error
            job.answer = msg
            job.done.set()
        self.counters['answered' if msg.success else f'error.{msg.error_code}'] += 1
        if msg.success:
            self.last = {'latency_ms': msg.timings.total_ms,
                         'tokens_per_second': msg.timings.tokens_per_second,
                         'ttft_ms': result.timings.time_to_first_token_ms}
        self._publish_answer(msg)

    def _publish_answer(self, msg):
        try:
            self._answer_pub.publish(msg)
        except Exception:  # publisher gone during shutdown: the caller still has it
            pass

    def _error_answer(self, question, code, message):
        """Return an immediate rejection (busy, bad_request, ...), counted and published."""
        msg = self.msg.SceneAnswer(question=question or '', success=False, error_code=code,
                                   error_message=message)
        self.counters[f'error.{code}'] += 1
        self._publish_answer(msg)
        return msg

    @staticmethod
    def _fill_result(out, answer):
        out.success, out.answer = answer.success, answer.answer
        out.error_code, out.error_message = answer.error_code, answer.error_message
        out.image_header, out.timings = answer.header, answer.timings
        return out

    # ------------------------------------------------------------------ status

    @property
    def queue_depth(self):
        """Requests waiting for the model (the running one not counted)."""
        with self._cv:
            return len(self._queue)

    @property
    def encoded_header(self):
        """Header of the newest camera frame already encoded (None if none)."""
        encoded = self._encoded
        return encoded[1] if encoded is not None else None

    def publish_diagnostics(self):
        """Publish queue depth, latency, tokens/s and image age on /diagnostics."""
        state = common.lifecycle_state(self)
        with self._cv:
            depth = len(self._queue)
            running = self._current is not None
        age = float('nan')
        header = self._last_frame_header
        if header is not None and (header.stamp.sec or header.stamp.nanosec):
            stamp_ns = header.stamp.sec * 10**9 + header.stamp.nanosec
            age = (self.get_clock().now().nanoseconds - stamp_ns) / 1e9
        values = {'state': state, 'input_topic': self.input_topic, 'queue_depth': depth,
                  'running': running, 'image_age_s': age,
                  'last_latency_ms': self.last.get('latency_ms', float('nan')),
                  'last_ttft_ms': self.last.get('ttft_ms', float('nan')),
                  'last_tokens_per_second': self.last.get('tokens_per_second', float('nan')),
                  'bundle_path': self.bundle_path}
        values.update({k: v for k, v in sorted(self.counters.items())})
        values.update({f'frames.{k}': v for k, v in self.slot.counts().items()})
        level, message = common.DiagnosticsPublisher.OK, state
        worker = self._worker
        if self.configure_error:
            level, message = (common.DiagnosticsPublisher.ERROR,
                              f'configure failed: {self.configure_error}')
        elif worker is not None and worker.error is not None:
            level, message = (common.DiagnosticsPublisher.ERROR,
                              f'worker died: {worker.error!r}')
        elif state == 'active':
            message = f'active: {depth} queued' + (', answering' if running else '')
        return self.diagnostics.publish(level, message, values)


def main(args=None):
    """Entry point of `ros2 run bluelm_ros scene_qa_node`."""
    code = common.run_node(SceneQANode, args=args)
    if code:
        raise SystemExit(code)


if __name__ == '__main__':
    main()
