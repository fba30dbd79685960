"""A VLM engine wrapper for tests that need answers to take a while (imported from test/)."""
import threading
import time


class SlowEngine:
    """A real engine, slowed down by `delay` seconds per generated token."""

    def __init__(self, engine, delay):
        self._engine, self.delay = engine, delay

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def generate(self, *args, on_token=None, **kwargs):
        def slow(delta, token_id):
            time.sleep(self.delay)
            return None if on_token is None else on_token(delta, token_id)
        return self._engine.generate(*args, on_token=slow, **kwargs)


class EagerGate:
    """A real engine whose eager ``prepare`` of a new frame, once armed, encodes the frame
    and then holds until the caller's ``cancel`` says a question is waiting: the question
    deterministically arrives in the middle of the eager work."""

    def __init__(self, engine, timeout=10.0):
        self._engine, self.timeout = engine, timeout
        self.armed, self.holding = False, threading.Event()

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def prepare(self, image=None, cancel=None, **kwargs):
        if self.armed and image is not None and cancel is not None:
            self.armed = False
            self._engine.encode_image(image, key=kwargs.get('image_key'))
            self.holding.set()
            deadline = time.monotonic() + self.timeout
            while not cancel() and time.monotonic() < deadline:
                time.sleep(0.005)
        return self._engine.prepare(image, cancel=cancel, **kwargs)
