"""Picking the next token (greedy, temperature, top-k, top-p) and turning ids into text.

:class:`TextStream` is what the engine streams to its caller: text deltas whose
concatenation is the final answer, never a half UTF-8 character or a half stop string.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from bluelm_ros.runtime.vlm.tokenizer import VLMTokenizer


def sample_token(logits: np.ndarray, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, rng: Optional[np.random.Generator] = None) -> int:
    """Pick the next token from ``[vocab]`` logits.

    ``temperature <= 0`` is greedy (argmax). Otherwise logits are divided by the
    temperature, restricted to the ``top_k`` best (0 = all) and then to the smallest set
    whose probability reaches ``top_p``, and sampled with ``rng``.
    """
    logits = np.asarray(logits, dtype=np.float64).reshape(-1)
    if temperature <= 0:
        return int(np.argmax(logits))
    rng = rng or np.random.default_rng()
    z = logits / temperature
    if 0 < top_k < z.size:
        idx = np.argpartition(-z, top_k - 1)[:top_k]
    else:
        idx = np.arange(z.size)
    z = z[idx]
    order = np.argsort(-z, kind='stable')
    idx, z = idx[order], z[order]
    p = np.exp(z - z[0])
    p /= p.sum()
    if top_p < 1.0:
        # keep tokens until the cumulative probability reaches top_p (at least one)
        keep = int(np.searchsorted(np.cumsum(p), top_p) + 1)
        idx, p = idx[:keep], p[:keep] / p[:keep].sum()
    return int(idx[rng.choice(idx.size, p=p)])


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that starts some stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


class TextStream:
    """Turn generated ids into text deltas whose concatenation is the final text.

    Text that may still change is held back: a trailing U+FFFD (an incomplete UTF-8
    character) and any suffix that could be the start of a stop string.
    """

    def __init__(self, tokenizer: VLMTokenizer, stop_strings: Sequence[str]):
        self.tokenizer = tokenizer
        self.stops = [s for s in stop_strings if s]
        self.ids = []
        self.emitted = ''
        self.stopped = False

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids)

    def push(self, token_id: int) -> str:
        """Add a generated id; return the new final text (may be empty)."""
        self.ids.append(int(token_id))
        text = self._text()
        cut = [text.find(s) for s in self.stops]
        cut = [c for c in cut if c >= 0 and c >= len(self.emitted)]
        if cut:
            self.stopped = True
            return self._emit(text[:min(cut)])
        stable = text.rstrip('\ufffd')
        return self._emit(stable[:len(stable) - _held_back(stable, self.stops)])

    def finish(self) -> str:
        """Flush what was held back (not after a stop string)."""
        return '' if self.stopped else self._emit(self._text())

    def _emit(self, upto: str) -> str:
        if not upto.startswith(self.emitted) or len(upto) <= len(self.emitted):
            return ''
        new, self.emitted = upto[len(self.emitted):], upto
        return new
