"""BlueLM-V in PyTorch: SigLIP-style ViT, VILA token downsampler, MLP projector, LLaMA decoder.

One readable module in the spirit of a HF modeling file. Names follow the paper
(vision tower, token downsampler, projector, language model) and, where they coincide,
HF's parameter names, so converted checkpoints map one-to-one.

Design points for export (a later ONNX engine builds on this):

* The decoder takes ``inputs_embeds`` (not ids), explicit ``position_ids``, an optional
  explicit mask and **explicit past key/values** (a tuple of ``(k, v)`` per layer, each
  ``[batch, kv_heads, past_len, head_dim]``) and returns ``(logits, presents)``; no cache
  objects, no data-dependent Python control flow. :class:`DecoderForExport` flattens the
  KV tuples for ``torch.onnx.export``.
* The causal mask is built from tensor shapes (past length + query length) with
  ``arange`` comparisons, which trace cleanly (transformers 5's own mask code does not
  export with the legacy exporter).
"""

from __future__ import annotations

import json
import math
import os
from typing import Optional, Sequence

import torch
from torch import nn
import torch.nn.functional as F

from bluelm_ros.runtime.vlm.config import BlueLMVConfig, CONFIG_FILE, TextConfig, VisionConfig

WEIGHTS_NAME = 'model.safetensors'

KV = tuple  # (key, value), each [batch, kv_heads, seq, head_dim]


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Softmax attention as two matmuls (same math as ``F.scaled_dot_product_attention``).

    On CPU it is faster than PyTorch's flash kernel for short sequences (a ViT tile's 81
    patches: 1.25 s vs 2.19 s forward + backward per 452 tiles in bf16, measured here),
    slower for the decoder's long packed sequences, hence one function per module.
    """
    scores = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float('-inf'))
    return torch.softmax(scores.float(), dim=-1).to(v.dtype) @ v


# Swappable attention functions (q, k, v, attn_mask=None) -> out: the vision tower's short
# sequences and the decoder's long ones are fastest with different kernels.
VISION_ATTENTION = eager_attention
TEXT_ATTENTION = F.scaled_dot_product_attention


def activation(name: str):
    """Activation function by config name (``gelu`` is the exact erf GELU)."""
    if name == 'gelu':
        return F.gelu
    if name == 'gelu_tanh':
        return lambda x: F.gelu(x, approximate='tanh')
    if name == 'silu':
        return F.silu
    if name == 'relu':
        return F.relu
    if name == 'quick_gelu':  # CLIP's sigmoid approximation of GELU
        return lambda x: x * torch.sigmoid(1.702 * x)
    raise ValueError(f'unknown activation {name!r}')


# ---------------------------------------------------------------------------
# vision tower (SigLIP)


class VisionEmbeddings(nn.Module):
    """Patch-embedding conv + learned position embeddings (+ CLIP's class token)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.grid = config.grid
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size,
                                         config.patch_size, stride=config.patch_size,
                                         bias=config.patch_bias)
        self.class_embedding = (nn.Parameter(torch.zeros(config.hidden_size))
                                if config.class_token else None)
        n_pos = self.grid * self.grid + (1 if config.class_token else 0)
        self.position_embedding = nn.Embedding(n_pos, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[N, 3, S, S]`` -> ``[N, (1 +) grid*grid, C]`` (class token, row-major patches)."""
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        x = x.flatten(2).transpose(1, 2)
        if self.class_embedding is not None:
            cls = self.class_embedding.to(x.dtype)[None, None].expand(x.shape[0], 1, -1)
            x = torch.cat([cls, x], dim=1)
        return x + self.position_embedding.weight[None]


class VisionAttention(nn.Module):
    """Bidirectional multi-head self-attention with biases."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        c = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = c // self.num_heads
        self.q_proj = nn.Linear(c, c)
        self.k_proj = nn.Linear(c, c)
        self.v_proj = nn.Linear(c, c)
        self.out_proj = nn.Linear(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, T, C]`` -> ``[N, T, C]``."""
        n, t, c = x.shape
        shape = (n, t, self.num_heads, self.head_dim)
        q = self.q_proj(x).view(shape).transpose(1, 2)
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        out = VISION_ATTENTION(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(n, t, c))


class VisionMLP(nn.Module):
    """fc1 -> gelu(tanh) -> fc2."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.act = activation(config.hidden_act)
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the MLP."""
        return self.fc2(self.act(self.fc1(x)))


class VisionEncoderLayer(nn.Module):
    """Pre-LN transformer block."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        c, eps = config.hidden_size, config.layer_norm_eps
        self.layer_norm1 = nn.LayerNorm(c, eps=eps)
        self.self_attn = VisionAttention(config)
        self.layer_norm2 = nn.LayerNorm(c, eps=eps)
        self.mlp = VisionMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block."""
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionTower(nn.Module):
    """SigLIP ViT returning the hidden state(s) selected by ``feature_layer``.

    As in HF LLaVA, features are taken from the ``hidden_states`` tuple, i.e. *before* the
    post-layernorm (applied only if ``config.post_layernorm``). Blocks after the deepest
    selected layer are not built: with ``feature_layer = -2`` the last block is dead weight.
    """

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = VisionEmbeddings(config)
        self.layers = nn.ModuleList(VisionEncoderLayer(config)
                                    for _ in range(config.num_layers_used()))
        n = config.num_hidden_layers
        self.feature_indices = [i if i >= 0 else n + 1 + i for i in config.feature_layers]
        self.drop_first = config.feature_select_strategy == 'default'
        self.post_layernorm = (nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
                               if config.post_layernorm else None)
        # CLIP: hidden_states[0] is already the pre-layernormed embedding
        self.pre_layernorm = (nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
                              if config.pre_layernorm else None)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[N, 3, S, S]`` -> ``[N, tokens, C * len(feature_layers)]``."""
        h = self.embeddings(pixel_values)
        if self.pre_layernorm is not None:
            h = self.pre_layernorm(h)
        return self.forward_blocks(h)

    def forward_blocks(self, h: torch.Tensor) -> torch.Tensor:
        """Run the blocks on patch embeddings ``[N, grid*grid, C]``.

        Split from :meth:`forward` so the patch-embedding conv can run on another device
        than the blocks (the paper's CPU/NPU pipelining).
        """
        hidden = [h]
        for layer in self.layers:
            h = layer(h)
            hidden.append(h)
        feats = [hidden[i] for i in self.feature_indices]
        if self.post_layernorm is not None:
            feats = [self.post_layernorm(f) for f in feats]
        if self.drop_first:
            # HF's "default" strategy drops the CLS token; SigLIP has none, so there this
            # drops the top-left patch, exactly as transformers does.
            feats = [f[:, 1:] for f in feats]
        return feats[0] if len(feats) == 1 else torch.cat(feats, dim=-1)


# ---------------------------------------------------------------------------
# token downsampler + projector


class TokenDownsampler(nn.Module):
    """Merge each s x s block of patch tokens into one token of s*s*C channels.

    Layout (row-major everywhere): the ``g x g`` patch grid is zero-padded at the
    **bottom and right** to a multiple of s (VILA: 27x27 -> 28x28), then output token
    ``(i, j)`` (row-major over the ``g/s x g/s`` grid) is the concatenation of input tokens
    ``(s*i + di, s*j + dj)`` in the order ``(di, dj) = (0,0), (0,1), (1,0), (1,1)``.
    This is VILA's ``flat_square`` with its final transpose (NVILA / VILA main), which
    equals Idefics3's ``pixel_shuffle``; VILA 1.5's original omitted that transpose and so
    emitted tokens column-major. Then an optional LayerNorm (VILA) and an optional linear.
    """

    def __init__(self, config: BlueLMVConfig):
        super().__init__()
        self.grid = config.vision.grid
        self.factor = config.downsample_factor
        self.pad = (-self.grid) % self.factor
        merged = config.vision_feature_dim * self.factor ** 2
        eps = config.vision.layer_norm_eps
        self.norm = nn.LayerNorm(merged, eps=eps) if config.downsampler_norm else None
        self.linear = (nn.Linear(merged, config.downsampler_dim)
                       if config.downsampler_dim > 0 else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, g*g, C]`` -> ``[N, (g'/s)^2, s*s*C or downsampler_dim]``."""
        n, _, c = x.shape
        s, g = self.factor, self.grid
        x = x.reshape(n, g, g, c)
        if self.pad:
            x = F.pad(x, (0, 0, 0, self.pad, 0, self.pad))  # (C, cols right, rows bottom)
        gp = g + self.pad
        x = x.reshape(n, gp, gp // s, s * c)           # [n, row, col block, (dj, c)]
        x = x.permute(0, 2, 1, 3).reshape(n, gp // s, gp // s, s * s * c)  # [n, j, i, ...]
        x = x.permute(0, 2, 1, 3).reshape(n, (gp // s) ** 2, s * s * c)
        if self.norm is not None:
            x = self.norm(x)
        if self.linear is not None:
            x = self.linear(x)
        return x


class Projector(nn.Module):
    """Vision -> LLM embedding space: ``linear_1 -> act -> linear_2`` (or one linear)."""

    def __init__(self, config: BlueLMVConfig):
        super().__init__()
        d, b = config.text.hidden_size, config.projector_bias
        self.linear_1 = nn.Linear(config.projector_in_dim, d, bias=b)
        if config.projector == 'mlp2':
            self.act = activation(config.projector_act)
            self.linear_2 = nn.Linear(d, d, bias=b)
        else:
            self.act = None
            self.linear_2 = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Project features."""
        x = self.linear_1(x)
        if self.linear_2 is not None:
            x = self.linear_2(self.act(x))
        return x


# ---------------------------------------------------------------------------
# language model (LLaMA)


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 (as LLaMA)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise the last axis."""
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(config: TextConfig) -> torch.Tensor:
    """Compute RoPE inverse frequencies, Llama 3 scaled when ``config.rope_scaling`` asks.

    Llama 3 divides the low frequencies (wavelength above ``original / low_freq_factor``)
    by ``factor``, keeps the high ones (below ``original / high_freq_factor``) and blends
    linearly in between; computed in float32 in the same order as transformers.
    """
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float) / d))
    rs = config.rope_scaling
    if not rs or rs.get('rope_type') == 'default':
        return inv_freq
    factor, low, high = rs['factor'], rs['low_freq_factor'], rs['high_freq_factor']
    old_len = rs['original_max_position_embeddings']
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    """RoPE cos/sin for arbitrary ``position_ids`` (half-split rotation, as HF LLaMA)."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.register_buffer('inv_freq', rope_inv_freq(config), persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple:
        """``[B, T]`` positions -> ``(cos, sin)`` each ``[B, T, head_dim]``."""
        freqs = position_ids[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the last axis halves."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``[B, H, T, D]`` by ``[B, T, D]`` cos/sin."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``[B, Hkv, T, D]`` -> ``[B, Hkv*n_rep, T, D]`` (GQA head sharing)."""
    if n_rep == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


class Attention(nn.Module):
    """Causal GQA self-attention with RoPE and explicit past key/values."""

    def __init__(self, config: TextConfig):
        super().__init__()
        d, hd = config.hidden_size, config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = hd
        b = config.attention_bias
        self.q_proj = nn.Linear(d, self.num_heads * hd, bias=b)
        self.k_proj = nn.Linear(d, self.num_kv_heads * hd, bias=b)
        self.v_proj = nn.Linear(d, self.num_kv_heads * hd, bias=b)
        self.o_proj = nn.Linear(self.num_heads * hd, d, bias=b)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor, past: Optional[KV] = None) -> tuple:
        """Return ``(output, (k, v))`` where k/v include the past."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        rep = self.num_heads // self.num_kv_heads
        out = TEXT_ATTENTION(q, repeat_kv(k, rep), repeat_kv(v, rep), attn_mask=mask)
        out = out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)
        return self.o_proj(out), (k, v)


class MLP(nn.Module):
    """SwiGLU: ``down(act(gate(x)) * up(x))``."""

    def __init__(self, config: TextConfig):
        super().__init__()
        d, i, b = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.act = activation(config.hidden_act)
        self.gate_proj = nn.Linear(d, i, bias=b)
        self.up_proj = nn.Linear(d, i, bias=b)
        self.down_proj = nn.Linear(i, d, bias=b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the MLP."""
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm LLaMA block."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, past=None):
        """Return ``(hidden, present_kv)``."""
        h, present = self.self_attn(self.input_layernorm(x), cos, sin, mask, past)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), present


def build_attention_mask(attention_mask: Optional[torch.Tensor], q_len: int,
                         past_len, device: torch.device) -> torch.Tensor:
    """Boolean mask ``[B|1, 1, q_len, past_len+q_len]`` (True = may attend).

    * ``None``: causal over cache slots, query i sits at slot ``past_len + i``.
    * 2-D ``[B, past_len+q_len]`` (1 = real token, 0 = padding): causal AND padding.
    * 4-D: used as given (bool, or float additive as SDPA accepts).
    """
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask
    q = torch.arange(q_len, device=device) + past_len
    k = torch.arange(q_len + past_len, device=device)
    causal = (k[None, :] <= q[:, None])[None, None]
    if attention_mask is None:
        return causal
    if attention_mask.dim() != 2:
        raise ValueError('attention_mask must be None, [B, S] or [B, 1, T, S]')
    return causal & attention_mask.bool()[:, None, None, :]


class LanguageModel(nn.Module):
    """LLaMA-style decoder with explicit KV in/out."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config)
                                    for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        self.lm_head = (None if config.tie_word_embeddings else
                        nn.Linear(config.hidden_size, config.vocab_size, bias=False))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Map final hidden states to vocabulary scores with the tied or untied head."""
        if self.lm_head is None:
            return F.linear(hidden, self.embed_tokens.weight)
        return self.lm_head(hidden)

    def forward(self, inputs_embeds: torch.Tensor,
                position_ids: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None,
                past_key_values: Optional[Sequence[KV]] = None,
                last_logits_only: bool = False) -> tuple:
        """Run the decoder.

        ``inputs_embeds`` ``[B, T, D]``; ``position_ids`` ``[B, T]`` (default: past_len..);
        ``past_key_values``: per layer ``(k, v)`` ``[B, Hkv, P, hd]`` or None.
        Returns ``(logits [B, T or 1, V], presents)`` with presents ``[B, Hkv, P+T, hd]``.
        """
        b, t, _ = inputs_embeds.shape
        past_len = 0 if not past_key_values else past_key_values[0][0].shape[2]
        if position_ids is None:
            position_ids = (torch.arange(t, device=inputs_embeds.device)
                            + past_len)[None].expand(b, t)
        mask = build_attention_mask(attention_mask, t, past_len, inputs_embeds.device)
        cos, sin = self.rotary_emb(position_ids, inputs_embeds.dtype)
        h = inputs_embeds
        presents = []
        for i, layer in enumerate(self.layers):
            h, kv = layer(h, cos, sin, mask, past_key_values[i] if past_key_values else None)
            presents.append(kv)
        if last_logits_only:
            h = h[:, -1:]
        return self.logits(self.norm(h)), tuple(presents)


# ---------------------------------------------------------------------------
# full model


class BlueLMV(nn.Module):
    """Vision tower -> token downsampler -> projector -> LLaMA decoder."""

    def __init__(self, config: BlueLMVConfig):
        super().__init__()
        self.config = config
        self.vision_tower = VisionTower(config.vision)
        self.downsampler = (TokenDownsampler(config) if config.downsampler != 'none'
                            else None)
        self.projector = Projector(config)
        self.language_model = LanguageModel(config.text)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
        # random-init scheme for tests and from-scratch training (LLaMA-like std 0.02)
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    # -- images ------------------------------------------------------------------

    def encode_tiles(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[N, 3, S, S]`` tiles -> ``[N, tokens_per_tile, D]`` LLM-space embeddings."""
        x = self.vision_tower(pixel_values)
        if self.downsampler is not None:
            x = self.downsampler(x)
        return self.projector(x)

    def encode_images(self, pixel_values: torch.Tensor,
                      batch_size: Optional[int] = None) -> torch.Tensor:
        """Encode tiles in batches of ``batch_size`` (config default 4).

        Returns ``[N * tokens_per_tile, D]`` in tile order, ready for :meth:`merge`.
        """
        bs = batch_size or self.config.image.tile_batch_size
        outs = [self.encode_tiles(pixel_values[i:i + bs])
                for i in range(0, pixel_values.shape[0], bs)]
        x = torch.cat(outs, dim=0)
        return x.reshape(-1, x.shape[-1])

    # -- text ----------------------------------------------------------------------

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids -> embeddings."""
        return self.language_model.embed_tokens(input_ids)

    def merge(self, input_ids: torch.Tensor,
              image_embeds: Optional[torch.Tensor]) -> torch.Tensor:
        """Embed ``input_ids`` and replace image placeholder tokens, in order."""
        embeds = self.embed_tokens(input_ids)
        is_image = input_ids == self.config.image_token_id
        n_slots = int(is_image.sum())
        n_feats = 0 if image_embeds is None else image_embeds.reshape(
            -1, embeds.shape[-1]).shape[0]
        if n_slots != n_feats:
            raise ValueError(f'{n_slots} image placeholder tokens (id '
                             f'{self.config.image_token_id}) but {n_feats} image embeddings')
        if n_slots == 0:
            return embeds
        return embeds.masked_scatter(is_image[..., None],
                                     image_embeds.to(embeds.dtype))

    # -- forward / generation ----------------------------------------------------------

    def forward(self, input_ids: Optional[torch.Tensor] = None,
                pixel_values: Optional[torch.Tensor] = None,
                image_embeds: Optional[torch.Tensor] = None,
                inputs_embeds: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None,
                past_key_values: Optional[Sequence[KV]] = None,
                last_logits_only: bool = False) -> tuple:
        """Return ``(logits, presents)``; images via ``pixel_values`` or ``image_embeds``."""
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError('need input_ids or inputs_embeds')
            if pixel_values is not None:
                image_embeds = self.encode_images(pixel_values)
            inputs_embeds = self.merge(input_ids, image_embeds)
        return self.language_model(inputs_embeds, position_ids, attention_mask,
                                   past_key_values, last_logits_only)

    @torch.no_grad()
    def generate_greedy(self, input_ids: torch.Tensor,
                        pixel_values: Optional[torch.Tensor] = None,
                        image_embeds: Optional[torch.Tensor] = None,
                        max_new_tokens: int = 32,
                        eos_token_ids: Optional[Sequence[int]] = None,
                        prefill_chunk: Optional[int] = None,
                        return_logits: bool = False):
        """Greedy decoding for one sequence (``input_ids`` ``[1, T]`` or ``[T]``).

        ``prefill_chunk`` feeds the prompt that many tokens per step (the paper's chunked
        prefill); ``eos_token_ids`` defaults to the config's (pass ``[]`` to never stop).
        Returns the new token ids (and the per-step logits ``[n, V]`` if requested).
        """
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.shape[0] != 1:
            raise ValueError('generate_greedy handles one sequence')
        eos = set(self.config.eos_token_ids if eos_token_ids is None else eos_token_ids)
        if pixel_values is not None:
            image_embeds = self.encode_images(pixel_values)
        embeds = self.merge(input_ids, image_embeds)
        step = prefill_chunk or embeds.shape[1]
        past = None
        for i in range(0, embeds.shape[1], step):
            logits, past = self.language_model(embeds[:, i:i + step], past_key_values=past,
                                               last_logits_only=True)
        tokens, all_logits = [], []
        for _ in range(max_new_tokens):
            last = logits[0, -1]
            all_logits.append(last)
            tok = int(torch.argmax(last))
            tokens.append(tok)
            if tok in eos:
                break
            nxt = self.embed_tokens(torch.tensor([[tok]], device=embeds.device))
            logits, past = self.language_model(nxt, past_key_values=past)
        if return_logits:
            return tokens, torch.stack(all_logits)
        return tokens

    # -- persistence ---------------------------------------------------------------

    def save_pretrained(self, out_dir: str) -> None:
        """Write ``config.json`` + ``model.safetensors``."""
        from safetensors.torch import save_file
        os.makedirs(out_dir, exist_ok=True)
        self.config.to_json(os.path.join(out_dir, CONFIG_FILE))
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, os.path.join(out_dir, WEIGHTS_NAME), metadata={'format': 'pt'})

    @classmethod
    def from_pretrained(cls, model_dir: str, dtype: torch.dtype = torch.float32,
                        device: str = 'cpu') -> 'BlueLMV':
        """Load a directory written by :meth:`save_pretrained` or ``convert.py``."""
        from safetensors.torch import load_file
        config = BlueLMVConfig.from_json(os.path.join(model_dir, CONFIG_FILE))
        path = os.path.join(model_dir, WEIGHTS_NAME)
        if not os.path.exists(path):
            raise FileNotFoundError(f'{path}: weights file not found')
        model = cls(config)
        load_checked(model, load_file(path), path)
        return model.to(device=device, dtype=dtype).eval()


def load_checked(model: nn.Module, state: dict, source: str) -> None:
    """``load_state_dict`` with errors naming the file and the offending key."""
    own = model.state_dict()
    for k in own:
        if k not in state:
            raise KeyError(f'{source}: missing tensor {k!r}')
    for k, v in state.items():
        if k not in own:
            raise KeyError(f'{source}: unexpected tensor {k!r}')
        if tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(f'{source}: {k!r} has shape {tuple(v.shape)}, model expects '
                             f'{tuple(own[k].shape)}')
    model.load_state_dict(state, strict=True)


def describe(model: BlueLMV) -> str:
    """One JSON line of parameter counts per component (for logs)."""
    def n(m):
        return 0 if m is None else sum(p.numel() for p in m.parameters())
    return json.dumps({'vision': n(model.vision_tower), 'downsampler': n(model.downsampler),
                       'projector': n(model.projector), 'llm': n(model.language_model)})
