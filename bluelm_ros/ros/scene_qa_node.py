"""Scene QA node: questions about what the camera sees, answered by a BlueLM-V model.

Interfaces: service ``~/ask`` (AskScene), action ``~/ask_stream`` (partial text as
feedback, cancellable), topic ``~/question`` (std_msgs/String) -> ``~/answer``
(SceneAnswer; every answer and every error, whatever interface asked, is also published
there).

The node is an adapter: parameters, lifecycle, QoS, diagnostics and message mapping
(scene_qa_messages.py). Queueing, the model worker, deadlines, eager encoding and which
frame a question is about live in :class:`~bluelm_ros.runtime.scene_qa_service.
SceneQAService` (``self.service``). Service and action callbacks wait for their question
on their own executor thread (a reentrant callback group; ``run_node`` gives the executor
``queue_size + 4`` threads), so waiting requests never starve the camera or other
callbacks. Every call gets an answer or an error; no callback ever raises into the
executor.

A lifecycle node: configure loads the bundle (the shipped default when ``bundle_path`` is
empty) and fails with a message naming the file and the fix; activate subscribes and
starts the service; deactivate stops it, answers whatever is queued with "not_ready" and
frees the ONNX Runtime sessions (activate loads them again); autostart (default) makes
``ros2 run bluelm_ros scene_qa_node`` just work. See docs/scene-qa-node.md.
"""
import os

from rcl_interfaces.msg import SetParametersResult
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.lifecycle import Node as LifecycleNode
from rclpy.lifecycle import TransitionCallbackReturn
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from std_msgs.msg import String

from bluelm_ros.ros import common, image_codec, interfaces
from bluelm_ros.ros import scene_qa_messages as messages
from bluelm_ros.ros import scene_qa_parameters as parameters
from bluelm_ros.ros.scene_qa_parameters import (BUNDLE_HINT, CHOICES, DEFAULT_BUNDLE_HINT,
                                                MODEL_PARAMS, SUBSCRIPTION_PARAMS)
from bluelm_ros.runtime import shipped_models
from bluelm_ros.runtime.image import to_rgb_uint8
from bluelm_ros.runtime.memory import limit_heap_retention
from bluelm_ros.runtime.ort_session import ModelFileError
from bluelm_ros.runtime.scene_qa_service import RequestError, SceneQAService
from bluelm_ros.runtime.vlm.bundle import BundleError
from bluelm_ros.runtime.vlm.engine import VLMEngine

FEEDBACK_DEPTH = 100
# ~/answer logs every answer: a queued burst of 100 is answered within seconds, so keep
# that many for a subscriber that takes them late (answers are small).
ANSWER_DEPTH = 128
# Seconds the action server keeps a finished goal (its result) for a client's late
# get_result: clients ask right after the goal is accepted, and rclpy's default (10 s on
# Kilted, 900 s on Humble) keeps every goal request, image included, that long.
RESULT_TIMEOUT = 5


def _request_qos():
    """Reliable, keep-all: a burst of requests waits in DDS instead of being overwritten."""
    return QoSProfile(history=HistoryPolicy.KEEP_ALL, depth=0,
                      reliability=ReliabilityPolicy.RELIABLE,
                      durability=DurabilityPolicy.VOLATILE)


class SceneQANode(LifecycleNode):
    """BlueLM-V scene question answering on the newest camera frame."""

    def __init__(self, node_name='scene_qa_node', **kwargs):
        super().__init__(node_name, **kwargs)
        self.msg = interfaces.load('msg')
        self.srv = interfaces.load('srv')
        self.action = interfaces.load('action')
        # Everything destroy_node() touches exists before the first thing that can raise
        # (a bad -p value in _declare_parameters).
        self._subs = []
        self._action_server = None
        self._in_flight = common.InFlight()  # service calls and goals being answered
        self.engine = None
        self.bundle_path = self.configure_error = self.input_topic = self.scene_context = ''
        self.last_frame_header = None  # header of the newest received frame
        self.warnings = common.ThrottledWarnings(self.get_logger(), 5.0)
        self.service = SceneQAService(self._settings, self._decode_frame,
                                      on_answer=self._publish_answer, warn=self.warnings.warn)
        parameters.declare(self)
        if self._param('heap_mmap_threshold'):  # request images: memory back when freed
            limit_heap_retention(self._param('heap_mmap_threshold'))
        self.executor_threads = int(self._param('queue_size')) + 4
        group = ReentrantCallbackGroup()
        # Interfaces exist in every state; requests while not active get "not_ready".
        self._answer_pub = self.create_publisher(self.msg.SceneAnswer, '~/answer',
                                                 ANSWER_DEPTH)
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
            feedback_pub_qos_profile=QoSProfile(depth=FEEDBACK_DEPTH),
            result_timeout=RESULT_TIMEOUT)
        self.create_subscription(String, '~/question', self._on_question, requests,
                                 callback_group=group)
        self.diagnostics = common.DiagnosticsPublisher(self, f'{self.get_name()}: scene_qa')
        self.create_timer(self._param('diagnostics_period'), self.publish_diagnostics)
        self.add_on_set_parameters_callback(self._on_set_parameters)
        common.lifecycle_autostart(self)

    # ------------------------------------------------------------------ parameters

    def _param(self, name):
        return self.get_parameter(name).value

    def _settings(self):
        return parameters.settings(self, self.scene_context)

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
        value = self._param('bundle_path')
        path = shipped_models.resolve(value, shipped_models.VLM_BUNDLE)
        try:
            if not os.path.isdir(path):
                hint = BUNDLE_HINT if value else DEFAULT_BUNDLE_HINT
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
        self.last_frame_header = None
        self._subs = [self.create_subscription(
            CompressedImage if compressed else Image, topic, self._on_image,
            common.qos_from_parameters(self, 'qos'))]
        if self._param('use_scene_context'):
            self._subs.append(self.create_subscription(
                self.msg.ClassStats, 'scene_context', self._on_scene_context, 1))
        self.service.start(self.engine, camera=self.input_topic)
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

        ``common.stop_spinning`` (``run_node``, ``Bringup.stop``) calls this first, while
        the executor still spins, so service and action callbacks waiting for an answer
        return and their replies go out; then it waits for ``replies_pending``.
        """
        self._stop('the node is shutting down')

    def replies_pending(self):
        """Service calls and action goals whose callback has not returned its reply yet."""
        return self._in_flight.count

    def _stop(self, reason):
        self.service.stop(reason)
        for sub in self._subs:
            self.destroy_subscription(sub)
        self._subs = []

    def destroy_node(self):
        """Stop the worker (bounded wait) and answer pending requests, then destroy."""
        if hasattr(self, 'service'):  # the constructor may have failed before it existed
            self._stop('the node is shutting down')
        server = getattr(self, '_action_server', None)
        if server is not None:  # rclpy's destroy_node leaves waitables (action servers)
            self._action_server = None
            server.destroy()
        super().destroy_node()

    # ------------------------------------------------------------------ messages in

    def _on_image(self, msg):
        # Executor thread: only keep the newest frame; the service's worker decodes it.
        self.last_frame_header = msg.header
        self.service.put_frame(msg)

    def _decode_frame(self, msg):
        arr, order = image_codec.frame_to_numpy(msg, self._param('max_input_pixels'))
        return to_rgb_uint8(arr, order).copy(), msg.header

    def _on_scene_context(self, msg):
        parts = [f'{n} {100 * s:.0f}%' for n, s in zip(msg.class_names, msg.pixel_share)
                 if s >= 0.01]
        self.scene_context = ('The segmentation sees: ' + ', '.join(parts[:8]) + '.'
                              if parts else '')

    def _submit(self, question, request=None, image=None, on_text=None, on_stage=None):
        """Queue a question: of an AskScene request (its image, its options) or plain."""
        question = self.service.check_question(question)
        generation = messages.generation(getattr(request, 'options', None),
                                         self._settings().generation)
        tag = None
        if request is not None:
            image, tag = (messages.request_image(request, self._param('max_input_pixels'))
                          or (None, None))
            messages.drop_request_images(request)  # decoded: the message's copy can go
        try:
            return self.service.submit(question, image=image, image_tag=tag,
                                       generation=generation, on_text=on_text,
                                       on_stage=on_stage)
        except RequestError as exc:
            if exc.code != 'not_ready':
                raise
            detail = f' ({self.configure_error})' if self.configure_error else ''
            raise RequestError('not_ready', f'the node is {common.lifecycle_state(self)}'
                                            f'{detail}; it answers when active') from None

    def _answer(self, request, goal_handle=None):
        """Submit a request and wait for it (on this callback's executor thread)."""
        def feedback(**fields):
            try:
                goal_handle.publish_feedback(self.action.AskScene.Feedback(**fields))
            except Exception:  # a feedback that cannot go out never stops the answer
                self.service.counters['feedback_errors'] += 1

        def on_text(delta, text, n):
            feedback(stage='decoding', partial_answer=text, new_text=delta, generated_tokens=n)

        def on_stage(stage, position=0):
            feedback(stage=stage, queue_position=position)
        streaming = goal_handle is not None
        try:
            job = self._submit(request.question, request, on_text=on_text if streaming else None,
                               on_stage=on_stage if streaming else None)
        except RequestError as exc:
            return self.service.reject(request.question, exc.code, str(exc))
        return self.service.wait(job, lambda: streaming and goal_handle.is_cancel_requested)

    def _answer_msg(self, request, goal_handle=None):
        try:
            answer = self._answer(request, goal_handle)
        except Exception as exc:  # never raise into the executor (it would stop spinning)
            answer = self.service.reject(request.question, 'internal',
                                         f'{type(exc).__name__}: {exc}')
        return messages.answer_msg(self.msg, answer)

    def _on_question(self, msg):
        try:
            self._submit(msg.data)  # the answer goes out on ~/answer
        except RequestError as exc:
            self.service.reject(msg.data, exc.code, str(exc))
        except Exception as exc:  # never raise into the executor
            self.service.reject(msg.data, 'internal', f'{type(exc).__name__}: {exc}')

    def _on_ask(self, request, response):
        with self._in_flight:
            return messages.fill_result(response, self._answer_msg(request))

    def _on_goal_execute(self, goal_handle):
        with self._in_flight:
            return self._execute_goal(goal_handle)

    def _execute_goal(self, goal_handle):
        try:
            answer = self._answer_msg(goal_handle.request, goal_handle)
        finally:
            # The server keeps the goal request until the result expires: not its image.
            messages.drop_request_images(goal_handle.request)
        result = messages.fill_result(self.action.AskScene.Result(), answer)
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

    def ask(self, question, image=None, timeout=None):
        """Blocking library call: a question (RGB ``image`` or the camera) -> SceneAnswer."""
        try:
            answer = self.service.wait(self._submit(question, image=image), timeout=timeout)
        except RequestError as exc:
            answer = self.service.reject(question, exc.code, str(exc))
        return messages.answer_msg(self.msg, answer)

    # ------------------------------------------------------------------ messages out

    def _publish_answer(self, answer):
        try:
            self._answer_pub.publish(messages.answer_msg(self.msg, answer))
        except Exception:  # publisher gone during shutdown: the caller still has it
            pass

    @property
    def encoded_header(self):
        """Header of the newest camera frame already encoded (None if none)."""
        encoded = self.service.status().encoded
        return encoded.frame.tag if encoded is not None else None

    def publish_diagnostics(self):
        """Publish queue depth, latency, tokens/s and image age on /diagnostics."""
        state = common.lifecycle_state(self)
        status = self.service.status()
        age = float('nan')
        header = self.last_frame_header
        if header is not None and (header.stamp.sec or header.stamp.nanosec):
            stamp_ns = header.stamp.sec * 10**9 + header.stamp.nanosec
            age = (self.get_clock().now().nanoseconds - stamp_ns) / 1e9
        last = status.last_success
        nan = float('nan')
        values = {'state': state, 'input_topic': self.input_topic,
                  'queue_depth': status.queue_depth, 'running': status.running,
                  'image_age_s': age, 'last_latency_ms': last.total_ms if last else nan,
                  'last_ttft_ms': last.timings.time_to_first_token_ms if last else nan,
                  'last_tokens_per_second': last.timings.tokens_per_second if last else nan,
                  'bundle_path': self.bundle_path}
        values.update({k: v for k, v in sorted(self.service.counters.items())})
        values.update({f'frames.{k}': v for k, v in self.service.frame_counts().items()})
        level, message = common.DiagnosticsPublisher.OK, state
        if self.configure_error:
            level, message = (common.DiagnosticsPublisher.ERROR,
                              f'configure failed: {self.configure_error}')
        elif status.worker_error is not None:
            level, message = (common.DiagnosticsPublisher.ERROR,
                              f'worker died: {status.worker_error!r}')
        elif state == 'active':
            message = (f'active: {status.queue_depth} queued'
                       + (', answering' if status.running else ''))
        return self.diagnostics.publish(level, message, values)


def main(args=None):
    """Entry point of `ros2 run bluelm_ros scene_qa_node`."""
    common.exit_process(common.run_node(SceneQANode, args=args))


if __name__ == '__main__':
    main()
