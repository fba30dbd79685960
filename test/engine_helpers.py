"""A VLM engine wrapper for tests that need answers to take a while (imported from test/)."""
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
