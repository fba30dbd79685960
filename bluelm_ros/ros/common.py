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
* ``fastdds_profiles_variable``: FASTRTPS_/FASTDDS_DEFAULT_PROFILES_FILE, by Fast DDS version.
* ``ShutdownSignals``, ``init_rclpy``: SIGINT/SIGTERM handled by the process, not by
  rclpy (the context stays up until every pending request is answered).
* ``run_node``: the standard ``main()`` body; ``stop_spinning``: its shutdown order (answer
  what the nodes hold, let the replies go out, stop the executor, destroy), also used by
  ``Bringup``; ``exit_process``: the end of ``main()``.
"""
import os
import signal
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


# --------------------------------------------------------------------------- Fast DDS


def fastdds_profiles_variable(environ=None):
    """Return the environment variable the installed Fast DDS reads its XML profile from.

    Fast DDS 2 (Humble, Jazzy) reads only ``FASTRTPS_DEFAULT_PROFILES_FILE``; Fast DDS 3
    (Kilted on) reads ``FASTDDS_DEFAULT_PROFILES_FILE``, and Kilted's rmw_fastrtps also
    loads a file named by the old variable, so setting both there loads the profile twice
    (XMLPARSER errors). Decided by which library the ROS prefixes hold (libfastrtps = 2).
    """
    import glob
    import os
    environ = os.environ if environ is None else environ
    prefixes = [p for p in environ.get('AMENT_PREFIX_PATH', '').split(os.pathsep) if p]
    for prefix in prefixes + [sys.prefix]:
        if glob.glob(os.path.join(prefix, 'lib', 'libfastrtps.so*')):
            return 'FASTRTPS_DEFAULT_PROFILES_FILE'
        if glob.glob(os.path.join(prefix, 'lib', 'libfastdds.so*')):
            return 'FASTDDS_DEFAULT_PROFILES_FILE'
    return 'FASTDDS_DEFAULT_PROFILES_FILE'


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


# --------------------------------------------------------------------------- signals


class ShutdownSignals:
    """SIGINT and SIGTERM as a request to stop, however many arrive and whenever.

    rclpy's own handler shuts the context down at the first signal, before a node can
    answer what it holds (action results can no longer be sent), and a second SIGINT
    raises KeyboardInterrupt wherever the main thread is, e.g. in cleanup. Here a signal
    only records itself; the main thread sees ``received`` and shuts down in order.
    Repeats are recorded and change nothing. While ``interruptible`` (start-up: loading a
    model can take a while) the first signal raises KeyboardInterrupt instead.

    The handler sets no lock (a handler runs between two bytecodes of the main thread,
    which may hold that lock); the main thread polls (``wait``).
    """

    NAMES = ('SIGINT', 'SIGTERM')

    def __init__(self):
        self.received = []  # signal numbers, in arrival order
        self.interruptible = False

    def install(self):
        """Handle SIGINT/SIGTERM from now on (main thread only; elsewhere a no-op)."""
        if threading.current_thread() is threading.main_thread():
            for name in self.NAMES:
                signal.signal(getattr(signal, name), self._on_signal)
        return self

    def _on_signal(self, signum, frame):
        self.received.append(signum)
        if self.interruptible and len(self.received) == 1:
            raise KeyboardInterrupt  # start-up: nothing to answer yet

    @property
    def first(self):
        """Name of the first signal received, or None."""
        return signal.Signals(self.received[0]).name if self.received else None

    def wait(self, until=lambda: False, poll=0.05):
        """Sleep until a signal arrives or ``until()`` is true; return ``first``."""
        while not self.received and not until():
            time.sleep(poll)
        return self.first


def init_rclpy(args=None, signals=None):
    """``rclpy.init`` without rclpy's signal handlers (``signals`` handles them).

    ``signal_handler_options`` exists from Humble on; older rclpy installs its handlers in
    init, so ``signals`` is installed again afterwards, replacing them.
    """
    import rclpy
    try:
        from rclpy.signals import SignalHandlerOptions
        rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    except (ImportError, TypeError):  # before Humble: no options
        rclpy.init(args=args)
        if signals is not None:
            signals.install()


# --------------------------------------------------------------------------- main()

# After the nodes answered what they held: time for the executor to send the replies and
# action results it still has (and for the clients' get_result requests of the last
# goals), before it stops. Exit within 2 s of a signal: drain + this + destroy.
REPLY_FLUSH_SEC = 0.25
DRAIN_SEC = 1.0


class InFlight:
    """Counts callbacks still answering a request (``with in_flight:`` around each).

    A node's ``replies_pending()`` returns ``count``: ``stop_spinning`` waits for it to
    drop to zero before it stops the executor, so no reply is cut off.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self.count = 0

    def __enter__(self):
        with self._lock:
            self.count += 1
        return self

    def __exit__(self, *exc):
        with self._lock:
            self.count -= 1
        return False


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


def wait_replies_sent(nodes, timeout=DRAIN_SEC, flush=REPLY_FLUSH_SEC):
    """Wait (bounded) until no node has a callback still answering, then ``flush`` more.

    Nodes that answer requests count their answering callbacks in ``replies_pending()``
    (the scene QA node does); the executor must still spin, so the replies go out. Nodes
    without it (publishers only) are not waited for.
    """
    counters = [n.replies_pending for n in nodes if hasattr(n, 'replies_pending')]
    if not counters:
        return
    deadline = time.monotonic() + timeout
    while sum(count() for count in counters) and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(flush)


def stop_spinning(nodes, executor, thread=None):
    """Shut down in order: answer what the nodes hold, let the replies out, stop, destroy.

    ``executor`` spins ``nodes`` (in ``thread``, if given) and the context is still up:
    pending service calls and action goals get their replies before anything is torn
    down. Then the executor stops (its threads are free by then), the nodes are destroyed.
    """
    nodes = [n for n in nodes if n is not None]
    for node in nodes:
        stop_node_workers(node)
    if executor is not None:
        wait_replies_sent(nodes)
        executor.shutdown(timeout_sec=2.0)
    if thread is not None and thread.ident is not None:
        thread.join(timeout=2.0)
    for node in nodes:
        try:
            node.destroy_node()
        except Exception as exc:  # never mask the exit with a cleanup problem
            print(f'destroy_node: {exc}', file=sys.stderr)


class SpinThread(threading.Thread):
    """``executor.spin()`` in a daemon thread; an exception from a callback is kept."""

    def __init__(self, executor, name='executor'):
        super().__init__(target=self._spin, name=name, daemon=True)
        self.executor = executor
        self.error = None

    def _spin(self):
        from rclpy.executors import ExternalShutdownException
        try:
            self.executor.spin()
        except ExternalShutdownException:
            pass
        except BaseException as exc:  # re-raised by the main thread after the cleanup
            self.error = exc


def make_executor(threads):
    from rclpy.executors import MultiThreadedExecutor, SingleThreadedExecutor
    if threads > 1:
        return MultiThreadedExecutor(num_threads=threads)
    return SingleThreadedExecutor()


def release_dds():
    """Destroy the default context, and with it the DDS participant, after shutdown.

    ``rclpy.try_shutdown()`` leaves the participant to the context's finaliser, which
    :func:`exit_process` skips; Fast DDS then never unlinks its shared-memory segments, so
    every exit leaked them in /dev/shm (two 128 MiB segments per process with the
    large-frame profile; 9.8 GB had piled up on the development machine). The context is
    only destroyed once nothing uses it: the caller drops its node and executor first and
    a collection frees what still refers to it.
    """
    import gc
    import rclpy
    destroy = getattr(rclpy.get_default_context(), 'destroy', None)  # rclpy >= Humble
    if destroy is None:
        return
    gc.collect()
    try:
        destroy()
    except Exception as exc:  # never mask the exit with a cleanup problem
        print(f'rclpy context: {exc!r}', file=sys.stderr)


def exit_process(code):
    """End the process with ``code`` now: the last line of an executable's ``main()``.

    Call it after ``run_node`` (or ``bringup.run``) returned, when rclpy is shut down and
    the nodes are destroyed. The interpreter's own teardown after that (a full GC and the
    C++ destructors of ONNX Runtime, OpenCV and the DDS libraries) took 0.7-1.2 s on the
    loaded 2-core machine, and a process manager allows ~2 s after SIGINT/SIGTERM;
    nothing in it matters any more. The Python and C output streams are flushed first.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # a closed stream: nothing to flush
            pass
    try:
        import ctypes
        ctypes.CDLL(None).fflush(None)  # C stdio (rcutils logging) of this process
    except Exception:  # not glibc/musl: the C streams are line-buffered anyway
        pass
    os._exit(int(code))


def run_node(node_factory, args=None, executor_threads=1):
    """Create a node and spin it until SIGINT/SIGTERM or shutdown; return an exit code.

    The executor gets ``node.executor_threads`` threads if the node sets that attribute
    (the scene QA node: ``queue_size + 4``), else ``executor_threads``; more than one
    gives a MultiThreadedExecutor. It spins in a thread while the main thread waits for a
    signal (``ShutdownSignals``; rclpy installs none), then ``stop_spinning``: pending
    requests answered and their replies sent while the context is still up, executor
    stopped, node destroyed, ``rclpy.try_shutdown()``. Further signals change nothing:
    exit code 0, no traceback. The node's ``destroy_node`` must stop its own threads
    (bounded join): live threads at rclpy shutdown abort the interpreter with the wheels.
    """
    import rclpy
    from rclpy.executors import ExternalShutdownException

    signals = ShutdownSignals().install()
    init_rclpy(args, signals)
    node = executor = spinner = None
    try:
        signals.interruptible = True
        try:
            node = node_factory()
        except (KeyboardInterrupt, ExternalShutdownException):
            return 0
        except Exception as exc:  # e.g. a bad -p value: one clear line, exit code 1
            print(f'[{getattr(node_factory, "__name__", "node")}] failed to start: {exc}',
                  file=sys.stderr)
            return 1
        finally:
            signals.interruptible = False
        executor = make_executor(int(getattr(node, 'executor_threads', executor_threads)))
        executor.add_node(node)
        spinner = SpinThread(executor, f'{node.get_name()}_executor')
        spinner.start()
        if signals.wait(until=lambda: not spinner.is_alive()):
            node.get_logger().info(f'{signals.first}: answering pending requests, stopping')
    finally:
        stop_spinning([node], executor, spinner)
        try:
            rclpy.try_shutdown()
        except Exception as exc:  # it also destroys a node whose __init__ failed half-way
            print(f'rclpy shutdown: {exc!r}', file=sys.stderr)
        error = spinner.error if spinner is not None else None
        node = executor = spinner = None
        release_dds()
    if error is not None:
        raise error  # a callback raised: as if spin() had raised it here
    return 0
