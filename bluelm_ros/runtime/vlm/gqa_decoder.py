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
        self._binding = None   # IOBinding with the buffers bound (the per-call inputs rebound)
        logits = next(o for o in session.get_outputs() if o.name == io.logits)
        if not all(isinstance(n, int) for n in logits.shape):
            raise BundleError(f'{source}: logits shape {logits.shape} is not static. '
                              f'Re-export the bundle with `{EXPORT_COMMAND} --attention gqa`.')
        self._logits_shape = tuple(logits.shape)

    @classmethod
    def from_bundle(cls, bundle: Bundle, precision: str, max_context: int,
                    kv_block: int = 256, providers=None, **session_options):
        """Open the ``precision`` decoder of a bundle.

        ``kv_block`` is not used: the buffers are reserved whole (lazily mapped) and fill
        as the context grows.
        """
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
        self._binding = None

    def close(self) -> None:
        self.release()
        self._session = None

    def _truncate(self, n: int) -> None:
        pass  # slots past seqlens_k are never read; the next tokens overwrite them

    def _bound_buffers(self):
        """Return the IOBinding with every KV buffer bound as past input and present output."""
        if self._binding is not None:
            return self._binding
        binding = self._session.io_binding()
        self._logits = np.zeros(self._logits_shape, np.float32)
        binding.bind_ortvalue_output(self._io.logits,
                                     ort.OrtValue.ortvalue_from_numpy(self._logits))
        for tensor in self._io.cache:
            hkv, d, dtype = self._specs[tensor.past]
            # np.zeros of this size is a lazy mapping: pages become resident when written
            buf = np.zeros((1, hkv, self.max_context, d), dtype)
            value = ort.OrtValue.ortvalue_from_numpy(buf)
            self._buffers[tensor.past], self._ort_values[tensor.past] = buf, value
            binding.bind_ortvalue_input(tensor.past, value)
            binding.bind_ortvalue_output(tensor.present, value)  # written in place
        self._binding = binding
        return binding

    def _append(self, embeds: np.ndarray) -> np.ndarray:
        start, t = self.cached_tokens, embeds.shape[0]
        if start + t > self.max_context:
            raise ValueError(f'{start + t} tokens exceed max_context {self.max_context}')
        io = self._io
        binding = self._bound_buffers()
        embeds = np.ascontiguousarray(embeds[None], dtype=np.float32)
        binding.bind_cpu_input(io.inputs_embeds, embeds)
        binding.bind_cpu_input(io.seqlens_k, np.array([start + t - 1], np.int32))
        binding.bind_cpu_input(io.total_sequence_length, np.array(start + t, np.int32))
        self._session.run_with_iobinding(binding)
        return self._logits[0, -1].copy()
