"""The decoder interface the engine talks to: reset, prefill, step, cached tokens.

A decoder runs the language model over token embeddings and keeps the KV cache of what
it has seen. The engine never touches that cache: it passes embeddings with one
*identity* per token (the token id, or ``(image key, index)`` for an image token) and the
decoder keeps the longest cached prefix with the same identities, so a question about a
frame whose prompt prefix is already cached only pays for its own tokens.

This base class owns that prefix bookkeeping. A backend implements four things:
``_append`` (run new tokens at the end of the cache, return the last logits),
``_truncate`` (forget the tokens after the first n), ``reset`` if it frees more than
that, and ``close``. Today's backend is :mod:`kv_buffer_decoder` (our own ONNX export
with engine-owned KV buffers); a second one (onnxruntime-genai, a GroupQueryAttention
export) is one new module with a subclass, passed to the engine as ``decoder_factory``.
"""

from __future__ import annotations

import abc
from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np


class Prefill(NamedTuple):
    """What a prefill did: logits after the last token, and how many tokens it reused."""

    logits: Optional[np.ndarray]
    reused: int


class Decoder(abc.ABC):
    """A language-model decoder with a KV cache of at most ``max_context`` tokens.

    Not thread-safe: the engine serializes calls.
    """

    def __init__(self, max_context: int):
        self.max_context = int(max_context)
        self._cached = []  # identity of the token in each filled cache slot, in order

    # -- what a backend implements -------------------------------------------------

    @abc.abstractmethod
    def _append(self, embeds: np.ndarray) -> np.ndarray:
        """Run ``[T, hidden]`` embeddings at positions ``cached_tokens ..``; last logits."""

    @abc.abstractmethod
    def _truncate(self, n: int) -> None:
        """Forget every cached token after the first ``n``."""

    @abc.abstractmethod
    def close(self) -> None:
        """Free the session and the cache."""

    # -- the interface -----------------------------------------------------------------

    @property
    def cached_tokens(self) -> int:
        """Tokens currently held in the KV cache."""
        return len(self._cached)

    def reset(self) -> None:
        """Forget the KV cache (the next prompt is prefilled from scratch)."""
        self._truncate(0)
        self._cached = []

    def release(self) -> None:
        """Forget the KV cache and give its memory back (reallocated on the next token)."""
        self.reset()

    def prefill(self, embeds: np.ndarray, identities: Sequence, chunk: int,
                need_logits: bool = True, cancel: Optional[Callable[[], bool]] = None
                ) -> Prefill:
        """Make the cache hold exactly these tokens, reusing the longest cached prefix.

        Runs the rest ``chunk`` tokens per call. With ``need_logits`` the last token is
        always run (its logits are the first generation step), even when cached.
        ``cancel`` is checked before each chunk; when it returns True the prefill stops
        there (``logits`` None), the cache holding the chunks done so far.
        """
        n = len(identities)
        limit = min(len(self._cached), n - 1 if need_logits else n)
        reused = 0
        while reused < limit and self._cached[reused] == identities[reused]:
            reused += 1
        self._truncate(reused)
        del self._cached[reused:]
        logits = None
        for i in range(reused, n, chunk):
            if cancel is not None and cancel():
                return Prefill(None, reused)
            logits = self.step(embeds[i:i + chunk], identities[i:i + chunk])
        return Prefill(logits, reused)

    def step(self, embeds: np.ndarray, identities: Sequence) -> np.ndarray:
        """Append tokens (one per decode step) to the cache; return the last logits."""
        logits = self._append(embeds)
        self._cached.extend(identities)
        return logits
