"""Threads the runtime's workers use: a one-item mailbox and a stoppable worker thread.

Plain ``threading``: the segmentation node and the scene-QA service both keep only the
newest camera frame (``LatestSlot``) for one model thread (``WorkerThread``).
"""
import threading


class LatestSlot:
    """Hold only the newest item for a consumer thread (a mailbox of size one).

    ``put`` never blocks (safe in a subscription callback) and replaces an item the
    consumer has not taken yet, counting it as dropped, so memory stays constant
    whatever the producer's rate.
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._item = None
        self._full = False
        self._closed = False
        self.received = 0
        self.dropped = 0
        self.taken = 0

    def put(self, item):
        """Store item as the newest; return True if it replaced an untaken one."""
        with self._cond:
            self.received += 1
            replaced = self._full
            if replaced:
                self.dropped += 1
            self._item, self._full = item, True
            self._cond.notify()
        return replaced

    def take(self, timeout=None):
        """Return the newest item and empty the slot; None after timeout or close()."""
        with self._cond:
            if not self._full and not self._closed:
                self._cond.wait(timeout)
            if not self._full:
                return None
            item, self._item, self._full = self._item, None, False
            self.taken += 1
            return item

    def clear(self):
        """Discard a pending item (counted as dropped)."""
        with self._cond:
            if self._full:
                self.dropped += 1
            self._item, self._full = None, False

    def close(self):
        """Wake every waiting ``take`` (they return None) until ``reopen``."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def reopen(self):
        with self._cond:
            self._closed = False

    @property
    def pending(self):
        return self._full

    def counts(self):
        """Return a consistent snapshot {'received', 'dropped', 'taken'}."""
        with self._cond:
            return {'received': self.received, 'dropped': self.dropped, 'taken': self.taken}


class WorkerThread:
    """A daemon thread running ``target(stop_event)`` until ``stop()``.

    The target must check ``stop_event`` at least every few hundred milliseconds (wait on
    it or use timeouts) so that ``stop()`` returns within its timeout.
    """

    def __init__(self, target, name, wake=None):
        self._target = target
        self._wake = wake  # called by stop() to interrupt a blocking wait (e.g. slot.close)
        self.stop_event = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.error = None

    def _run(self):
        try:
            self._target(self.stop_event)
        except BaseException as exc:  # keep it for the owner; never print from a daemon
            self.error = exc

    def start(self):
        self._thread.start()
        return self

    def stop(self, timeout=2.0):
        """Signal the thread, wake it and join; return True if it has exited."""
        self.stop_event.set()
        if self._wake is not None:
            self._wake()
        if self._thread.ident is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def is_alive(self):
        return self._thread.is_alive()
