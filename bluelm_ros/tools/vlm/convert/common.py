"""What every checkpoint family shares: reading HF files, config and weight translation.

A family module (``llava.py``, ``idefics3.py``) describes only what is its own: how its
``config.json`` becomes a :class:`BlueLMVConfig` and where its tensors live
(:class:`WeightLayout`), as one :class:`Family`. :func:`convert` does the rest: read the
safetensors, decide the ``lm_head`` tie from them, map every tensor (an unexpected or
missing one is an error naming it), check the shapes against the config, write
``config.json``, ``model.safetensors`` and the tokenizer files.

What the checkpoint says about its inputs goes into the config too
(:func:`attach_checkpoint_assets`): its image processor (``image.processor``, reproduced
by :mod:`bluelm_ros.runtime.vlm.processors`), its chat template (``prompt.chat_template``)
and the stop tokens of its ``generation_config.json``; ``tokenizer.json`` is the tokenizer
transformers actually runs (:mod:`~bluelm_ros.tools.vlm.convert.hf_checkpoint`). So the
runtime feeds the model what transformers would.
"""

from __future__ import annotations

from dataclasses import dataclass
import glob
import json
import logging
import os
import re
import shutil
from typing import Callable

import torch

from bluelm_ros.runtime.vlm.config import (BlueLMVConfig, CONFIG_FILE, ConfigError, ImageConfig,
                                           TextConfig, VisionConfig)
from bluelm_ros.runtime.vlm.processors import ProcessorConfigError, from_hf_preprocessor
from bluelm_ros.runtime.vlm.tokenizer import TOKENIZER_FILE, TOKENIZER_FILES
from bluelm_ros.tools.vlm.convert import hf_checkpoint
from bluelm_ros.tools.vlm.modeling import BlueLMV, WEIGHTS_NAME

log = logging.getLogger(__name__)

# Copied next to the converted model: the tokenizer and the HF processor settings.
COPIED_FILES = TOKENIZER_FILES + ('preprocessor_config.json', 'processor_config.json')

# Defaults of the HF config classes, for old checkpoints whose config.json omits
# values equal to the class default (transformers 4.x ``to_diff_dict``).
SIGLIP_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                              num_attention_heads=12, num_channels=3, image_size=224,
                              patch_size=16, hidden_act='gelu_pytorch_tanh',
                              layer_norm_eps=1e-6)
CLIP_VISION_DEFAULTS = dict(SIGLIP_VISION_DEFAULTS, patch_size=32, hidden_act='quick_gelu',
                            layer_norm_eps=1e-5)
LLAMA_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=None,
                      head_dim=None, hidden_act='silu', max_position_embeddings=2048,
                      rms_norm_eps=1e-6, attention_bias=False, mlp_bias=False,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                      pad_token_id=None)
_ACT = {'gelu': 'gelu', 'gelu_pytorch_tanh': 'gelu_tanh', 'gelu_new': 'gelu_tanh',
        'silu': 'silu', 'swish': 'silu', 'relu': 'relu', 'quick_gelu': 'quick_gelu'}
_LLAMA3_ROPE_KEYS = ('factor', 'low_freq_factor', 'high_freq_factor',
                     'original_max_position_embeddings')


class ConversionError(ValueError):
    """A source checkpoint cannot be converted; the message names the file and key."""


@dataclass(frozen=True)
class WeightLayout:
    """Where a family keeps its tensors: key prefixes per part, and the projector's keys."""

    lm_head: tuple       # full keys of the output head (dropped when embeddings are tied)
    vision: tuple        # prefixes of the SigLIP tower (``embeddings.``, ``encoder.layers.``)
    projector: tuple     # prefixes of the projector / connector
    projector_map: dict  # key after the projector prefix -> our key
    text: tuple          # prefixes of the Llama model (``embed_tokens``, ``layers.``, ``norm``)


@dataclass(frozen=True)
class Family:
    """A checkpoint family: its CLI name, what it is, its config translation and layout."""

    name: str
    description: str
    config: Callable  # hf_dir -> BlueLMVConfig (raises ConversionError)
    layout: WeightLayout


# ---------------------------------------------------------------------------
# reading


def read_json(path: str) -> dict:
    """Read a JSON file; ConversionError names it when missing or invalid."""
    if not os.path.exists(path):
        raise ConversionError(f'{path}: file not found')
    try:
        with open(path, encoding='utf-8') as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConversionError(f'{path}: invalid JSON: {e}') from None


def _get(cfg: dict, key: str, defaults: dict, source: str, section: str):
    if key in cfg and cfg[key] is not None:
        return cfg[key]
    if key in defaults:
        return defaults[key]
    raise ConversionError(f'{source}: {section}{key}: missing key')


def act(name: str, source: str, key: str) -> str:
    """Our name for an HF activation (``gelu_pytorch_tanh`` -> ``gelu_tanh``)."""
    if name not in _ACT:
        raise ConversionError(f'{source}: {key}: unsupported activation {name!r}')
    return _ACT[name]


def _single_int(v, source, key):
    if isinstance(v, (list, tuple)):
        if len(set(v)) != 1:
            raise ConversionError(f'{source}: {key}: non-square {v!r} unsupported')
        v = v[0]
    return int(v)


def load_safetensors_dir(hf_dir: str) -> tuple:
    """Read every tensor of a (possibly sharded) safetensors checkpoint.

    Returns ``(tensors, key -> file)``. With ``model.safetensors.index.json`` the listed
    shards must all exist.
    """
    from safetensors import safe_open
    index = os.path.join(hf_dir, 'model.safetensors.index.json')
    if os.path.exists(index):
        weight_map = read_json(index).get('weight_map')
        if not isinstance(weight_map, dict):
            raise ConversionError(f'{index}: weight_map: missing key')
        files = sorted(set(weight_map.values()))
        for f in files:
            if not os.path.exists(os.path.join(hf_dir, f)):
                raise ConversionError(f'{os.path.join(hf_dir, f)}: shard listed in {index} '
                                      'not found')
        files = [os.path.join(hf_dir, f) for f in files]
    else:
        # escaped: a folder named e.g. "model[v2]" is not a glob pattern
        files = sorted(glob.glob(os.path.join(glob.escape(hf_dir), '*.safetensors')))
    if not files:
        raise ConversionError(f'{hf_dir}: no *.safetensors weights found')
    tensors, origin = {}, {}
    for path in files:
        with safe_open(path, framework='pt') as f:
            for k in f.keys():
                if k in tensors:
                    raise ConversionError(f'{path}: tensor {k!r} also in {origin[k]}')
                tensors[k] = f.get_tensor(k)
                origin[k] = path
    return tensors, origin


# ---------------------------------------------------------------------------
# config translation


def read_hf_config(hf_dir: str, model_types: tuple) -> tuple:
    """Read ``HF_DIR/config.json`` of one of ``model_types``; return ``(path, dict)``."""
    source = os.path.join(hf_dir, 'config.json')
    top = read_json(source)
    if top.get('model_type') not in model_types:
        wanted = '/'.join(f'"{t}"' for t in model_types)
        raise ConversionError(f'{source}: model_type: {top.get("model_type")!r} is not '
                              f'{wanted}')
    for k in ('vision_config', 'text_config'):
        if not isinstance(top.get(k), dict):
            raise ConversionError(f'{source}: {k}: missing key')
    return source, top


def validated(cfg: BlueLMVConfig, source: str) -> BlueLMVConfig:
    """Return cfg after BlueLMVConfig.validate, its errors as ConversionError."""
    try:
        cfg.validate(source)
    except ConfigError as e:
        raise ConversionError(str(e)) from None
    return cfg


def text_config(tc: dict, source: str, defaults: dict, tie: bool) -> TextConfig:
    """Translate a Llama ``text_config`` (HF class defaults for omitted keys)."""
    sec = 'text_config.'
    mt = tc.get('model_type', 'llama')
    if mt != 'llama':
        raise ConversionError(f'{source}: {sec}model_type: {mt!r} unsupported (need "llama")')

    def g(k):
        return _get(tc, k, defaults, source, sec)
    heads = g('num_attention_heads')
    kv = tc.get('num_key_value_heads') or heads
    hidden = g('hidden_size')
    head_dim = tc.get('head_dim') or hidden // heads
    rope = tc.get('rope_parameters') or {}
    params = tc.get('rope_scaling') or rope  # 4.x: rope_scaling; 5.x: rope_parameters
    rope_type = params.get('rope_type', params.get('type', 'default'))
    rope_scaling = None
    if rope_type == 'llama3':
        missing = [k for k in _LLAMA3_ROPE_KEYS[:3] if params.get(k) is None]
        if missing:
            raise ConversionError(f'{source}: {sec}rope_parameters.{missing[0]}: missing key '
                                  '(needed by rope_type "llama3")')
        rope_scaling = {'rope_type': 'llama3', **{k: params.get(k) for k in _LLAMA3_ROPE_KEYS}}
        if rope_scaling['original_max_position_embeddings'] is None:
            # transformers falls back to max_position_embeddings
            rope_scaling['original_max_position_embeddings'] = g('max_position_embeddings')
    elif rope_type != 'default':
        raise ConversionError(f'{source}: {sec}rope_parameters.rope_type: {rope_type!r} '
                              'unsupported (default or llama3 RoPE)')
    theta = rope.get('rope_theta', tc.get('rope_theta', 10000.0))
    if tc.get('pretraining_tp', 1) not in (None, 1):
        raise ConversionError(f'{source}: {sec}pretraining_tp: must be 1')
    return TextConfig(
        vocab_size=g('vocab_size'), hidden_size=hidden,
        intermediate_size=g('intermediate_size'), num_hidden_layers=g('num_hidden_layers'),
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
        max_position_embeddings=g('max_position_embeddings'), rope_theta=float(theta),
        rms_norm_eps=float(g('rms_norm_eps')),
        hidden_act=act(g('hidden_act'), source, sec + 'hidden_act'),
        attention_bias=bool(g('attention_bias')), mlp_bias=bool(g('mlp_bias')),
        tie_word_embeddings=tie, rope_scaling=rope_scaling)


def vision_config(vc: dict, source: str, defaults: dict, model_types: tuple,
                  **extra) -> VisionConfig:
    """Translate a SigLIP/CLIP ``vision_config``; ``extra`` sets the family's choices."""
    sec = 'vision_config.'
    mt = vc.get('model_type')
    if mt not in model_types:
        raise ConversionError(f'{source}: {sec}model_type: {mt!r} unsupported '
                              f'(need one of {model_types})')

    def g(k):
        return _get(vc, k, defaults, source, sec)
    return VisionConfig(
        hidden_size=g('hidden_size'), intermediate_size=g('intermediate_size'),
        num_hidden_layers=g('num_hidden_layers'), num_attention_heads=g('num_attention_heads'),
        image_size=_single_int(g('image_size'), source, sec + 'image_size'),
        patch_size=_single_int(g('patch_size'), source, sec + 'patch_size'),
        num_channels=g('num_channels'), layer_norm_eps=float(g('layer_norm_eps')),
        hidden_act=act(g('hidden_act'), source, sec + 'hidden_act'), **extra)


def token_ids(tc: dict, top: dict):
    """Return ``(bos, [eos, ...], pad)`` ids, text_config first."""
    def pick(k):
        # text_config is authoritative (top-level copies may be stale or null)
        for src in (tc, top):
            if src.get(k) is not None:
                return src[k]
        return None if k in tc or k in top else LLAMA_DEFAULTS.get(k)
    eos = pick('eos_token_id')
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    return pick('bos_token_id'), eos, pick('pad_token_id')


def image_config(hf_dir: str, tile: int, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                 max_tiles: int = 1) -> ImageConfig:
    """Fallback tiling (no processor, or ``image.processor`` set to null); mean/std from HF."""
    pre, _ = hf_checkpoint.image_processor_dict(hf_dir)
    if pre is not None:
        mean = pre.get('image_mean') or mean
        std = pre.get('image_std') or std
    return ImageConfig(tile_size=tile, max_tiles=max_tiles, image_mean=[float(x) for x in mean],
                       image_std=[float(x) for x in std])


def _llava_tokens_per_image(settings: dict, processor: dict, strategy: str):
    """Image tokens LlavaProcessor puts in the prompt (None when it cannot be told)."""
    patch = settings.get('patch_size')
    if not patch or processor['type'] != 'single':
        return None
    if processor['crop']:
        h, w = processor['crop']
    elif processor['resize'] and 'height' in processor['resize']:
        h, w = processor['resize']['height'], processor['resize']['width']
    else:
        return None
    n = (h // patch) * (w // patch) + int(settings.get('num_additional_image_tokens') or 0)
    return n - 1 if strategy == 'default' else n


def attach_checkpoint_assets(cfg: BlueLMVConfig, hf_dir: str, strategy: str = 'full') -> None:
    """Record the checkpoint's image processor, chat template and stop tokens in ``cfg``.

    ``strategy``: LLaVA's ``vision_feature_select_strategy``, to check that the processor
    puts as many image tokens in the prompt as the vision tower emits.
    """
    settings = hf_checkpoint.processor_settings(hf_dir)
    cfg.prompt.image_token = settings.get('image_token') or cfg.prompt.image_token
    pre, pre_source = hf_checkpoint.image_processor_dict(hf_dir)
    if pre is None:
        log.warning('%s: no preprocessor_config.json: images go through the BlueLM-V tiler '
                    '(one %d px tile), not the checkpoint\'s processor', hf_dir,
                    cfg.vision.image_size)
    else:
        try:
            cfg.image.processor = from_hf_preprocessor(
                pre, pre_source, tile_size=cfg.vision.image_size,
                tokens_per_tile=cfg.tokens_per_tile, image_seq_len=settings.get('image_seq_len'),
                image_token=cfg.prompt.image_token)
        except ProcessorConfigError as e:
            raise ConversionError(str(e)) from None
        expected = _llava_tokens_per_image(settings, cfg.image.processor, strategy)
        if expected is not None and expected != cfg.tokens_per_tile:
            raise ConversionError(
                f'{hf_dir}: processor_config.json puts {expected} image tokens in the prompt but '
                f'the vision tower emits {cfg.tokens_per_tile} per image')
    template, _ = hf_checkpoint.chat_template(hf_dir)
    if template is None:
        log.warning('%s: no chat template: using the built-in prompt %r', hf_dir,
                    cfg.prompt.template)
    cfg.prompt.chat_template = template
    eos = hf_checkpoint.generation_eos(hf_dir)
    if eos is not None:  # what transformers' generate stops on
        cfg.eos_token_ids = eos


# ---------------------------------------------------------------------------
# weight renaming


def _strip(key: str, prefixes) -> str | None:
    for p in prefixes:
        if key.startswith(p):
            return key[len(p):]
    return None


_VISION_LAYER = re.compile(r'^encoder\.layers\.(\d+)\.(.+)$')
_TEXT_LAYER = re.compile(r'^layers\.(\d+)\.(.+)$')


def _map_vision(rest: str, cfg: BlueLMVConfig):
    """Our key for a vision-tower key (after the prefix), or None to drop it."""
    if rest == 'embeddings.position_ids':
        return None  # a buffer older CLIP checkpoints saved
    if rest.startswith('embeddings.'):
        return 'vision_tower.' + rest
    m = _VISION_LAYER.match(rest)
    if m:
        i = int(m.group(1))
        # layers after the deepest selected feature layer never influence the output
        if i >= cfg.vision.num_layers_used():
            return None
        return f'vision_tower.layers.{i}.{m.group(2)}'
    if rest.startswith('post_layernorm.'):
        return 'vision_tower.' + rest if cfg.vision.post_layernorm else None
    if rest.startswith('head.'):
        return None  # SigLIP's attention-pooling head: unused by VLMs
    if rest.startswith('pre_layrnorm.'):  # sic: CLIP's name in transformers
        return 'vision_tower.pre_layernorm.' + rest[len('pre_layrnorm.'):]
    return ''


def _map_text(rest: str):
    if rest in ('embed_tokens.weight', 'norm.weight') or _TEXT_LAYER.match(rest):
        return 'language_model.' + rest
    return ''


def _rename(tensors: dict, origin: dict, cfg: BlueLMVConfig, layout: WeightLayout) -> dict:
    out = {}
    for key, t in tensors.items():
        new = ''
        if key in layout.lm_head:
            new = None if cfg.text.tie_word_embeddings else 'language_model.lm_head.weight'
        elif (rest := _strip(key, layout.vision)) is not None:
            new = _map_vision(rest, cfg)
        elif (rest := _strip(key, layout.projector)) is not None:
            new = layout.projector_map.get(rest, '')
        elif (rest := _strip(key, layout.text)) is not None:
            new = _map_text(rest)
        if new == '':
            raise ConversionError(f'{origin[key]}: {key}: unexpected tensor (no mapping)')
        if new is not None:
            if new in out:
                raise ConversionError(f'{origin[key]}: {key}: maps to {new!r} twice')
            out[new] = (key, t)
    return out


def decide_tie(cfg: BlueLMVConfig, tensors: dict, layout: WeightLayout, hf_dir: str) -> str:
    """Set ``cfg.text.tie_word_embeddings`` from the weights; return a note saying why.

    transformers 5 keeps a checkpoint's own ``lm_head.weight`` when it differs from the
    embeddings whatever the tie flags say (Idefics3/SmolVLM set one only in text_config),
    and ties when the file has no head. Identical tensors are tied (same logits, one copy).
    """
    heads = [k for k in layout.lm_head if k in tensors]
    embeds = [k for k in tensors if _strip(k, layout.text) == 'embed_tokens.weight']
    if not heads:
        if not cfg.text.tie_word_embeddings:
            raise ConversionError(f'{hf_dir}: no lm_head.weight in the safetensors files and '
                                  'config.json does not tie it to the embeddings')
        return 'lm_head tied to embed_tokens (no lm_head.weight in the file)'
    head = tensors[heads[0]]
    same = bool(embeds) and head.shape == tensors[embeds[0]].shape and torch.equal(
        head, tensors[embeds[0]])
    cfg.text.tie_word_embeddings = same
    return ('lm_head tied to embed_tokens (identical in the file)' if same else
            'own lm_head.weight kept (differs from embed_tokens)')


def _write_tokenizer(hf_dir: str, out_dir: str, cfg: BlueLMVConfig) -> str:
    """Write the effective tokenizer; set the template variables; check the image token."""
    from tokenizers import Tokenizer
    path = os.path.join(out_dir, TOKENIZER_FILE)
    export = hf_checkpoint.write_tokenizer(hf_dir, path)
    if cfg.prompt.chat_template is not None:
        cfg.prompt.template_vars = export.template_vars
        image_id = Tokenizer.from_file(path).token_to_id(cfg.prompt.image_token)
        if image_id != cfg.image_token_id:
            raise ConversionError(f'{path}: {cfg.prompt.image_token!r} has id {image_id} but '
                                  f'config.json says image token {cfg.image_token_id}')
    return export.source


def convert(family: Family, hf_dir: str, out_dir: str, dtype: torch.dtype | None = None,
            require_tokenizer: bool = True) -> BlueLMVConfig:
    """Convert a local checkpoint directory of ``family``; return the config written."""
    cfg = family.config(hf_dir)
    notes = f'Converted from {family.description} at {os.path.abspath(hf_dir)}.'
    has_tokenizer = os.path.exists(os.path.join(hf_dir, TOKENIZER_FILE))
    if require_tokenizer and not has_tokenizer:
        raise ConversionError(f'{os.path.join(hf_dir, TOKENIZER_FILE)}: tokenizer file not '
                              'found (require_tokenizer=False / --no-tokenizer: weights only)')
    tensors, origin = load_safetensors_dir(hf_dir)
    notes += ' ' + decide_tie(cfg, tensors, family.layout, hf_dir) + '.'
    mapped = _rename(tensors, origin, cfg, family.layout)
    model = BlueLMV(cfg)
    own = model.state_dict()
    for k, ref in own.items():
        if k not in mapped:
            raise ConversionError(f'{hf_dir}: missing tensor for {k!r} (shape '
                                  f'{tuple(ref.shape)}) in the safetensors files')
        src_key, t = mapped[k]
        if tuple(t.shape) != tuple(ref.shape):
            raise ConversionError(f'{origin[src_key]}: {src_key}: shape {tuple(t.shape)} '
                                  f'does not match {tuple(ref.shape)} expected from config')
    state = {k: mapped[k][1] for k in own}
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    os.makedirs(out_dir, exist_ok=True)
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in state.items()},
              os.path.join(out_dir, WEIGHTS_NAME), metadata={'format': 'pt'})
    for name in COPIED_FILES:
        src = os.path.join(hf_dir, name)
        if os.path.exists(src):
            shutil.copyfile(src, os.path.join(out_dir, name))
    if has_tokenizer:
        notes += f' tokenizer.json: {_write_tokenizer(hf_dir, out_dir, cfg)}.'
    elif cfg.prompt.chat_template is not None:
        cfg.prompt.template_vars = hf_checkpoint.special_tokens_from_files(hf_dir)
    cfg.to_json(os.path.join(out_dir, CONFIG_FILE), notes=notes)
    return cfg
