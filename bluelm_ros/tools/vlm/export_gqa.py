"""Decoder layers on ONNX Runtime's fused ``GroupQueryAttention`` (``com.microsoft``).

The second decoder layout of a bundle (``vlm-export --attention gqa``). Each layer's
attention is one ``GroupQueryAttention`` node: rotary embedding, causal masking, softmax
and the KV cache write are fused, and the cache is one shared buffer per layer and K/V,
``[1, kv_heads, max_context, head_dim]``, bound as both the past input and the present
output (ONNX Runtime then writes the new tokens in place and reads only the filled
slots: ``seqlens_k`` + 1 of them). No attention mask or position input exists: positions
are the slot indices, as the engine's prompts always are.

KV dtypes: float32 or float16. With float16 the whole op runs in float16 (Casts around it;
the RoPE tables are float16 too): measured on the 3B shapes, an fp32-query op over an
fp16 cache converts the *whole* buffer every call (8.5 ms per layer and token at 2048
slots, 10x the fp16 op's 0.9 ms). The op's int8 cache takes *static* per-tensor or
per-channel scales, which need calibration on real activations: not offered until a real
checkpoint can calibrate them.

Graph contract (names in :class:`~bluelm_ros.runtime.vlm.bundle.DecoderIO`)::

    inputs_embeds [1, T, hidden] f32, seqlens_k [1] i32 (filled slots after this call - 1),
    total_sequence_length [] i32 (filled slots after this call),
    past_key_values.{i}.key/.value [1, kv_heads, max_context, head_dim]  (shared buffers)
    -> logits [1, 1, vocab] (last position), present.{i}.key/.value (the same buffers)
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from bluelm_ros.tools.vlm.modeling import DecoderLayer, LanguageModel, RotaryEmbedding

GQA_KV_DTYPES = ('float32', 'float16')
COS_CACHE, SIN_CACHE = 'rope.cos_cache', 'rope.sin_cache'


class GroupQueryAttentionOp(torch.autograd.Function):
    """``com.microsoft::GroupQueryAttention`` on packed QKV, for the TorchScript exporter.

    ``forward`` only has to give the traced graph its output shapes (ONNX Runtime computes
    the attention); ``symbolic`` emits the fused node.
    """

    @staticmethod
    def forward(ctx, qkv, past_key, past_value, seqlens_k, total_length, cos_cache,
                sin_cache, num_heads: int, kv_heads: int):
        b, t, _ = qkv.shape
        return (qkv.new_zeros(b, t, num_heads * past_key.shape[-1]), past_key.clone(),
                past_value.clone())

    @staticmethod
    def symbolic(g, qkv, past_key, past_value, seqlens_k, total_length, cos_cache,
                 sin_cache, num_heads: int, kv_heads: int):
        from torch.onnx.symbolic_helper import _optional_input_placeholder_tensor
        absent = _optional_input_placeholder_tensor(g)  # key/value: packed in qkv
        outputs = g.op('com.microsoft::GroupQueryAttention', qkv, absent, absent, past_key,
                       past_value, seqlens_k, total_length, cos_cache, sin_cache,
                       num_heads_i=num_heads, kv_num_heads_i=kv_heads, do_rotary_i=1,
                       rotary_interleaved_i=0, outputs=3)
        for out, like in zip(outputs, (qkv, past_key, past_value)):
            out.setType(like.type())  # the exporter cannot infer a contrib op's outputs
        return outputs


def _stacked_linear(*linears: nn.Linear) -> nn.Linear:
    """One Linear computing several on the same input (outputs concatenated)."""
    first = linears[0]
    out = nn.Linear(first.in_features, sum(m.out_features for m in linears),
                    bias=first.bias is not None)
    with torch.no_grad():
        out.weight.copy_(torch.cat([m.weight for m in linears]))
        if first.bias is not None:
            out.bias.copy_(torch.cat([m.bias for m in linears]))
    return out


class GqaLayerForExport(nn.Module):
    """One LLaMA block whose attention is a single fused GroupQueryAttention node.

    Same weights and maths as :class:`~bluelm_ros.tools.vlm.modeling.DecoderLayer`
    (half-split RoPE, scale ``1/sqrt(head_dim)``, causal). The q/k/v projections are one
    MatMul (the op takes packed QKV) and so are gate/up: 3 of 7 weight MatMuls fewer per
    layer and decode step, where each quantized GEMV is short and its dispatch shows.
    Output columns are only concatenated, so the 4-bit blocks (along the input axis) are
    the same as the separate projections'.
    """

    def __init__(self, layer: DecoderLayer, kv_dtype: str = 'float32'):
        super().__init__()
        self.layer = layer
        self.dtype = getattr(torch, kv_dtype)  # the op's compute type = the cache's
        attn, mlp = layer.self_attn, layer.mlp
        self.qkv_proj = _stacked_linear(attn.q_proj, attn.k_proj, attn.v_proj)
        self.gate_up_proj = _stacked_linear(mlp.gate_proj, mlp.up_proj)
        self.intermediate = mlp.gate_proj.out_features

    def forward(self, hidden, past_key, past_value, seqlens_k, total_length, cos_cache,
                sin_cache):
        """Return ``(hidden, present_key, present_value)``."""
        layer, attn, mlp = self.layer, self.layer.self_attn, self.layer.mlp
        qkv = self.qkv_proj(layer.input_layernorm(hidden)).to(self.dtype)
        out, key, value = GroupQueryAttentionOp.apply(
            qkv, past_key, past_value, seqlens_k, total_length, cos_cache, sin_cache,
            attn.num_heads, attn.num_kv_heads)
        hidden = hidden + attn.o_proj(out.float())
        gate, up = self.gate_up_proj(layer.post_attention_layernorm(hidden)).split(
            self.intermediate, dim=-1)
        return hidden + mlp.down_proj(mlp.act(gate) * up), key, value


def rope_tables(lm: LanguageModel, dtype: str = 'float32') -> tuple:
    """``(cos, sin)`` caches ``[max_position_embeddings, head_dim / 2]`` in ``dtype``.

    Computed with the model's own rotary module, so scaled RoPE variants carry over.
    """
    cfg = lm.config
    rotary = lm.rotary_emb
    if any(b.is_meta for b in rotary.buffers()):
        rotary = RotaryEmbedding(cfg)
    positions = torch.arange(cfg.max_position_embeddings)[None]
    with torch.no_grad():
        cos, sin = rotary(positions, torch.float32)
    half = cfg.head_dim // 2
    return (np.ascontiguousarray(cos[0, :, :half].numpy().astype(dtype)),
            np.ascontiguousarray(sin[0, :, :half].numpy().astype(dtype)))


def layer_example(lm: LanguageModel, kv_dtype: str, filled: int = 5, new: int = 3) -> tuple:
    """Return example inputs for tracing one layer (shapes only)."""
    cfg = lm.config
    cap = filled + new + 1
    kv = torch.zeros(1, cfg.num_key_value_heads, cap, cfg.head_dim,
                     dtype=getattr(torch, kv_dtype))
    table = torch.zeros(cfg.max_position_embeddings, cfg.head_dim // 2, dtype=kv.dtype)
    return (torch.randn(1, new, cfg.hidden_size), kv, kv.clone(),
            torch.tensor([filled + new - 1], dtype=torch.int32),
            torch.tensor(filled + new, dtype=torch.int32), table, table.clone())


LAYER_INPUTS = ('hidden_in', 'past_key', 'past_value', 'seqlens_k', 'total_sequence_length',
                'cos_cache', 'sin_cache')
LAYER_OUTPUTS = ('hidden_out', 'key', 'value')
LAYER_AXES = {'hidden_in': {0: 'batch', 1: 'seq'}, 'hidden_out': {0: 'batch', 1: 'seq'},
              'past_key': {2: 'max_context'}, 'past_value': {2: 'max_context'},
              'key': {2: 'max_context'}, 'value': {2: 'max_context'}}
