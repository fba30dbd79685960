"""Waiting helpers shared by the ROS tests (imported as a plain module from test/)."""
import threading
import time

WAIT = 30.0  # seconds to wait for anything that should happen


def wait_until(predicate, timeout=WAIT, interval=0.02):
    """Poll predicate until it is true or timeout passes; return its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


class Inbox:
    """Subscription callback that keeps every message and lets the test wait on them."""

    def __init__(self):
        self.msgs = []
        self._cond = threading.Condition()

    def __call__(self, msg):
        with self._cond:
            self.msgs.append(msg)
            self._cond.notify_all()

    def wait_for(self, predicate=lambda m: True, timeout=WAIT):
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for msg in self.msgs:
                    if predicate(msg):
                        return msg
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    def matching(self, predicate):
        with self._cond:
            return [m for m in self.msgs if predicate(m)]
