"""Export a BlueLM-V model to an ONNX Runtime bundle (vision graph, decoder graph, embeddings).

The bundle is what :mod:`bluelm_ros.runtime.vlm.engine` runs without torch. Its format
(file names, hashes, the graphs' input/output names, written into the manifest) is owned
by :mod:`bluelm_ros.runtime.vlm.bundle`; this module writes it::

    bundle/
      manifest.json            format version, files (sha256 + bytes), precisions, options
      config.json              the BlueLMVConfig
      tokenizer.json           (+ the other tokenizer files found next to the model)
      embed_tokens.npy         [vocab, hidden] token embedding table (numpy lookup, mmap)
      vision_fp32.onnx(.data)  tiles [N, 3, S, S] -> image_embeds [N, tokens_per_tile, hidden]
      vision_int8.onnx(.data)  same, MatMul weights int8 (dynamic quantization)
      decoder_fp32.onnx(.data) inputs_embeds + KV buffers -> last logits + new KV
      decoder_int4.onnx(.data) same, MatMul weights 4-bit (MatMulNBits)

Decoder I/O (one sequence; ``C`` = KV buffer capacity, ``T`` = new tokens; the names are
``bundle.DecoderIO``'s)::

    inputs_embeds            [1, T, hidden] float32
    position_ids             [1, T] int64
    attention_mask           [1, C] int64   1 = slot holds a past token
    past_key_values.{i}.key  [1, kv_heads, C, head_dim]  (kv dtype of the manifest)
    past_key_values.{i}.value
    -> logits                [1, 1, vocab]  (last position only: prefill never pays lm_head
                                             for the whole chunk)
    -> present.{i}.key       [1, kv_heads, T, head_dim]  keys of the NEW tokens only
    -> present.{i}.value

With ``kv_dtype="int8"`` the cache is int8 with one float32 scale per (head, slot):
``past_key_values.{i}.key_scale`` ``[1, kv_heads, C, 1]`` in, ``present.{i}.key_scale`` out
(same for values); ``float16`` halves the cache, ``int8`` quarters it.

The runtime owns fixed KV buffers and writes the new keys/values into slots ``P..P+T``.
Attention is computed against the whole buffer (masked) plus the new tokens, with the
softmax taken over the concatenated scores: no graph ever copies the KV cache (a plain
``concat(past, new)`` export copies ~1 GB per decode step at 2048 tokens on the 3B model).

The decoder is exported **part by part** (RoPE/mask prologue, each layer, final norm +
lm_head) and the parts are stitched into one graph, so a 2.7B model exports and quantizes
with about one layer of weights in memory. A model built on the ``meta`` device (random
weights) is materialised one part at a time, which is how the 3B benchmark bundle is made
without 11 GB of RAM.

CLI::

    bluelm-ros vlm-export MODEL_DIR OUT_DIR            # from save_pretrained / vlm-convert
    bluelm-ros vlm-export --random bluelm-v-3b OUT_DIR  # random weights (benchmarks)
"""

from __future__ import annotations

import argparse
import copy
import datetime
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import warnings
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import onnx
import torch
from torch import nn
from tqdm import tqdm

from bluelm_ros.runtime.vlm import bundle
from bluelm_ros.runtime.vlm.bundle import (DecoderIO, EMBED_NAME, graph_file, MANIFEST_NAME,
                                           VisionIO)
from bluelm_ros.runtime.vlm.config import BlueLMVConfig, CONFIG_FILE
from bluelm_ros.runtime.vlm.tokenizer import TOKENIZER_FILE, TOKENIZER_FILES
from bluelm_ros.tools.vlm import export_gqa
from bluelm_ros.tools.vlm.configs import load_config
from bluelm_ros.tools.vlm.export_gqa import GQA_KV_DTYPES
from bluelm_ros.tools.vlm.vision_fusion import (FUSED_QUANT_OPS, fuse_vision_graph,
                                                PLAIN_QUANT_OPS)
from bluelm_ros.tools.vlm.modeling import (BlueLMV, DecoderLayer, LanguageModel, RMSNorm,
                                           RotaryEmbedding, VisionEmbeddings, apply_rope)

OPSET = 17
VISION_PRECISIONS = ('fp32', 'int8')
DECODER_PRECISIONS = ('fp32', 'int4')
LM_HEAD_PRECISIONS = ('fp32', 'int8', 'int4')
KV_DTYPES = ('float32', 'float16', 'int8')
# kv_buffer: our engine-owned buffers read by plain ONNX ops (runs on any ORT build);
# gqa: ORT's fused GroupQueryAttention contrib op on a shared buffer (export_gqa.py)
ATTENTIONS = ('kv_buffer', 'gqa')
_MASK_MIN = torch.finfo(torch.float32).min
# seed offsets of the parts of a random (meta-device) model
HEAD_SEED, EMBED_SEED, VISION_SEED = 10_000, 20_000, 30_000


@dataclass
class ExportOptions:
    """What to export and how to quantize it.

    Defaults are the ARM-friendly ones measured in ``shared/notes/onnxruntime.md``:
    4-bit symmetric blocks of 32 with ``accuracy_level=4`` (int8 activations, the path
    KleidiAI accelerates on ARM), lm_head in 8 bits (its outliers flip argmax tokens
    at 4 bits), ViT weights int8.
    """

    vision: tuple = VISION_PRECISIONS
    decoder: tuple = DECODER_PRECISIONS
    block_size: int = 32
    symmetric: bool = True
    accuracy_level: int = 4
    lm_head: str = 'int8'
    kv_dtype: str = 'float32'
    attention: str = 'kv_buffer'
    embed_dtype: str = 'float32'
    variant: str = ''
    vision_per_channel: bool = True
    vision_fusion: bool = True
    vision_variant: str = ''
    seed: int = 0

    def validate(self) -> None:
        """Reject unknown precisions early (before minutes of export)."""
        for p in self.vision:
            if p not in VISION_PRECISIONS:
                raise ValueError(f'vision precision {p!r} not in {VISION_PRECISIONS}')
        for p in self.decoder:
            if p not in DECODER_PRECISIONS:
                raise ValueError(f'decoder precision {p!r} not in {DECODER_PRECISIONS}')
        if self.lm_head not in LM_HEAD_PRECISIONS:
            raise ValueError(f'lm_head {self.lm_head!r} not in {LM_HEAD_PRECISIONS}')
        if self.kv_dtype not in KV_DTYPES:
            raise ValueError(f'kv_dtype {self.kv_dtype!r} not in {KV_DTYPES}')
        if self.attention not in ATTENTIONS:
            raise ValueError(f'attention {self.attention!r} not in {ATTENTIONS}')
        if self.attention == 'gqa' and self.kv_dtype not in GQA_KV_DTYPES:
            raise ValueError(f'attention gqa takes kv_dtype {" or ".join(GQA_KV_DTYPES)} '
                             '(its int8 cache needs calibrated static scales)')
        if self.embed_dtype not in ('float32', 'float16'):
            raise ValueError('embed_dtype must be float32 or float16')
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError('block_size must be a power of two >= 16')
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ValueError('accuracy_level must be 0..4')
        for v in (self.variant, self.vision_variant):
            if v and not v.replace('-', '').isalnum():
                raise ValueError('variants must be letters, digits and dashes')

    def decoder_key(self, precision: str) -> str:
        """Manifest key and file stem of a decoder precision (``int4`` + variant)."""
        return f'{precision}-{self.variant}' if self.variant else precision

    def vision_key(self, precision: str) -> str:
        """Manifest key and file stem of a vision precision (``int8`` + variant)."""
        return f'{precision}-{self.vision_variant}' if self.vision_variant else precision


# ---------------------------------------------------------------------------
# random weights for meta-device models (materialised one part at a time)


def _is_meta(module: nn.Module) -> bool:
    return any(t.is_meta for t in list(module.parameters()) + list(module.buffers()))


def _materialize(module: nn.Module, seed: int) -> nn.Module:
    """Give a meta-device module real random weights (BlueLMV's init scheme).

    Buffers are not handled (RoPE's ``inv_freq`` is rebuilt by the decoder export).
    """
    if not _is_meta(module):
        return module
    module.to_empty(device='cpu')
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
                m.weight.normal_(0.0, 0.02, generator=gen)
                if getattr(m, 'bias', None) is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.LayerNorm):
                m.weight.fill_(1.0)
                m.bias.zero_()
            elif isinstance(m, RMSNorm):
                m.weight.fill_(1.0)
            elif isinstance(m, VisionEmbeddings) and m.class_embedding is not None:
                m.class_embedding.normal_(0.0, 0.02, generator=gen)  # CLIP's class token
    return module


def _release(module: nn.Module, was_meta: bool) -> None:
    # back to meta so a 3B random model never holds more than one part in RAM
    if was_meta:
        module.to('meta')


# ---------------------------------------------------------------------------
# torch modules that define the exported graphs


class VisionForExport(nn.Module):
    """Tiles -> projected image embeddings (ViT + downsampler + projector)."""

    def __init__(self, model: BlueLMV):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[N, 3, S, S]`` -> ``[N, tokens_per_tile, hidden]``."""
        return self.model.encode_tiles(pixel_values)


class DecoderPrologue(nn.Module):
    """RoPE tables and the additive attention bias shared by all layers.

    The bias has shape ``[1, 1, 1, T, C + T]``: the first ``C`` columns mask the buffer
    slots (``attention_mask``), the last ``T`` are causal among the new tokens.
    """

    def __init__(self, lm: LanguageModel):
        super().__init__()
        self.rotary_emb = lm.rotary_emb

    def forward(self, position_ids, attention_mask):
        """Return ``(cos, sin, bias)``."""
        cos, sin = self.rotary_emb(position_ids, torch.float32)
        t = position_ids.shape[1]
        past = attention_mask[:, None, :].bool().expand(-1, t, -1)    # [1, T, C]
        i = torch.arange(t, device=position_ids.device)
        causal = (i[None, :] <= i[:, None])[None].expand(attention_mask.shape[0], -1, -1)
        keep = torch.cat([past, causal], dim=-1)[:, None, None]       # [1, 1, 1, T, C+T]
        bias = torch.zeros(keep.shape, dtype=torch.float32).masked_fill(~keep, _MASK_MIN)
        return cos, sin, bias


class DecoderLayerForExport(nn.Module):
    """One LLaMA block reading the KV buffer in place and returning only the new K/V.

    Same weights and maths as :class:`~bluelm_ros.tools.vlm.modeling.DecoderLayer`; only the
    attention is arranged for a fixed buffer: scores against the buffer and against the
    new tokens are concatenated before the softmax (a few KB per decode step) instead of
    concatenating keys and values (the whole cache). Query heads are grouped per KV head
    (``[kv_heads, rep * T, head_dim]``), so GQA never repeats the cache either.
    """

    def __init__(self, layer: DecoderLayer, kv_dtype: str = 'float32'):
        super().__init__()
        self.layer = layer
        attn = layer.self_attn
        self.num_heads = attn.num_heads
        self.num_kv_heads = attn.num_kv_heads
        self.head_dim = attn.head_dim
        self.kv_dtype = getattr(torch, kv_dtype)

    @staticmethod
    def quantize_kv(x):
        """Symmetric int8 per (head, token) with an absmax scale: ``(int8, scale)``."""
        scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / 127.0
        return torch.round(x / scale).clamp(-127, 127).to(torch.int8), scale

    def forward(self, hidden, cos, sin, bias, past_key, past_value, *past_scales):
        """Return ``(hidden, key, value[, key_scale, value_scale])`` for ``T`` new tokens.

        With an int8 cache, ``past_scales`` are the per-slot scales and the new keys and
        values come back quantized (the new tokens themselves attend in float32).
        """
        layer, attn = self.layer, self.layer.self_attn
        b, t, _ = hidden.shape
        hkv, hd = self.num_kv_heads, self.head_dim
        rep = self.num_heads // hkv
        x = layer.input_layernorm(hidden)
        q = attn.q_proj(x).view(b, t, self.num_heads, hd).transpose(1, 2)
        k = attn.k_proj(x).view(b, t, hkv, hd).transpose(1, 2)
        v = attn.v_proj(x).view(b, t, hkv, hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        past_k = past_key.float()
        past_v = past_value.float()
        cap = past_k.shape[2]
        # heads h = g * rep + r share KV head g (repeat_kv's layout)
        qg = (q * hd ** -0.5).reshape(b, hkv, rep * t, hd)
        past_scores = qg @ past_k.transpose(2, 3)
        if past_scales:
            # int8 cache: scales multiply the [rows, C] scores and probabilities, never
            # the [C, head_dim] cache (one pass less over the whole cache per layer)
            past_scores = past_scores * past_scales[0].transpose(2, 3)
        scores = torch.cat([past_scores, qg @ k.transpose(2, 3)], dim=-1)
        scores = scores.view(b, hkv, rep, t, cap + t) + bias
        probs = torch.softmax(scores, dim=-1).view(b, hkv, rep * t, cap + t)
        past_probs = probs[..., :cap]
        if past_scales:
            past_probs = past_probs * past_scales[1].transpose(2, 3)
        out = past_probs @ past_v + probs[..., cap:] @ v
        out = out.view(b, self.num_heads, t, hd).transpose(1, 2).reshape(b, t, -1)
        hidden = hidden + attn.o_proj(out)
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        if self.kv_dtype == torch.int8:
            (kq, ks), (vq, vs) = self.quantize_kv(k), self.quantize_kv(v)
            return hidden, kq, vq, ks, vs
        return hidden, k.to(self.kv_dtype), v.to(self.kv_dtype)


class DecoderEpilogue(nn.Module):
    """Final RMSNorm + lm_head on the last position."""

    def __init__(self, lm: LanguageModel):
        super().__init__()
        self.lm = lm

    def forward(self, hidden):
        """``[1, T, hidden]`` -> ``[1, 1, vocab]``."""
        return self.lm.logits(self.lm.norm(hidden[:, -1:]))


# ---------------------------------------------------------------------------
# ONNX helpers


def _to_onnx(module: nn.Module, args: tuple, input_names, output_names,
             dynamic_axes, custom_opsets: Optional[dict] = None) -> onnx.ModelProto:
    """Export with the TorchScript exporter into memory (parts stay < 2 GB)."""
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter('ignore')
        torch.onnx.export(module, args, buf, input_names=list(input_names),
                          output_names=list(output_names), dynamic_axes=dynamic_axes,
                          opset_version=OPSET, dynamo=False, do_constant_folding=True,
                          custom_opsets=custom_opsets)
    return onnx.load_from_string(buf.getvalue())


def quantize_nbits(model: onnx.ModelProto, bits: int, opts: ExportOptions,
                   exclude=()) -> onnx.ModelProto:
    """Block-wise weight-only quantization of every constant MatMul (MatMulNBits).

    The quantizer's class defaults differ from the CLI's, so every setting is passed.
    """
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer)
    cfg = DefaultWeightOnlyQuantConfig(block_size=opts.block_size,
                                       is_symmetric=opts.symmetric,
                                       accuracy_level=opts.accuracy_level, bits=bits)
    q = MatMulNBitsQuantizer(model, algo_config=cfg, nodes_to_exclude=list(exclude))
    # it logs every node at INFO once anything configured the root logger; bars suffice
    logging.getLogger('onnxruntime.quantization.matmul_nbits_quantizer').setLevel(
        logging.WARNING)
    q.process()
    return q.model.model


def quantize_int8_dynamic(src: str, dst: str, per_channel: bool,
                          ops=tuple(PLAIN_QUANT_OPS)) -> list:
    """Int8 weights + dynamically quantized activations for ``ops`` (ViT).

    The MatMuls after the tower (downsampler, projector: 196 tokens per tile, a few % of
    the FLOPs) stay float: quantizing them too cost the 3B tower's embedding cosine to
    FP32 0.9990 -> 0.9994 at the same speed. Returns the names kept in float.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic
    graph = onnx.load(src, load_external_data=False).graph
    keep_float = [n.name for n in graph.node
                  if n.op_type == 'MatMul' and '/vision_tower/' not in n.name]
    # DefaultTensorType: shape inference cannot type the outputs of fused contrib ops
    quantize_dynamic(src, dst, weight_type=QuantType.QInt8, op_types_to_quantize=list(ops),
                     per_channel=per_channel, use_external_data_format=True,
                     nodes_to_exclude=keep_float,
                     extra_options={'MatMulConstBOnly': True,
                                    'DefaultTensorType': onnx.TensorProto.FLOAT})
    return keep_float


def _rename_into(part: onnx.ModelProto, graph: onnx.GraphProto, prefix: str,
                 io_map: dict) -> None:
    """Append ``part``'s nodes and initializers to ``graph``.

    Names in ``io_map`` (the part's inputs and outputs) are mapped to the stitched
    graph's tensor names; every other name gets ``prefix`` so parts never collide.
    """
    def rn(name):
        if not name:
            return name
        return io_map.get(name, prefix + name)

    g = part.graph
    for i, node in enumerate(g.node):
        node.input[:] = [rn(x) for x in node.input]
        node.output[:] = [rn(x) for x in node.output]
        node.name = prefix + (node.name or f'{node.op_type}_{i}')
        graph.node.append(node)
    for init in g.initializer:
        init.name = rn(init.name)
        graph.initializer.append(init)


def _save_onnx(model: onnx.ModelProto, path: str) -> list:
    """Save with weights in ``<file>.data``; return the files written (basenames)."""
    data = os.path.basename(path) + '.data'
    for p in (path, path + '.data'):
        if os.path.exists(p):
            os.remove(p)
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data, size_threshold=1024)
    files = [os.path.basename(path)]
    if os.path.exists(path + '.data'):
        files.append(data)
    return files


# ---------------------------------------------------------------------------
# exporters


def export_vision(model: BlueLMV, out_dir: str, opts: ExportOptions) -> dict:
    """Write the vision graphs; return manifest entries by precision."""
    cfg = model.config
    was_meta = _is_meta(model.vision_tower)
    parts = [model.vision_tower, model.downsampler, model.projector]
    for i, p in enumerate(parts):
        if p is not None:
            _materialize(p, opts.seed + VISION_SEED + i)
    s = cfg.vision.image_size
    io = VisionIO()
    entries = {}
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        fp32 = os.path.join(tmp, 'vision.onnx')
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter('ignore')
            torch.onnx.export(VisionForExport(model).eval(), (torch.randn(2, 3, s, s),), fp32,
                              input_names=[io.pixel_values], output_names=[io.image_embeds],
                              dynamic_axes={io.pixel_values: {0: 'tiles'},
                                            io.image_embeds: {0: 'tiles'}},
                              opset_version=OPSET, dynamo=False)
        for p in parts:
            if p is not None:
                _release(p, was_meta)
        io_info = {'io': io.to_entry(), 'inputs': {io.pixel_values: ['tiles', 3, s, s]},
                   'outputs': {io.image_embeds: ['tiles', cfg.tokens_per_tile,
                                                 cfg.text.hidden_size]}}
        fusion, quant_ops = None, PLAIN_QUANT_OPS
        if opts.vision_fusion:
            fused = os.path.join(tmp, 'vision_fused.onnx')
            fusion = {'method': 'onnxruntime.transformers.optimizer', 'model_type': 'clip',
                      'opt_level': 0, 'ops': fuse_vision_graph(fp32, fused, cfg.vision)}
            fp32, quant_ops = fused, FUSED_QUANT_OPS
        for prec in tqdm(opts.vision, desc='vision', unit='graph'):
            key = opts.vision_key(prec)
            path = os.path.join(out_dir, graph_file('vision', key))
            if prec == 'fp32':
                files = _save_onnx(onnx.load(fp32), path)
            else:
                kept = quantize_int8_dynamic(fp32, os.path.join(tmp, 'vision_q.onnx'),
                                             opts.vision_per_channel, quant_ops)
                files = _save_onnx(onnx.load(os.path.join(tmp, 'vision_q.onnx')), path)
            quant = None if prec == 'fp32' else {
                'method': 'onnxruntime.quantization.quantize_dynamic', 'weight_type': 'int8',
                'ops': list(quant_ops), 'per_channel': opts.vision_per_channel,
                'float_nodes': kept}
            entries[key] = {'files': files, 'precision': prec, 'quantization': quant,
                            'fusion': fusion, **io_info}
    return entries


def _decoder_parts(lm: LanguageModel, opts: ExportOptions, kv_dtype: str, seed: int):
    """Yield ``(kind, index, onnx part)`` for prologue, layers, epilogue (fp32)."""
    cfg = lm.config
    d = cfg.hidden_size
    t, cap = 3, 5
    tc = {0: 'batch', 1: 'seq'}
    was_meta = _is_meta(lm)

    if _is_meta(lm.rotary_emb):
        lm.rotary_emb = RotaryEmbedding(cfg)  # a buffer only: recompute it
    if opts.attention == 'gqa':  # positions and masking live inside the fused op
        layer_class = export_gqa.GqaLayerForExport
        trace = (export_gqa.layer_example(lm, kv_dtype), export_gqa.LAYER_INPUTS,
                 export_gqa.LAYER_OUTPUTS, export_gqa.LAYER_AXES, {'com.microsoft': 1})
    else:
        pos = torch.arange(cap, cap + t)[None]
        mask = torch.ones(1, cap, dtype=torch.long)
        yield 'prologue', None, _to_onnx(
            DecoderPrologue(lm), (pos, mask), ['position_ids', 'attention_mask'],
            ['cos', 'sin', 'bias'],
            {'position_ids': tc, 'attention_mask': {0: 'batch', 1: 'capacity'},
             'cos': tc, 'sin': tc, 'bias': {0: 'batch', 3: 'seq', 4: 'keys'}})
        layer_class = DecoderLayerForExport
        trace = _kv_buffer_layer_trace(lm, kv_dtype) + (None,)
    for i, layer in enumerate(lm.layers):
        _materialize(layer, seed + 1 + i)
        part = _to_onnx(layer_class(layer, kv_dtype).eval(), *trace)
        _release(layer, was_meta)
        yield 'layer', i, part

    head = [lm.norm] + ([lm.embed_tokens] if lm.lm_head is None else [lm.lm_head])
    for m in head:
        # tied heads must draw the same table as export_embeddings
        _materialize(m, seed + (EMBED_SEED if m is lm.embed_tokens else HEAD_SEED))
    part = _to_onnx(DecoderEpilogue(lm).eval(), (torch.randn(1, t, d),), ['hidden'],
                    ['logits'], {'hidden': tc, 'logits': {0: 'batch'}})
    for m in head:
        _release(m, was_meta)
    yield 'epilogue', None, part


def _kv_buffer_layer_trace(lm: LanguageModel, kv_dtype: str) -> tuple:
    """Return ``(example args, input names, output names, axes)`` to trace a kv_buffer layer."""
    cfg = lm.config
    d, hkv, hd = cfg.hidden_size, cfg.num_key_value_heads, cfg.head_dim
    t, cap = 3, 5
    tc = {0: 'batch', 1: 'seq'}
    kvt = getattr(torch, kv_dtype)
    args = (torch.randn(1, t, d), torch.randn(1, t, hd), torch.randn(1, t, hd),
            torch.zeros(1, 1, 1, t, cap + t), torch.zeros(1, hkv, cap, hd, dtype=kvt),
            torch.zeros(1, hkv, cap, hd, dtype=kvt))
    names_in = ['hidden_in', 'cos', 'sin', 'bias', 'past_key', 'past_value']
    names_out = ['hidden_out', 'key', 'value']
    if kv_dtype == 'int8':
        args += (torch.ones(1, hkv, cap, 1), torch.ones(1, hkv, cap, 1))
        names_in += ['past_key_scale', 'past_value_scale']
        names_out += ['key_scale', 'value_scale']
    axes = {'hidden_in': tc, 'cos': tc, 'sin': tc, 'bias': {0: 'batch', 3: 'seq', 4: 'keys'},
            'hidden_out': tc}
    axes.update({n: {0: 'batch', 2: 'capacity'} for n in names_in if n.startswith('past')})
    axes.update({n: {0: 'batch', 2: 'seq'} for n in names_out[1:]})
    return args, names_in, names_out, axes


def export_decoders(model: BlueLMV, out_dir: str, opts: ExportOptions) -> dict:
    """Write the decoder graphs (one stitched graph per precision)."""
    lm = model.language_model
    cfg = lm.config
    n = cfg.num_hidden_layers
    graphs = {}
    for prec in opts.decoder:
        graphs[prec] = onnx.helper.make_graph([], f'bluelm_v_decoder_{opts.decoder_key(prec)}',
                                              [], [])
    kv_dtypes = {p: ('float32' if p == 'fp32' else opts.kv_dtype) for p in opts.decoder}
    ios = {kv: DecoderIO.for_layers(n, kv) for kv in set(kv_dtypes.values())}
    # parts are exported once per KV dtype (the dtype is baked into each layer's I/O)
    by_kv = {}
    for p, kv in kv_dtypes.items():
        by_kv.setdefault(kv, []).append(p)

    for kv, precs in by_kv.items():
        bar = tqdm(total=n + 2, desc=f'decoder ({"/".join(precs)}, kv {kv})', unit='part')
        io = ios[kv]
        for kind, i, part in _decoder_parts(lm, opts, kv, opts.seed):
            # the parts' own tensor names -> the stitched graph's (the bundle's names)
            if kind == 'prologue':
                prefix, io_map = 'prologue/', {'position_ids': io.position_ids,
                                               'attention_mask': io.attention_mask,
                                               'cos': 'cos', 'sin': 'sin', 'bias': 'bias'}
            elif kind == 'layer':
                prefix = f'layers.{i}/'
                io_map = {'hidden_in': io.inputs_embeds if i == 0 else f'hidden.{i}',
                          'hidden_out': f'hidden.{i + 1}', 'cos': 'cos', 'sin': 'sin',
                          'bias': 'bias', 'seqlens_k': io.seqlens_k,
                          'total_sequence_length': io.total_sequence_length,
                          'cos_cache': export_gqa.COS_CACHE,
                          'sin_cache': export_gqa.SIN_CACHE}
                for t in io.layer(i):
                    io_map[f'past_{t.kind}'] = t.past
                    io_map[t.kind] = t.present
            else:
                prefix, io_map = 'head/', {'hidden': f'hidden.{n}', 'logits': io.logits}
            for prec in precs:
                p = part if prec == precs[-1] else copy.deepcopy(part)
                if prec == 'int4':
                    if kind == 'layer':
                        p = quantize_nbits(p, 4, opts)
                    elif kind == 'epilogue' and opts.lm_head != 'fp32':
                        p = quantize_nbits(p, 8 if opts.lm_head == 'int8' else 4, opts)
                _rename_into(p, graphs[prec], prefix, io_map)
            del part
            bar.update(1)
        bar.close()

    entries = {}
    d, hkv, hd, v = cfg.hidden_size, cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size
    gqa = opts.attention == 'gqa'
    for prec, g in graphs.items():
        kv, io = kv_dtypes[prec], ios[kv_dtypes[prec]]
        onnx_kv = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(kv))
        f32, i32, i64 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT32, onnx.TensorProto.INT64
        vi = onnx.helper.make_tensor_value_info
        g.input.append(vi(io.inputs_embeds, f32, [1, 'seq', d]))
        if gqa:
            g.input.extend([vi(io.seqlens_k, i32, [1]), vi(io.total_sequence_length, i32, [])])
            for name, table in zip((export_gqa.COS_CACHE, export_gqa.SIN_CACHE),
                                   export_gqa.rope_tables(lm, kv)):
                g.initializer.append(onnx.numpy_helper.from_array(table, name))
        else:
            g.input.extend([vi(io.position_ids, i64, [1, 'seq']),
                            vi(io.attention_mask, i64, [1, 'capacity'])])
        g.output.append(vi(io.logits, f32, [1, 1, v]))
        # past/present: [1, hkv, capacity, d] in / new tokens out, or one shared buffer
        slots_in, slots_out = ('max_context', 'max_context') if gqa else ('capacity', 'seq')
        for t in io.cache:  # key/value in the KV dtype, int8 scales in float32
            scale = t.kind.endswith('_scale')
            dtype, last = (f32, 1) if scale else (onnx_kv, hd)
            g.input.append(vi(t.past, dtype, [1, hkv, slots_in, last]))
            g.output.append(vi(t.present, dtype, [1, hkv, slots_out, last]))
        opsets = [onnx.helper.make_opsetid('', OPSET)]
        if prec == 'int4' or gqa:
            opsets.append(onnx.helper.make_opsetid('com.microsoft', 1))
        m = onnx.helper.make_model(g, opset_imports=opsets, producer_name='bluelm_ros')
        m.ir_version = 8  # ORT rejects the newest IR versions onnx writes by default
        key = opts.decoder_key(prec)
        path = os.path.join(out_dir, graph_file('decoder', key))
        files = _save_onnx(m, path)
        del m
        quant = None if prec == 'fp32' else {
            'method': 'MatMulNBits', 'bits': 4, 'block_size': opts.block_size,
            'symmetric': opts.symmetric, 'accuracy_level': opts.accuracy_level,
            'lm_head': opts.lm_head}
        layout = ('shared buffer[1, kv_heads, max_context, head_dim] (past = present)'
                  if gqa else 'buffer[1, kv_heads, capacity, head_dim]'
                  + (' + scale[1, kv_heads, capacity, 1]' if kv == 'int8' else ''))
        entries[key] = {'files': files, 'precision': prec, 'quantization': quant,
                        'kv_dtype': kv, 'kv_layout': layout, 'attention': opts.attention,
                        'num_layers': n, 'logits': 'last', 'io': io.to_entry()}
    return entries


def export_embeddings(model: BlueLMV, out_dir: str, opts: ExportOptions) -> dict:
    """Write the token embedding table as ``.npy`` (looked up in numpy, memory-mapped)."""
    emb = model.language_model.embed_tokens
    was_meta = _is_meta(emb)
    _materialize(emb, opts.seed + EMBED_SEED)
    table = emb.weight.detach().numpy().astype(opts.embed_dtype, copy=False)
    np.save(os.path.join(out_dir, EMBED_NAME), table)
    shape = list(table.shape)
    del table
    _release(emb, was_meta)
    return {'files': [EMBED_NAME], 'dtype': opts.embed_dtype, 'shape': shape}


# ---------------------------------------------------------------------------
# tokenizer + manifest


def write_byte_tokenizer(path: str, config: BlueLMVConfig) -> None:
    """Write a placeholder byte-level tokenizer (256 bytes + specials, no merges).

    For random-weight bundles (tests, benchmarks): every string round-trips and ids fit
    any vocab >= 259 + specials. It is not a trained tokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    specials = {0: '<pad>', 1: '<s>', 2: '</s>'}
    vocab = {tok: i for i, tok in specials.items()}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    if len(vocab) > config.text.vocab_size:
        raise ValueError(f'vocab {config.text.vocab_size} too small for a byte tokenizer')
    tok = Tokenizer(models.BPE(vocab, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(specials.values()))
    tok.save(path)


def write_manifest(out_dir: str, config: BlueLMVConfig, components: dict,
                   opts: ExportOptions, extra: Optional[dict] = None) -> dict:
    """Hash every bundle file and write ``manifest.json`` (the format is bundle.py's)."""
    import onnxruntime
    fields = {
        'created': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
        'model': config.name,
        'tokens_per_tile': config.tokens_per_tile,
        'export_options': asdict(opts),
        'versions': {'torch': torch.__version__, 'onnx': onnx.__version__,
                     'onnxruntime': onnxruntime.__version__},
        'components': components, **(extra or {})}
    return bundle.write_manifest(out_dir, fields,
                                 progress=lambda names: tqdm(names, desc='sha256', unit='file'))


def export_bundle(model: BlueLMV, out_dir: str, opts: Optional[ExportOptions] = None,
                  tokenizer_dir: Optional[str] = None, extra: Optional[dict] = None,
                  update: bool = False) -> dict:
    """Export ``model`` (real or meta-device random) to a bundle folder; return the manifest.

    ``tokenizer_dir``: folder with ``tokenizer.json`` (copied with its companions); without
    one a placeholder byte tokenizer is written (random-weight bundles only).
    ``update``: add the requested graphs to an existing bundle of the same model (e.g. a
    second INT4 decoder ``variant``), keeping its other graphs, tokenizer and embeddings.
    """
    opts = opts or ExportOptions()
    opts.validate()
    os.makedirs(out_dir, exist_ok=True)
    mpath = os.path.join(out_dir, MANIFEST_NAME)
    old = {}
    if update and os.path.exists(mpath):
        with open(mpath, encoding='utf-8') as f:
            old = json.load(f)
        if old.get('model') != model.config.name:
            raise ValueError(f'{mpath}: bundle of {old.get("model")!r}, not '
                             f'{model.config.name!r}; cannot update it')
    # a stale manifest must never vouch for half-written files
    if os.path.exists(mpath):
        os.remove(mpath)
    model.eval()
    config = model.config
    config.to_json(os.path.join(out_dir, CONFIG_FILE))
    components = old.get('components', {})
    if 'tokenizer' not in components:
        if tokenizer_dir:
            src = os.path.join(tokenizer_dir, TOKENIZER_FILE)
            if not os.path.exists(src):
                raise FileNotFoundError(f'{src}: tokenizer file not found')
            for name in TOKENIZER_FILES:
                if os.path.exists(os.path.join(tokenizer_dir, name)):
                    shutil.copy2(os.path.join(tokenizer_dir, name), os.path.join(out_dir, name))
            tokenizer = 'copied'
        else:
            write_byte_tokenizer(os.path.join(out_dir, TOKENIZER_FILE), config)
            tokenizer = 'placeholder-bytes'
        components['tokenizer'] = {'files': [TOKENIZER_FILE], 'kind': tokenizer}
    if 'embeddings' not in components:
        components['embeddings'] = export_embeddings(model, out_dir, opts)
    if opts.vision:
        components.setdefault('vision', {}).update(export_vision(model, out_dir, opts))
    if opts.decoder:
        components.setdefault('decoder', {}).update(export_decoders(model, out_dir, opts))
    return write_manifest(out_dir, config, components, opts, extra)


def random_model(config: BlueLMVConfig) -> BlueLMV:
    """Build a meta-device BlueLMV whose weights are drawn part by part during export."""
    with torch.device('meta'):
        return BlueLMV(config).eval()


def main(argv=None) -> int:
    """Command line entry point."""
    ap = argparse.ArgumentParser(prog='bluelm-ros vlm-export', description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('source', help='model dir (save_pretrained/convert) or, with --random, '
                    'a config name/path')
    ap.add_argument('out_dir')
    ap.add_argument('--random', action='store_true', help='random weights from a config')
    ap.add_argument('--tokenizer-dir', help='folder with tokenizer.json (default: source)')
    ap.add_argument('--vision', default='fp32,int8', help='precisions, e.g. "int8"')
    ap.add_argument('--decoder', default='fp32,int4', help='precisions, e.g. "int4"')
    ap.add_argument('--block-size', type=int, default=32)
    ap.add_argument('--asymmetric', action='store_true')
    ap.add_argument('--accuracy-level', type=int, default=4)
    ap.add_argument('--lm-head', default='int8', choices=LM_HEAD_PRECISIONS)
    ap.add_argument('--kv-dtype', default='float32', choices=KV_DTYPES)
    ap.add_argument('--attention', default='kv_buffer', choices=ATTENTIONS,
                    help='decoder attention layout: kv_buffer (plain ONNX ops, engine-owned '
                    'buffers) or gqa (ORT GroupQueryAttention, shared buffer; kv float32/16)')
    ap.add_argument('--embed-dtype', default='float32', choices=('float32', 'float16'))
    ap.add_argument('--variant', default='', help='decoder name suffix, e.g. "b64-kv8" '
                    '-> decoder_int4-b64-kv8.onnx (several INT4 decoders in one bundle)')
    ap.add_argument('--no-vision-fusion', action='store_true',
                    help='plain vision graphs (no fused Attention/SkipLayerNorm/FastGelu)')
    ap.add_argument('--vision-variant', default='', help='vision name suffix, e.g. "fused" '
                    '-> vision_int8-fused.onnx (several vision graphs in one bundle)')
    ap.add_argument('--update', action='store_true',
                    help='add the graphs to an existing bundle instead of replacing it')
    ap.add_argument('--seed', type=int, default=0)
    a = ap.parse_args(argv)

    def precs(s):
        return tuple(p for p in s.split(',') if p)

    opts = ExportOptions(vision=precs(a.vision), decoder=precs(a.decoder),
                         block_size=a.block_size, symmetric=not a.asymmetric,
                         accuracy_level=a.accuracy_level, lm_head=a.lm_head,
                         kv_dtype=a.kv_dtype, attention=a.attention,
                         embed_dtype=a.embed_dtype, variant=a.variant,
                         vision_fusion=not a.no_vision_fusion, vision_variant=a.vision_variant,
                         seed=a.seed)
    if a.random:
        model, tok_dir = random_model(load_config(a.source)), a.tokenizer_dir
    else:
        model = BlueLMV.from_pretrained(a.source)
        tok_dir = a.tokenizer_dir or a.source
        if not os.path.exists(os.path.join(tok_dir, TOKENIZER_FILE)):
            print(f'{tok_dir}: no tokenizer.json; writing a placeholder byte tokenizer',
                  file=sys.stderr)
            tok_dir = None
    manifest = export_bundle(model, a.out_dir, opts, tokenizer_dir=tok_dir, update=a.update)
    for name, f in manifest['files'].items():
        print(f'{name:32s} {f["bytes"] / 2**20:10.1f} MiB  {f["sha256"][:12]}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
