"""The decoder backend for ``gqa`` exports: ORT's fused GroupQueryAttention, shared buffers.

One buffer per layer and K/V, ``[1, kv_heads, max_context, head_dim]``, allocated once
(untouched pages cost no RSS) and bound through an IOBinding as both the graph's past
input and its present output: the fused op writes the new tokens into their slots and
reads only the filled ones (``seqlens_k``), with RoPE, masking and softmax fused. Nothing
is copied per step, and forgetting tokens is only a smaller ``seqlens_k`` next time.
The graph contract is in tools/vlm/export_gqa.py, the names in the bundle manifest.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from bluelm_ros.runtime.memory import trim_heap
from bluelm_ros.runtime.ort_session import create_session
from bluelm_ros.runtime.vlm.bundle import Bundle, BundleError, DecoderIO, EXPORT_COMMAND
from bluelm_ros.runtime.vlm.decoder import Decoder

_ORT_DTYPES = {'tensor(float16)': np.float16, 'tensor(float)': np.float32}


class GqaDecoder(Decoder):
    """A ``gqa`` decoder graph of a bundle with ``max_context`` slots of shared KV buffers."""

    def __init__(self, session, io: DecoderIO, max_context: int, source: str = 'decoder'):
        super().__init__(max_context)
        self._session, self._io = session, io
        inputs = {i.name: i for i in session.get_inputs()}
        outputs = {o.name for o in session.get_outputs()}
        needed = {io.inputs_embeds, io.seqlens_k, io.total_sequence_length}
        missing = sorted((needed | {t.past for t in io.cache}) - set(inputs)
                         | {t.present for t in io.cache} - outputs)
        if missing or not io.cache:
            raise BundleError(f'{source}: not a gqa decoder graph (lacks '
                              f'{", ".join(missing[:4]) or "KV cache tensors"}). Re-export '
                              f'the bundle with `{EXPORT_COMMAND} --attention gqa`.')
        self._specs = {}  # past name -> (kv heads, head dim, dtype)
        for t in io.cache:
            spec = inputs[t.past]
            if spec.type not in _ORT_DTYPES:
                raise BundleError(f'{source}: KV cache type {spec.type} is not supported')
            self._specs[t.past] = (spec.shape[1], spec.shape[3], _ORT_DTYPES[spec.type])
        self._buffers = {}    # past name -> numpy buffer (owns the memory)
        self._ort_values = {}  # past name -> OrtValue over that buffer

    @classmethod
    def from_bundle(cls, bundle: Bundle, precision: str, max_context: int,
                    kv_block: int = 256, providers=None, **session_options):
        """Open the ``precision`` decoder of a bundle (``kv_block`` is not used: the
        buffers are reserved whole and filled as the context grows)."""
        path = bundle.component_files('decoder', precision)[0]
        session, _ = create_session(path, providers, fix_hint='Re-export the bundle with '
                                    f'`{EXPORT_COMMAND} --attention gqa`.', **session_options)
        decoder = cls(session, bundle.decoder_io(precision), max_context, path)
        trim_heap()  # weight prepacking leaves freed staging buffers behind
        return decoder

    @property
    def buffers(self) -> dict:
        """The KV buffers by input name (empty until the first token)."""
        return dict(self._buffers)

    def release(self) -> None:
        super().release()
        self._buffers, self._ort_values = {}, {}  # large arrays: unmapped when dropped

    def close(self) -> None:
        self._session = None
        self._buffers, self._ort_values = {}, {}
        self._cached = []

    def _truncate(self, n: int) -> None:
        pass  # slots past seqlens_k are never read; the next tokens overwrite them

    def _ensure_buffers(self) -> None:
        if self._buffers:
            return
        for name, (hkv, d, dtype) in self._specs.items():
            # np.zeros of this size is a lazy mapping: pages become resident when written
            buf = np.zeros((1, hkv, self.max_context, d), dtype)
            self._buffers[name] = buf
            self._ort_values[name] = ort.OrtValue.ortvalue_from_numpy(buf)

    def _append(self, embeds: np.ndarray) -> np.ndarray:
        start, t = self.cached_tokens, embeds.shape[0]
        if start + t > self.max_context:
            raise ValueError(f'{start + t} tokens exceed max_context {self.max_context}')
        self._ensure_buffers()
        io = self._io
        binding = self._session.io_binding()
        binding.bind_cpu_input(io.inputs_embeds,
                               np.ascontiguousarray(embeds[None], dtype=np.float32))
        binding.bind_cpu_input(io.seqlens_k, np.array([start + t - 1], np.int32))
        binding.bind_cpu_input(io.total_sequence_length, np.array(start + t, np.int32))
        binding.bind_output(io.logits)  # first: outputs come back in binding order
        for tensor in io.cache:
            value = self._ort_values[tensor.past]
            binding.bind_ortvalue_input(tensor.past, value)
            binding.bind_ortvalue_output(tensor.present, value)  # written in place
        self._session.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()[0, -1]
