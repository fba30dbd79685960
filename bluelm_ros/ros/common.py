"""Helpers shared by the bluelm_ros nodes (segmentation, scene QA).

Everything here runs on rclpy from ROS 2 Humble onwards (no ``with rclpy.init()``, no
Kilted-only API), so the nodes behave the same on apt ROS 2 on a robot and on the PyPI
Kilted wheels used for development.

* ``declare_param`` / ``check_choice``: parameters with descriptors, ranges and choices.
* ``declare_qos_parameters`` / ``qos_from_parameters``: a subscription QoS the user can
  override (default: sensor data, best effort, depth 1).
* ``ThrottledWarnings``: one warning per key per period, with a count of the suppressed ones.
* ``RateMeter``, ``DiagnosticsPublisher``: ``diagnostic_msgs/DiagnosticArray`` on
  /diagnostics without ``diagnostic_updater`` (not available everywhere).
* ``lifecycle_state``, ``lifecycle_autostart``, ``lifecycle_reconfigure``: lifecycle chores.
* ``run_node``: the standard ``main()`` body (Ctrl-C and external shutdown without a
  traceback; worker threads stopped before ``rclpy.try_shutdown()``);
  ``stop_node_workers``: the first step of that shutdown, also used by ``Bringup``.
"""
import sys
import threading
import time

# --------------------------------------------------------------------------- parameters


def describe(description, *, value_range=None, read_only=False, choices=None,
             constraints=''):
    """Build a ParameterDescriptor.

    value_range: (min, max) or (min, max, step); ints give an IntegerRange, floats a
    FloatingPointRange (rclpy rejects out-of-range values itself). choices are listed in
    additional_constraints; enforce them with ``check_choice``.
    """
    from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
    desc = ParameterDescriptor(description=description, read_only=bool(read_only))
    notes = [constraints] if constraints else []
    if choices:
        notes.append('one of: ' + ', '.join(str(c) for c in choices))
    if value_range is not None:
        lo, hi = value_range[0], value_range[1]
        step = value_range[2] if len(value_range) > 2 else 0
        if isinstance(lo, float) or isinstance(hi, float) or isinstance(step, float):
            desc.floating_point_range = [FloatingPointRange(
                from_value=float(lo), to_value=float(hi), step=float(step))]
        else:
            desc.integer_range = [IntegerRange(from_value=int(lo), to_value=int(hi),
                                               step=int(step))]
        notes.append(f'range [{lo}, {hi}]')
    desc.additional_constraints = '; '.join(notes)
    return desc


def check_choice(name, value, choices):
    """Return None if value is one of choices, else a reason string for a rejected set."""
    if value in choices:
        return None
    return f'{name} must be one of {", ".join(repr(c) for c in choices)}; got {value!r}'


def declare_param(node, name, default, description, *, value_range=None, read_only=False,
                  choices=None, constraints=''):
    """Declare a parameter with a descriptor and return its (possibly overridden) value.

    A value given at startup (``-p name:=value``) that violates ``choices`` raises
    ValueError naming the parameter, like rclpy does for ranges.
    """
    desc = describe(description, value_range=value_range, read_only=read_only,
                    choices=choices, constraints=constraints)
    value = node.declare_parameter(name, default, desc).value
    if choices:
        reason = check_choice(name, value, choices)
        if reason:
            raise ValueError(reason)
    return value


def parameter_change_reason(name, value, state, *, load_params, subscription_params,
                            choices, loaded='model'):
    """Return why a live parameter change must be refused, or None if it may proceed.

    The lifecycle rule both nodes follow: ``load_params`` are read when the model (or
    bundle) is loaded, so they change only while unconfigured; ``subscription_params``
    are read at activate, so they change only while not active. ``choices`` maps a
    parameter to its allowed values; ``providers`` must name at least one provider.
    """
    if name in load_params and state != 'unconfigured':
        return (f'{name} is applied when the {loaded} is loaded: it cannot change while the '
                f'node is {state}. Reconfigure: deactivate, cleanup, set {name}, then '
                'configure and activate (e.g. `ros2 lifecycle set <node> deactivate`).')
    if name in subscription_params and state == 'active':
        return (f'{name} is applied when the subscriptions are created: deactivate, set '
                f'{name}, then activate.')
    if name in choices:
        reason = check_choice(name, value, choices[name])
        if reason:
            return reason
    if name == 'providers' and (not value or not all(str(v).strip() for v in value)):
        return "providers must list at least one provider, e.g. ['CPUExecutionProvider']"
    return None


# --------------------------------------------------------------------------- QoS

RELIABILITY_CHOICES = ('best_effort', 'reliable', 'system_default')
DURABILITY_CHOICES = ('volatile', 'transient_local', 'system_default')


def declare_qos_parameters(node, prefix='qos', *, reliability='best_effort',
                           durability='volatile', depth=1, what='input'):
    """Declare ``<prefix>.reliability``, ``<prefix>.durability``, ``<prefix>.depth``.

    The defaults are the sensor-data profile with depth 1: a best-effort subscription
    matches both best-effort and reliable cameras and never queues stale frames.
    """
    declare_param(node, f'{prefix}.reliability', reliability,
                  f'QoS reliability of the {what} subscription. best_effort matches every '
                  'publisher; reliable only matches reliable publishers.',
                  choices=RELIABILITY_CHOICES)
    declare_param(node, f'{prefix}.durability', durability,
                  f'QoS durability of the {what} subscription.', choices=DURABILITY_CHOICES)
    declare_param(node, f'{prefix}.depth', int(depth),
                  f'QoS history depth (keep last) of the {what} subscription.',
                  value_range=(1, 1000))


def qos_from_parameters(node, prefix='qos'):
    """Return the QoSProfile described by the ``<prefix>.*`` parameters."""
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
    reliability = {
        'best_effort': ReliabilityPolicy.BEST_EFFORT,
        'reliable': ReliabilityPolicy.RELIABLE,
        'system_default': ReliabilityPolicy.SYSTEM_DEFAULT,
    }[node.get_parameter(f'{prefix}.reliability').value]
    durability = {
        'volatile': DurabilityPolicy.VOLATILE,
        'transient_local': DurabilityPolicy.TRANSIENT_LOCAL,
        'system_default': DurabilityPolicy.SYSTEM_DEFAULT,
    }[node.get_parameter(f'{prefix}.durability').value]
    return QoSProfile(history=HistoryPolicy.KEEP_LAST,
                      depth=int(node.get_parameter(f'{prefix}.depth').value),
                      reliability=reliability, durability=durability)


def latched_qos(depth=1):
    """Reliable + transient-local: late subscribers still get the last message."""
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=depth,
                      reliability=ReliabilityPolicy.RELIABLE,
                      durability=DurabilityPolicy.TRANSIENT_LOCAL)


def create_subscription_counting_losses(node, msg_type, topic, callback, qos, on_lost):
    """create_subscription that also calls ``on_lost(count)`` when DDS reports lost messages.

    Best-effort samples too big for the transport vanish without a trace in the callback;
    the RMW's message-lost event is the only sign. RMWs without that event get a plain
    subscription.
    """
    try:  # Iron+; Humble has the same class in rclpy.qos_event
        from rclpy.event_handler import SubscriptionEventCallbacks, UnsupportedEventTypeError
    except ImportError:
        from rclpy.qos_event import SubscriptionEventCallbacks, UnsupportedEventTypeError
    events = SubscriptionEventCallbacks(
        message_lost=lambda info: on_lost(int(info.total_count_change)))
    try:
        return node.create_subscription(msg_type, topic, callback, qos, event_callbacks=events)
    except UnsupportedEventTypeError:
        return node.create_subscription(msg_type, topic, callback, qos)


# --------------------------------------------------------------------------- warnings


class ThrottledWarnings:
    """Log at most one warning per key per period; count every occurrence.

    rclpy's ``throttle_duration_sec`` throttles per call site, which would hide a second
    kind of problem behind the first; this throttles per key (e.g. the bad-frame reason)
    and reports how many were suppressed in between.
    """

    def __init__(self, logger, period_sec=5.0, clock=time.monotonic):
        self.logger = logger
        self.period_sec = float(period_sec)
        self._clock = clock
        self._lock = threading.Lock()
        self._last = {}
        self._suppressed = {}
        self.counts = {}
        self.last_message = {}

    def warn(self, key, message):
        """Count one occurrence of key; log message unless throttled. Return True if logged."""
        now = self._clock()
        with self._lock:
            self.counts[key] = self.counts.get(key, 0) + 1
            self.last_message[key] = message
            last = self._last.get(key)
            if last is not None and now - last < self.period_sec:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return False
            suppressed = self._suppressed.pop(key, 0)
            self._last[key] = now
        if suppressed:
            message = (f'{message} ({suppressed} more like this in the last '
                       f'{now - last:.0f} s)')
        self.logger.warning(message)
        return True

    def snapshot(self):
        with self._lock:
            return dict(self.counts)


# --------------------------------------------------------------------------- diagnostics


class RateMeter:
    """Rate of a growing counter between successive ``update`` calls."""

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._t = None
        self._n = 0
        self.rate = 0.0

    def update(self, count):
        now = self._clock()
        if self._t is not None and now > self._t:
            self.rate = max(0, count - self._n) / (now - self._t)
        self._t, self._n = now, count
        return self.rate


class DiagnosticsPublisher:
    """Publish one DiagnosticStatus as a ``diagnostic_msgs/DiagnosticArray``.

    A small stand-in for ``diagnostic_updater`` (not on PyPI, not always installed).
    Levels: OK, WARN, ERROR, STALE.
    """

    OK, WARN, ERROR, STALE = 0, 1, 2, 3

    def __init__(self, node, name=None, hardware_id='', topic='/diagnostics'):
        from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
        self._types = (DiagnosticArray, DiagnosticStatus, KeyValue)
        self.node = node
        self.name = name or f'{node.get_name()}'
        self.hardware_id = hardware_id
        self.publisher = node.create_publisher(DiagnosticArray, topic, 10)

    def build(self, level, message, values=None, hardware_id=None):
        """Return the DiagnosticArray message (values: mapping, rendered with str())."""
        DiagnosticArray, DiagnosticStatus, KeyValue = self._types
        status = DiagnosticStatus()
        status.level = bytes([int(level)])  # the `byte` field wants a 1-byte bytes object
        status.name = self.name
        status.message = str(message)
        status.hardware_id = str(self.hardware_id if hardware_id is None else hardware_id)
        status.values = [KeyValue(key=str(k), value=_fmt(v)) for k, v in (values or {}).items()]
        array = DiagnosticArray()
        array.header.stamp = self.node.get_clock().now().to_msg()
        array.status = [status]
        return array

    def publish(self, level, message, values=None, hardware_id=None):
        msg = self.build(level, message, values, hardware_id)
        self.publisher.publish(msg)
        return msg

    def destroy(self):
        self.node.destroy_publisher(self.publisher)


def _fmt(value):
    if isinstance(value, float):
        return f'{value:.3f}'
    if isinstance(value, (list, tuple)):
        return ', '.join(str(v) for v in value)
    return str(value)


def diagnostic_values(msg):
    """Return {key: value} of the first status in a DiagnosticArray (for tests and tools)."""
    if not msg.status:
        return {}
    return {kv.key: kv.value for kv in msg.status[0].values}


# --------------------------------------------------------------------------- lifecycle


def lifecycle_state(node):
    """Return the lifecycle state label ('unconfigured', 'inactive', 'active', ...)."""
    machine = getattr(node, '_state_machine', None)  # rclpy keeps it private (Humble+)
    if machine is None:
        return 'unknown'
    return machine.current_state[1]


def _success(ret):
    from rclpy.lifecycle import TransitionCallbackReturn
    return ret == TransitionCallbackReturn.SUCCESS


def lifecycle_autostart(node, parameter='autostart'):
    """Configure and activate node if its ``parameter`` is true.

    Returns None when autostart is off, else True on success; on failure the node stays
    where the failing transition left it (its on_configure logged why) and False returns.
    """
    if not node.get_parameter(parameter).value:
        return None
    if not _success(node.trigger_configure()):
        node.get_logger().error(
            'autostart: configure failed; fix the parameters above, then '
            f'`ros2 lifecycle set {node.get_fully_qualified_name()} configure`')
        return False
    if not _success(node.trigger_activate()):
        node.get_logger().error('autostart: activate failed')
        return False
    return True


def lifecycle_reconfigure(node, parameters=()):
    """Bring node down to unconfigured, set parameters, and bring it back up.

    Restores the state it was in (inactive or active). Returns (ok, message).
    """
    was = lifecycle_state(node)
    if was == 'active' and not _success(node.trigger_deactivate()):
        return False, 'deactivate failed'
    if was in ('active', 'inactive') and not _success(node.trigger_cleanup()):
        return False, 'cleanup failed'
    if parameters:
        for result in node.set_parameters(list(parameters)):
            if not result.successful:
                return False, result.reason
    if was in ('active', 'inactive'):
        if not _success(node.trigger_configure()):
            return False, 'configure failed (see the node log)'
    if was == 'active' and not _success(node.trigger_activate()):
        return False, 'activate failed'
    return True, f'reconfigured ({lifecycle_state(node)})'


# --------------------------------------------------------------------------- main()


def stop_node_workers(node):
    """Call ``node.stop_workers()`` if it has one (answers callbacks blocked on workers).

    A node whose callbacks wait for its worker threads (the scene QA service) must release
    them before ``executor.shutdown()``, which joins the executor threads.
    """
    stop = getattr(node, 'stop_workers', None)
    if stop is None:
        return
    try:
        stop()
    except Exception as exc:  # shutting down anyway: say why, do not mask the exit
        print(f'{getattr(node, "get_name", lambda: "node")()}: stop_workers: {exc}',
              file=sys.stderr)


def run_node(node_factory, args=None, executor_threads=1):
    """Create a node and spin it until Ctrl-C or shutdown; return an exit code.

    The executor gets ``node.executor_threads`` threads if the node sets that attribute
    (the scene QA node: ``queue_size + 4``), else ``executor_threads``; more than one
    gives a MultiThreadedExecutor. The node's ``destroy_node`` must stop its own threads
    (bounded join). Order on exit: ``node.stop_workers()`` (if any), executor shutdown,
    destroy_node, ``rclpy.try_shutdown()``: spinning executors or live threads at rclpy
    shutdown abort the interpreter with the PyPI wheels.
    """
    import rclpy
    from rclpy.executors import (ExternalShutdownException, MultiThreadedExecutor,
                                 SingleThreadedExecutor)

    rclpy.init(args=args)
    node = executor = None
    code = 0
    try:
        try:
            node = node_factory()
        except (KeyboardInterrupt, ExternalShutdownException):
            raise
        except Exception as exc:  # e.g. a bad -p value: one clear line, exit code 1
            print(f'[{getattr(node_factory, "__name__", "node")}] failed to start: {exc}',
                  file=sys.stderr)
            return 1
        executor_threads = int(getattr(node, 'executor_threads', executor_threads))
        if executor_threads > 1:
            executor = MultiThreadedExecutor(num_threads=executor_threads)
        else:
            executor = SingleThreadedExecutor()
        executor.add_node(node)
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if node is not None:
            stop_node_workers(node)
        if executor is not None:
            executor.shutdown(timeout_sec=2.0)
        if node is not None:
            try:
                node.destroy_node()
            except Exception as exc:  # the context may already be gone after SIGINT
                print(f'destroy_node: {exc}', file=sys.stderr)
        try:
            rclpy.try_shutdown()
        except Exception as exc:  # it also destroys a node whose __init__ failed half-way
            print(f'rclpy shutdown: {exc!r}', file=sys.stderr)
    return code
