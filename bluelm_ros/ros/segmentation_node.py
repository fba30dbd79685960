"""Segmentation node: camera frames in, DSNet class-id masks out.

A lifecycle node. configure loads the model (and fails with a message naming the file and
the fix), activate subscribes and starts the worker, deactivate stops both, cleanup frees
the model. With ``autostart`` (default) it configures and activates itself, so
``ros2 run bluelm_ros segmentation_node --ros-args -r image:=/camera/image_raw`` just works.

Threading: the subscription callback only stores the newest message in a one-slot
mailbox; one worker thread decodes, runs the model and publishes. Stale frames are
replaced (counted as dropped), the executor never blocks on inference and memory does
not grow with the camera rate. See docs/segmentation-node.md.
"""
import collections
import os
import threading
import time

import numpy as np
from rcl_interfaces.msg import SetParametersResult
from rclpy.lifecycle import Node as LifecycleNode
from rclpy.lifecycle import TransitionCallbackReturn
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

from bluelm_ros.ros import common, image_codec
from bluelm_ros.runtime import shipped_models
from bluelm_ros.runtime.image import ImageError, MAX_PIXELS, to_rgb_uint8
from bluelm_ros.runtime.labels import IGNORE_ID
from bluelm_ros.runtime.memory import limit_heap_retention
from bluelm_ros.runtime.ort_session import ModelFileError
from bluelm_ros.runtime.segmenter import EXPORT_HINT, overlay, Segmenter
from bluelm_ros.runtime.workers import LatestSlot, WorkerThread

# Applied when the model is loaded (configure): changeable only while unconfigured.
MODEL_PARAMS = ('model_path', 'label_set', 'providers', 'threads', 'spinning',
                'input_height', 'input_width', 'label_info_type')
# Applied when the subscription is created (activate): changeable while not active.
SUBSCRIPTION_PARAMS = ('input_type', 'qos.reliability', 'qos.durability', 'qos.depth')
# Every other parameter is read by the worker for every frame: it changes any time.

INPUT_TYPES = ('raw', 'compressed')
LOST_FRAMES_FIX = (
    'Frames bigger than the DDS transport carries are dropped before they reach any node '
    '(Fast DDS: best-effort frames above its 512 KB shared-memory segment; a 4K bgr8 frame '
    'is 24.9 MB). Give the camera driver and this node the large-frame profile: export '
    'FASTDDS_DEFAULT_PROFILES_FILE=<bluelm_ros share>/config/fastdds_large_frames.xml '
    'RMW_FASTRTPS_USE_QOS_FROM_XML=1 (the bluelm_ros launch files set both for their '
    'nodes), or publish reliable and set qos.reliability:=reliable. docs/segmentation-node.md')
LABEL_INFO_TYPES = ('auto', 'vision_msgs', 'bluelm_ros')


def _output_qos():
    # Reliable matches reliable and best-effort subscribers (rviz, rosbag); keep-last 1 so a
    # slow subscriber never makes us queue old masks.
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1,
                      reliability=ReliabilityPolicy.RELIABLE,
                      durability=DurabilityPolicy.VOLATILE)


def _load_label_info_type(kind):
    """Return ('vision_msgs'|'bluelm_ros', message class) for label_info_type."""
    if kind in ('auto', 'vision_msgs'):
        try:
            from vision_msgs.msg import LabelInfo
            return 'vision_msgs', LabelInfo
        except ImportError:
            if kind == 'vision_msgs':
                raise ModelFileError(
                    'label_info_type is vision_msgs but vision_msgs is not installed: '
                    'install ros-$ROS_DISTRO-vision-msgs or set label_info_type to auto')
    from bluelm_ros.ros import interfaces
    return 'bluelm_ros', interfaces.load('msg').SegmentationLabels


class SegmentationNode(LifecycleNode):
    """DSNet semantic segmentation of a camera stream (see the module docstring)."""

    def __init__(self, node_name='segmentation_node', **kwargs):
        super().__init__(node_name, **kwargs)
        self._declare_parameters()
        self.segmenter = None
        self.model_path = ''
        self.configure_error = ''
        self.slot = LatestSlot()
        self.warnings = common.ThrottledWarnings(
            self.get_logger(), self.get_parameter('warn_throttle_sec').value)
        self._lock = threading.Lock()
        self.bad_frames = {}
        self._counters = collections.Counter()
        self.last = {}  # timings of the last processed frame (ms)
        # (stamp_ns, t_receive, t_publish, model_ms, total_ms) of recent frames (monotonic s)
        self.frame_log = collections.deque(maxlen=512)
        self._pubs = {}
        self._sub = None
        self._worker = None
        self.input_topic = ''
        self.label_info_kind = ''
        self._label_type = None
        self.label_info = None
        self._in_rate = common.RateMeter()
        self._out_rate = common.RateMeter()
        self._bad_seen = 0
        self._lost_seen = 0
        self.diagnostics = common.DiagnosticsPublisher(self, f'{self.get_name()}: segmentation')
        self.create_timer(self.get_parameter('diagnostics_period').value,
                          self.publish_diagnostics)
        self.add_on_set_parameters_callback(self._on_set_parameters)
        common.lifecycle_autostart(self)

    # ------------------------------------------------------------------ parameters

    def _declare_parameters(self):
        p = common.declare_param
        p(self, 'autostart', True,
          'Configure and activate on startup (off: wait for lifecycle transitions).',
          read_only=True)
        p(self, 'model_path', '',
          'DSNet ONNX export (bluelm-ros dsnet-export). Empty: the shipped INT8 model; a '
          'relative path is also looked up under the package models/dsnet/ and models/. '
          'Reconfigure to change.')
        p(self, 'label_set', '',
          'Label set name (cityscapes, ade20k, custom). Empty: the one in the model '
          'metadata. Reconfigure to change.')
        p(self, 'providers', ['CPUExecutionProvider'],
          'ONNX Runtime execution providers in order of preference; unavailable ones fall '
          'back to CPU with a warning. Reconfigure to change.')
        p(self, 'threads', 0,
          'ONNX Runtime intra-op threads (0: one per core). Reconfigure to change.',
          value_range=(0, 256))
        p(self, 'spinning', False,
          "ONNX Runtime pool threads busy-wait between operators: INT8 DSNet runs 3-9 % "
          "faster here (bench/results/dsnet.json), but the spin takes cores from other "
          "work, such as the scene-QA model in the same process. Reconfigure to change.")
        p(self, 'input_height', 0,
          'Expected model input height; must match the (static) model. 0: take the '
          "model's. Reconfigure to change.", value_range=(0, 8192))
        p(self, 'input_width', 0,
          'Expected model input width; must match the (static) model. 0: take the '
          "model's. Reconfigure to change.", value_range=(0, 8192))
        p(self, 'label_info_type', 'auto',
          'Message type of ~/label_info: vision_msgs/LabelInfo if importable (auto), or '
          'bluelm_ros/SegmentationLabels (has the palette). Reconfigure to change.',
          choices=LABEL_INFO_TYPES)
        p(self, 'input_type', 'raw',
          "raw: sensor_msgs/Image on 'image'; compressed: sensor_msgs/CompressedImage "
          "(jpeg/png) on '<resolved image topic>/compressed'. Change while inactive.",
          choices=INPUT_TYPES)
        common.declare_qos_parameters(self, 'qos', what='image')
        p(self, 'enabled', True, 'Run inference (false: incoming frames are ignored).')
        p(self, 'max_rate', 0.0,
          'Most frames per second to process (0: as fast as the model runs).',
          value_range=(0.0, 1000.0))
        p(self, 'overlay_alpha', 0.5, 'Mask weight in ~/overlay (0: image only, 1: mask only).',
          value_range=(0.0, 1.0))
        p(self, 'publish_colored_mask', True,
          'Publish ~/colored_mask (computed only while someone subscribes).')
        p(self, 'publish_overlay', True,
          'Publish ~/overlay (computed only while someone subscribes).')
        p(self, 'publish_class_stats', True,
          'Publish ~/class_stats (computed only while someone subscribes).')
        p(self, 'max_input_pixels', MAX_PIXELS,
          'Larger frames are skipped as too_large (protects against corrupt headers).',
          value_range=(1, MAX_PIXELS))
        p(self, 'warn_throttle_sec', 5.0,
          'At most one bad-frame warning per reason per this many seconds.',
          value_range=(0.0, 3600.0))
        p(self, 'diagnostics_period', 1.0, 'Seconds between /diagnostics messages.',
          value_range=(0.1, 60.0), read_only=True)

    def _param(self, name):
        return self.get_parameter(name).value

    def _on_set_parameters(self, params):
        state = common.lifecycle_state(self)
        choices = {'input_type': INPUT_TYPES, 'label_info_type': LABEL_INFO_TYPES,
                   'qos.reliability': common.RELIABILITY_CHOICES,
                   'qos.durability': common.DURABILITY_CHOICES}
        for param in params:
            name, value = param.name, param.value
            reason = common.parameter_change_reason(
                name, value, state, load_params=MODEL_PARAMS,
                subscription_params=SUBSCRIPTION_PARAMS, choices=choices)
            if reason:
                return SetParametersResult(successful=False, reason=reason)
            if name == 'warn_throttle_sec':
                self.warnings.period_sec = float(value)
        return SetParametersResult(successful=True)

    # ------------------------------------------------------------------ lifecycle

    def on_configure(self, state):
        path = shipped_models.resolve(self._param('model_path'), shipped_models.DSNET)
        try:
            kind, label_type = _load_label_info_type(self._param('label_info_type'))
            segmenter = Segmenter(path, providers=list(self._param('providers')),
                                  threads=self._param('threads'),
                                  spinning=self._param('spinning'),
                                  label_set=self._param('label_set') or None)
            want = (self._param('input_height'), self._param('input_width'))
            if any(want) and want != tuple(segmenter.input_size):
                h, w = segmenter.input_size
                raise ModelFileError(
                    f'{path} has a static {h}x{w} (HxW) input but input_height/input_width '
                    f'ask for {want[0]}x{want[1]}. Export the model at that size '
                    f'(`bluelm-ros dsnet-export CHECKPOINT --height {want[0]} --width '
                    f'{want[1]} --out model.onnx`) and set model_path to it, or set '
                    'input_height and input_width to 0 to use the model size.')
        except Exception as exc:  # ModelFileError names file + fix; anything else too
            self.configure_error = str(exc)
            if not isinstance(exc, ModelFileError):
                self.configure_error = (f'cannot load {path}: {type(exc).__name__}: {exc}. '
                                        f'{EXPORT_HINT}')
            self.get_logger().error(f'configure failed: {self.configure_error}')
            return TransitionCallbackReturn.FAILURE
        for warning in segmenter.provider_warnings:
            self.get_logger().warning(warning)
        self.segmenter, self.model_path, self.configure_error = segmenter, path, ''
        self.label_info_kind, self._label_type = kind, label_type
        from sensor_msgs.msg import Image
        from bluelm_ros.ros import interfaces
        self._pubs = {
            'mask': self.create_publisher(Image, '~/mask', _output_qos()),
            'colored_mask': self.create_publisher(Image, '~/colored_mask', _output_qos()),
            'overlay': self.create_publisher(Image, '~/overlay', _output_qos()),
            'class_stats': self.create_publisher(
                interfaces.load('msg').ClassStats, '~/class_stats', _output_qos()),
            'label_info': self.create_publisher(label_type, '~/label_info',
                                                common.latched_qos()),
        }
        self.get_logger().info(
            f'loaded {os.path.basename(path)}: {segmenter.variant} {segmenter.precision}, '
            f'{segmenter.num_classes} classes ({segmenter.labels.name}), input '
            f'{segmenter.input_size[0]}x{segmenter.input_size[1]}, providers '
            f'{", ".join(segmenter.providers)}')
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state):
        from sensor_msgs.msg import CompressedImage, Image
        compressed = self._param('input_type') == 'compressed'
        # image_transport convention: one remap of `image` serves raw and compressed.
        topic = self.resolve_topic_name('image') + '/compressed' if compressed else 'image'
        self.slot.reopen()
        self.slot.clear()
        self._sub = common.create_subscription_counting_losses(
            self, CompressedImage if compressed else Image, topic, self._on_image,
            common.qos_from_parameters(self, 'qos'), self._on_frames_lost)
        self.input_topic = self.resolve_topic_name(topic)  # Subscription.topic_name: Iron+
        self.label_info = self._make_label_info()
        self._pubs['label_info'].publish(self.label_info)
        self._worker = WorkerThread(self._work, 'segmentation_worker',
                                    wake=self.slot.close).start()
        self.get_logger().info(
            f'active: {self.input_topic} ({"CompressedImage" if compressed else "Image"}) '
            f'-> {self.get_fully_qualified_name()}/mask')
        return TransitionCallbackReturn.SUCCESS

    def on_deactivate(self, state):
        self._stop_worker()
        if self._sub is not None:
            self.destroy_subscription(self._sub)
            self._sub = None
        self.slot.clear()
        return TransitionCallbackReturn.SUCCESS

    def on_cleanup(self, state):
        self._release()
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state):
        self._release()
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state):
        self._release()
        return TransitionCallbackReturn.SUCCESS

    def _release(self):
        self._stop_worker()
        if self._sub is not None:
            self.destroy_subscription(self._sub)
            self._sub = None
        for pub in self._pubs.values():
            self.destroy_publisher(pub)
        self._pubs = {}
        self.segmenter = None  # frees the ORT session and its arena

    def _stop_worker(self):
        # getattr: rclpy destroys a node whose __init__ failed (bad -p value) at shutdown.
        worker, self._worker = getattr(self, '_worker', None), None
        if worker is not None and not worker.stop(timeout=2.0):
            self.get_logger().warning('segmentation worker did not stop within 2 s '
                                      '(a model run in progress); it exits after it')

    def destroy_node(self):
        """Stop the worker (bounded wait) before the node's handles go away."""
        self._stop_worker()
        super().destroy_node()

    def _make_label_info(self):
        labels = self.segmenter.labels
        msg = self._label_type()
        msg.header.stamp = self.get_clock().now().to_msg()
        if self.label_info_kind == 'vision_msgs':
            from vision_msgs.msg import VisionClass
            msg.class_map = [VisionClass(class_id=i, class_name=n)
                             for i, n in enumerate(labels.names)]
            return msg
        msg.label_set = labels.name
        msg.model_variant = f'{self.segmenter.variant} {self.segmenter.precision}'
        msg.num_classes = self.segmenter.num_classes
        msg.class_ids = list(range(labels.num_classes))
        msg.class_names = list(labels.names)
        msg.palette = labels.palette()[:labels.num_classes].reshape(-1).tolist()
        msg.ignore_id = IGNORE_ID
        return msg

    # ------------------------------------------------------------------ data path

    def _on_image(self, msg):
        # Executor thread: never decode or infer here, only keep the newest frame.
        if not self._param('enabled'):
            self._counters['skipped_disabled'] += 1
            return
        self.slot.put((msg, time.monotonic()))

    def _on_frames_lost(self, count):
        # Once: the count keeps growing on /diagnostics (lost), the fix does not change.
        first = self._counters['lost'] == 0
        self._counters['lost'] += count
        if first:
            self.get_logger().warning(
                f'{count} frame(s) on {self.input_topic} were lost in DDS before reaching '
                f'this node. {LOST_FRAMES_FIX}')

    def _work(self, stop):
        next_start = 0.0
        while not stop.is_set():
            max_rate = self._param('max_rate')
            if max_rate > 0:
                delay = next_start - time.monotonic()
                if delay > 0:
                    # Frames arriving meanwhile replace each other: the newest one runs next.
                    stop.wait(min(delay, 0.1))
                    continue
            item = self.slot.take(timeout=0.1)
            if item is None or stop.is_set():
                continue
            if not self._param('enabled'):
                continue
            next_start = time.monotonic() + (1.0 / max_rate if max_rate > 0 else 0.0)
            msg, t_receive = item
            try:
                self._process(msg, t_receive)
            except ImageError as exc:
                self._bad_frame(exc.reason, msg, str(exc))
            except Exception as exc:  # never let one frame kill the worker
                if stop.is_set():
                    break  # publishers/context torn down under us during shutdown
                self._bad_frame('internal', msg, f'{type(exc).__name__}: {exc}')

    def _bad_frame(self, reason, msg, detail):
        with self._lock:
            self.bad_frames[reason] = self.bad_frames.get(reason, 0) + 1
        frame_id = getattr(getattr(msg, 'header', None), 'frame_id', '')
        self.warnings.warn(reason, f'skipped a frame from {self.input_topic} '
                                   f'(frame_id {frame_id!r}): {reason}: {detail}')

    def _process(self, msg, t_receive):
        segmenter, pubs = self.segmenter, self._pubs  # stable refs if a transition races
        image, order = image_codec.frame_to_numpy(msg, self._param('max_input_pixels'))
        result = segmenter.segment(image, order)
        mask = result.mask
        encoding = 'mono8' if mask.dtype == np.uint8 else '16UC1'
        header = msg.header
        pubs['mask'].publish(image_codec.numpy_to_image(mask, encoding, header))
        t_publish = time.monotonic()

        want_color = (self._param('publish_colored_mask')
                      and pubs['colored_mask'].get_subscription_count() > 0)
        want_overlay = (self._param('publish_overlay')
                        and pubs['overlay'].get_subscription_count() > 0)
        if want_color or want_overlay:
            color = segmenter.colorize(mask)
            if want_color:
                pubs['colored_mask'].publish(image_codec.numpy_to_image(color, 'rgb8', header))
                self._counters['colored_mask'] += 1
            if want_overlay:
                blended = overlay(to_rgb_uint8(image, order), color,
                                  self._param('overlay_alpha'))
                pubs['overlay'].publish(image_codec.numpy_to_image(blended, 'rgb8', header))
                self._counters['overlay'] += 1
        if (self._param('publish_class_stats')
                and pubs['class_stats'].get_subscription_count() > 0):
            pubs['class_stats'].publish(self._class_stats_msg(segmenter, mask, header))
            self._counters['class_stats'] += 1

        stamp_ns = header.stamp.sec * 1_000_000_000 + header.stamp.nanosec
        latency = float('nan')
        if stamp_ns:
            latency = (self.get_clock().now().nanoseconds - stamp_ns) / 1e6
        self.last = {'model_ms': result.model_ms, 'segment_ms': result.total_ms,
                     'node_ms': (t_publish - t_receive) * 1e3, 'latency_ms': latency}
        self.frame_log.append((stamp_ns, t_receive, t_publish, result.model_ms,
                               result.total_ms))
        self._counters['processed'] += 1

    def _class_stats_msg(self, segmenter, mask, header):
        from bluelm_ros.ros import interfaces
        msg = interfaces.load('msg').ClassStats()
        msg.header = header
        stats = segmenter.class_stats(mask)
        msg.class_ids = [c for c, _, _ in stats]
        msg.class_names = [n for _, n, _ in stats]
        msg.pixel_share = [float(s) for _, _, s in stats]
        return msg

    # ------------------------------------------------------------------ status

    @property
    def outputs(self):
        """The output publishers by name (mask, colored_mask, overlay, class_stats, ...)."""
        return dict(self._pubs)

    @property
    def stats(self):
        """Counters: received, dropped, processed, bad, skipped_disabled, published topics."""
        out = self.slot.counts()
        with self._lock:
            bad = dict(self.bad_frames)
        out.update({k: self._counters[k] for k in
                    ('processed', 'skipped_disabled', 'lost', 'colored_mask', 'overlay',
                     'class_stats')})
        out['received'] += out['skipped_disabled']
        out['bad'] = sum(bad.values())
        return out

    def publish_diagnostics(self):
        """Publish the node status on /diagnostics (timer callback; also callable)."""
        state = common.lifecycle_state(self)
        stats = self.stats
        with self._lock:
            bad = dict(self.bad_frames)
        in_rate = self._in_rate.update(stats['received'])
        out_rate = self._out_rate.update(stats['processed'])
        seg = self.segmenter
        values = {
            'state': state,
            'enabled': self._param('enabled'),
            'input_topic': self.input_topic,
            'input_type': self._param('input_type'),
            'input_rate_hz': in_rate,
            'output_rate_hz': out_rate,
            'received': stats['received'],
            'processed': stats['processed'],
            'dropped': stats['dropped'],
            'skipped_disabled': stats['skipped_disabled'],
            'lost': stats['lost'],
            'bad_frames': stats['bad'],
        }
        values.update({f'bad_frames.{reason}': n for reason, n in sorted(bad.items())})
        for key in ('latency_ms', 'model_ms', 'node_ms'):
            values[f'last_{key}'] = self.last.get(key, float('nan'))
        values['model_path'] = self.model_path
        values['providers'] = seg.providers if seg else self._param('providers')
        level, message = common.DiagnosticsPublisher.OK, state
        if state == 'active':
            message = f'active: {in_rate:.1f} Hz in, {out_rate:.1f} Hz out'
            if not self._param('enabled'):
                message = 'active but disabled (enabled:=false)'
        if self._worker is not None and self._worker.error is not None:
            level, message = (common.DiagnosticsPublisher.ERROR,
                              f'worker died: {self._worker.error!r}')
        elif self.configure_error and seg is None:
            level, message = (common.DiagnosticsPublisher.ERROR,
                              f'configure failed: {self.configure_error}')
        else:
            if stats['bad'] > self._bad_seen:
                level = common.DiagnosticsPublisher.WARN
                message += f'; {stats["bad"] - self._bad_seen} bad frames skipped'
            if stats['lost'] > self._lost_seen:
                level = common.DiagnosticsPublisher.WARN
                message += (f'; {stats["lost"] - self._lost_seen} frames lost in DDS '
                            '(too big for the transport? docs/segmentation-node.md)')
        self._bad_seen, self._lost_seen = stats['bad'], stats['lost']
        hardware_id = ','.join(seg.providers) if seg else ''
        return self.diagnostics.publish(level, message, values, hardware_id)


def main(args=None):
    """Entry point of `ros2 run bluelm_ros segmentation_node`."""
    # Buffers of 4 MiB and up (frames of 1080p and more) get their own mappings, unmapped
    # on free. Left alone, glibc raises that threshold to the largest block freed, so one
    # 4K frame left this process 60 MB bigger for good (measured, docs/segmentation-node.md).
    # 640x480 buffers (0.9 MB, and the 3.7 MB model input) stay on the heap as before.
    limit_heap_retention(4 << 20)
    common.exit_process(common.run_node(SegmentationNode, args=args))


if __name__ == '__main__':
    main()
