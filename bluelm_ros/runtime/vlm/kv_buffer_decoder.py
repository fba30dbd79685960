"""The decoder backend for our own ONNX export: engine-owned KV buffers, read in place.

One buffer per layer and K/V (and scale, with an int8 cache), ``[1, kv_heads, capacity,
head_dim]``. The graph reads the whole buffer (masked by ``attention_mask``) and returns
only the new tokens' K/V, which are written into their slots here: no graph ever copies
the cache (the contract is in tools/vlm/export.py, the names in the bundle manifest).
"""

from __future__ import annotations

import numpy as np

from bluelm_ros.runtime.memory import trim_heap
from bluelm_ros.runtime.ort_session import create_session
from bluelm_ros.runtime.vlm.bundle import Bundle, BundleError, DecoderIO, EXPORT_COMMAND
from bluelm_ros.runtime.vlm.decoder import Decoder

_ORT_DTYPES = {'tensor(float16)': np.float16, 'tensor(int8)': np.int8}


class KVBufferDecoder(Decoder):
    """A decoder graph of a bundle, run with KV buffers that grow in ``kv_block`` steps.

    Attention reads the whole buffer handed to it, so the buffer stays just above the
    filled length: ``kv_block`` tokens at a time, up to ``max_context``.
    """

    def __init__(self, session, io: DecoderIO, max_context: int, kv_block: int = 256,
                 source: str = 'decoder'):
        super().__init__(max_context)
        self.kv_block = max(1, int(kv_block))
        self._session, self._io = session, io
        inputs = {i.name: i for i in session.get_inputs()}
        outputs = {o.name for o in session.get_outputs()}
        missing = sorted({t.past for t in io.cache} - set(inputs)
                         | {t.present for t in io.cache} - outputs)
        if missing or not io.cache:
            raise BundleError(f'{source}: the graph lacks the KV cache tensors its manifest '
                              f'names ({", ".join(missing[:4]) or "none named"}). Re-export '
                              f'the bundle with `{EXPORT_COMMAND}`.')
        # past input name -> (kv heads, head dim, dtype)
        self._specs = {t.past: (inputs[t.past].shape[1], inputs[t.past].shape[3],
                                _ORT_DTYPES.get(inputs[t.past].type, np.float32))
                       for t in io.cache}
        self._outputs = [io.logits] + [t.present for t in io.cache]
        self._kv = {}     # past name -> [1, heads, capacity, d] view of its store
        self._store = {}  # past name -> flat array of max_context slots
        self._mask = np.zeros((1, 0), np.int64)

    @classmethod
    def from_bundle(cls, bundle: Bundle, precision: str, max_context: int,
                    kv_block: int = 256, providers=None, **session_options):
        """Open the ``precision`` decoder of a bundle (the engine's default factory)."""
        path = bundle.component_files('decoder', precision)[0]
        session, _ = create_session(path, providers, fix_hint='Re-export the bundle with '
                                    f'`{EXPORT_COMMAND}`.', **session_options)
        decoder = cls(session, bundle.decoder_io(precision), max_context, kv_block, path)
        trim_heap()  # weight prepacking leaves freed staging buffers behind
        return decoder

    @property
    def capacity(self) -> int:
        """Slots the buffers handed to the graph have now."""
        return self._mask.shape[1]

    @property
    def buffers(self) -> dict:
        """The KV buffers by input name (views; empty until the first token)."""
        return dict(self._kv)

    def reset(self) -> None:
        super().reset()
        self._mask = np.zeros((1, 0), np.int64)  # views are re-cut on the next step

    def release(self) -> None:
        super().release()
        self._kv, self._store = {}, {}

    def close(self) -> None:
        self.release()
        self._session = None

    def _truncate(self, n: int) -> None:
        self._mask[:, n:] = 0

    def _ensure_capacity(self, n: int) -> None:
        """Make the KV buffers hold at least ``n`` slots (rounded up to ``kv_block``).

        Each K/V lives in one flat allocation of ``max_context`` slots (untouched pages
        cost no RSS); the ``[1, heads, cap, d]`` view fed to ONNX Runtime is contiguous,
        and growing it moves each head's filled slots to its new offset in place: no
        second buffer, no copy of the whole cache.
        """
        cap = self.capacity
        if n <= cap:
            return
        new = min(self.max_context, -(-n // self.kv_block) * self.kv_block)
        used = self.cached_tokens
        for name, (hkv, d, dtype) in self._specs.items():
            store = self._store.get(name)
            if store is None:
                store = self._store[name] = np.zeros(hkv * self.max_context * d, dtype)
            if used:
                old = store[:hkv * cap * d].reshape(hkv, cap * d)
                # last head first: a head's new slots only overlap heads already moved
                for h in range(hkv - 1, 0, -1):
                    store[h * new * d:h * new * d + used * d] = old[h, :used * d]
            self._kv[name] = store[:hkv * new * d].reshape(1, hkv, new, d)
        mask = np.zeros((1, new), np.int64)
        mask[:, :used] = 1
        self._mask = mask

    def _append(self, embeds: np.ndarray) -> np.ndarray:
        start, t = self.cached_tokens, embeds.shape[0]
        self._ensure_capacity(start + t)
        io = self._io
        feed = {io.inputs_embeds: embeds[None],
                io.position_ids: np.arange(start, start + t, dtype=np.int64)[None],
                io.attention_mask: self._mask}
        feed.update(self._kv)
        outs = self._session.run(self._outputs, feed)
        for tensor, new in zip(io.cache, outs[1:]):
            self._kv[tensor.past][:, :, start:start + t] = new
        self._mask[:, start:start + t] = 1
        return outs[0][0, -1]
