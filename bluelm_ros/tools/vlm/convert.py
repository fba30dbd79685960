"""Convert local HF ``transformers`` checkpoints into this project's format.

Supported (read from a local directory; nothing is downloaded, ``transformers`` is not
imported):

* ``LlavaForConditionalGeneration`` with a SigLIP vision tower and a Llama text model.
  LLaVA has no token downsampler; its ``multi_modal_projector`` (linear-gelu-linear) maps
  to our ``mlp2`` projector and ``vision_feature_layer`` / ``vision_feature_select_strategy``
  carry over unchanged.
* ``Idefics3ForConditionalGeneration`` / ``SmolVLMForConditionalGeneration`` (SigLIP with
  post-layernorm, pixel-shuffle connector = our ``pixel_shuffle`` downsampler + one linear
  without bias, Llama/SmolLM2 text model).

Output directory: ``config.json`` (our :class:`BlueLMVConfig`), ``model.safetensors`` and
the tokenizer files. Only the model is converted: the HF image processors (LLaVA's
resize/crop, Idefics3's splitting with row/col marker tokens) are not reproduced; our
:mod:`dynamic_resolution` tiler is used instead.

CLI: ``python -m bluelm_ros.tools.vlm.convert {llava,idefics3} HF_DIR OUT_DIR``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import sys

import torch

from bluelm_ros.runtime.vlm.config import (BlueLMVConfig, ConfigError, ImageConfig, PromptConfig,
                                           TextConfig, VisionConfig)
from bluelm_ros.tools.vlm.modeling import CONFIG_NAME, WEIGHTS_NAME, BlueLMV

TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json',
                   'added_tokens.json', 'chat_template.jinja', 'chat_template.json',
                   'generation_config.json', 'preprocessor_config.json')

# Defaults of the HF config classes, for old checkpoints whose config.json omits
# values equal to the class default (transformers 4.x ``to_diff_dict``).
_SIGLIP_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                               num_attention_heads=12, num_channels=3, image_size=224,
                               patch_size=16, hidden_act='gelu_pytorch_tanh',
                               layer_norm_eps=1e-6)
_IDEFICS3_VISION_DEFAULTS = dict(_SIGLIP_VISION_DEFAULTS, hidden_size=1152,
                                 num_attention_heads=16, patch_size=32)
_LLAMA_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=None,
                       head_dim=None, hidden_act='silu', max_position_embeddings=2048,
                       rms_norm_eps=1e-6, attention_bias=False, mlp_bias=False,
                       tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                       pad_token_id=None)
_ACT = {'gelu': 'gelu', 'gelu_pytorch_tanh': 'gelu_tanh', 'gelu_new': 'gelu_tanh',
        'silu': 'silu', 'swish': 'silu', 'relu': 'relu'}


class ConversionError(ValueError):
    """A source checkpoint cannot be converted; the message names the file and key."""


# ---------------------------------------------------------------------------
# reading


def _read_json(path: str) -> dict:
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


def _act(name: str, source: str, key: str) -> str:
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
        weight_map = _read_json(index).get('weight_map')
        if not isinstance(weight_map, dict):
            raise ConversionError(f'{index}: weight_map: missing key')
        files = sorted(set(weight_map.values()))
        for f in files:
            if not os.path.exists(os.path.join(hf_dir, f)):
                raise ConversionError(f'{os.path.join(hf_dir, f)}: shard listed in {index} '
                                      'not found')
        files = [os.path.join(hf_dir, f) for f in files]
    else:
        files = sorted(glob.glob(os.path.join(hf_dir, '*.safetensors')))
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


def _text_config(tc: dict, source: str, defaults: dict, tie: bool) -> TextConfig:
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
    scaling = tc.get('rope_scaling')
    rope_type = rope.get('rope_type', rope.get('type', 'default'))
    if scaling:
        rope_type = scaling.get('rope_type', scaling.get('type', 'default'))
    if rope_type != 'default':
        raise ConversionError(f'{source}: {sec}rope_parameters.rope_type: {rope_type!r} '
                              'unsupported (only default RoPE)')
    theta = rope.get('rope_theta', tc.get('rope_theta', 10000.0))
    if tc.get('pretraining_tp', 1) not in (None, 1):
        raise ConversionError(f'{source}: {sec}pretraining_tp: must be 1')
    return TextConfig(
        vocab_size=g('vocab_size'), hidden_size=hidden,
        intermediate_size=g('intermediate_size'), num_hidden_layers=g('num_hidden_layers'),
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
        max_position_embeddings=g('max_position_embeddings'), rope_theta=float(theta),
        rms_norm_eps=float(g('rms_norm_eps')),
        hidden_act=_act(g('hidden_act'), source, sec + 'hidden_act'),
        attention_bias=bool(g('attention_bias')), mlp_bias=bool(g('mlp_bias')),
        tie_word_embeddings=tie)


def _vision_config(vc: dict, source: str, defaults: dict, model_types: tuple,
                   **extra) -> VisionConfig:
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
        hidden_act=_act(g('hidden_act'), source, sec + 'hidden_act'), **extra)


def _token_ids(tc: dict, top: dict):
    def pick(k):
        # text_config is authoritative (top-level copies may be stale or null)
        for src in (tc, top):
            if src.get(k) is not None:
                return src[k]
        return None if k in tc or k in top else _LLAMA_DEFAULTS.get(k)
    eos = pick('eos_token_id')
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    return pick('bos_token_id'), eos, pick('pad_token_id')


def _image_config(hf_dir: str, tile: int, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                  max_tiles: int = 1) -> ImageConfig:
    pre = os.path.join(hf_dir, 'preprocessor_config.json')
    if os.path.exists(pre):
        p = _read_json(pre)
        mean = p.get('image_mean', mean)
        std = p.get('image_std', std)
    return ImageConfig(tile_size=tile, max_tiles=max_tiles, image_mean=[float(x) for x in mean],
                       image_std=[float(x) for x in std])


def llava_config(hf_dir: str) -> BlueLMVConfig:
    """Translate a LLaVA (SigLIP + Llama) ``config.json`` into a :class:`BlueLMVConfig`."""
    source = os.path.join(hf_dir, 'config.json')
    top = _read_json(source)
    if top.get('model_type') != 'llava':
        raise ConversionError(f'{source}: model_type: {top.get("model_type")!r} is not "llava"')
    for k in ('vision_config', 'text_config'):
        if not isinstance(top.get(k), dict):
            raise ConversionError(f'{source}: {k}: missing key')
    tc = top['text_config']
    tie = bool(top.get('tie_word_embeddings') or tc.get('tie_word_embeddings'))
    fl = top.get('vision_feature_layer', -2)
    strategy = top.get('vision_feature_select_strategy', 'default')
    vision = _vision_config(top['vision_config'], source, _SIGLIP_VISION_DEFAULTS,
                            ('siglip_vision_model',), feature_layer=fl,
                            feature_select_strategy=strategy, post_layernorm=False)
    text = _text_config(tc, source, _LLAMA_DEFAULTS, tie)
    bos, eos, pad = _token_ids(tc, top)
    cfg = BlueLMVConfig(
        name=os.path.basename(os.path.normpath(hf_dir)) or 'llava',
        vision=vision, text=text, image=_image_config(hf_dir, vision.image_size),
        prompt=PromptConfig(template='USER: {image}\n{question} ASSISTANT:',
                            system_template='{system} ', add_bos=bos is not None),
        downsampler='none', downsample_factor=1, downsampler_norm=False, downsampler_dim=0,
        projector='mlp2',
        projector_act=_act(top.get('projector_hidden_act', 'gelu'), source,
                           'projector_hidden_act'),
        projector_bias=bool(top.get('multimodal_projector_bias', True)),
        image_token_id=top.get('image_token_index', top.get('image_token_id', 32000)),
        bos_token_id=bos, eos_token_ids=eos, pad_token_id=pad)
    try:
        cfg.validate(source)
    except ConfigError as e:
        raise ConversionError(str(e)) from None
    return cfg


def idefics3_config(hf_dir: str) -> BlueLMVConfig:
    """Translate an Idefics3 / SmolVLM ``config.json`` into a :class:`BlueLMVConfig`."""
    source = os.path.join(hf_dir, 'config.json')
    top = _read_json(source)
    mt = top.get('model_type')
    if mt not in ('idefics3', 'smolvlm'):
        raise ConversionError(f'{source}: model_type: {mt!r} is not "idefics3"/"smolvlm"')
    for k in ('vision_config', 'text_config'):
        if not isinstance(top.get(k), dict):
            raise ConversionError(f'{source}: {k}: missing key')
    tc = top['text_config']
    tie = bool(top.get('tie_word_embeddings') or tc.get('tie_word_embeddings'))
    vision = _vision_config(top['vision_config'], source, _IDEFICS3_VISION_DEFAULTS,
                            ('idefics3_vision', 'smolvlm_vision'), feature_layer=-1,
                            feature_select_strategy='full', post_layernorm=True)
    text = _text_config(tc, source, dict(_LLAMA_DEFAULTS, rms_norm_eps=1e-5), tie)
    bos, eos, pad = _token_ids(tc, top)
    scale = int(top.get('scale_factor', 2))
    cfg = BlueLMVConfig(
        name=os.path.basename(os.path.normpath(hf_dir)) or mt,
        vision=vision, text=text, image=_image_config(hf_dir, vision.image_size),
        prompt=PromptConfig(template='User:{image}{question}<end_of_utterance>\nAssistant:',
                            system_template='System: {system}<end_of_utterance>\n',
                            add_bos=bos is not None),
        downsampler='pixel_shuffle', downsample_factor=scale, downsampler_norm=False,
        downsampler_dim=0, projector='linear', projector_act='gelu', projector_bias=False,
        image_token_id=top.get('image_token_id', 128257),
        bos_token_id=bos, eos_token_ids=eos, pad_token_id=pad)
    try:
        cfg.validate(source)
    except ConfigError as e:
        raise ConversionError(str(e)) from None
    return cfg


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
    return ''


def _map_text(rest: str):
    if rest in ('embed_tokens.weight', 'norm.weight') or _TEXT_LAYER.match(rest):
        return 'language_model.' + rest
    return ''


def _rename(tensors: dict, origin: dict, cfg: BlueLMVConfig, layout: dict) -> dict:
    out = {}
    for key, t in tensors.items():
        new = ''
        if key in layout['lm_head']:
            new = None if cfg.text.tie_word_embeddings else 'language_model.lm_head.weight'
        elif (rest := _strip(key, layout['vision'])) is not None:
            new = _map_vision(rest, cfg)
        elif (rest := _strip(key, layout['projector'])) is not None:
            new = layout['projector_map'].get(rest, '')
        elif (rest := _strip(key, layout['text'])) is not None:
            new = _map_text(rest)
        if new == '':
            raise ConversionError(f'{origin[key]}: {key}: unexpected tensor (no mapping)')
        if new is not None:
            if new in out:
                raise ConversionError(f'{origin[key]}: {key}: maps to {new!r} twice')
            out[new] = (key, t)
    return out


_LLAVA_LAYOUT = {
    'lm_head': ('lm_head.weight', 'language_model.lm_head.weight'),
    # transformers 4.x nests SiglipVisionTransformer under ``vision_model``; 5.x saves
    # without it; ``model.`` prefixes appear in 4.52+ in-memory names
    'vision': ('model.vision_tower.vision_model.', 'vision_tower.vision_model.',
               'model.vision_tower.', 'vision_tower.'),
    'projector': ('model.multi_modal_projector.', 'multi_modal_projector.'),
    'projector_map': {'linear_1.weight': 'projector.linear_1.weight',
                      'linear_1.bias': 'projector.linear_1.bias',
                      'linear_2.weight': 'projector.linear_2.weight',
                      'linear_2.bias': 'projector.linear_2.bias'},
    'text': ('model.language_model.model.', 'language_model.model.', 'model.language_model.',
             'language_model.'),
}
_IDEFICS3_LAYOUT = {
    'lm_head': ('lm_head.weight',),
    'vision': ('model.vision_model.',),
    'projector': ('model.connector.',),
    'projector_map': {'modality_projection.proj.weight': 'projector.linear_1.weight'},
    'text': ('model.text_model.',),
}


def _convert(hf_dir, out_dir, cfg, layout, dtype, require_tokenizer, notes):
    if require_tokenizer and not os.path.exists(os.path.join(hf_dir, 'tokenizer.json')):
        raise ConversionError(f'{os.path.join(hf_dir, "tokenizer.json")}: tokenizer file not '
                              'found (require_tokenizer=False / --no-tokenizer: weights only)')
    tensors, origin = load_safetensors_dir(hf_dir)
    mapped = _rename(tensors, origin, cfg, layout)
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
    cfg.to_json(os.path.join(out_dir, CONFIG_NAME), notes=notes)
    for name in TOKENIZER_FILES:
        src = os.path.join(hf_dir, name)
        if os.path.exists(src):
            shutil.copyfile(src, os.path.join(out_dir, name))
    return cfg


def convert_llava(hf_dir: str, out_dir: str, dtype: torch.dtype | None = None,
                  require_tokenizer: bool = True) -> BlueLMVConfig:
    """Convert a local ``LlavaForConditionalGeneration`` (SigLIP + Llama) directory."""
    cfg = llava_config(hf_dir)
    notes = f'Converted from LlavaForConditionalGeneration at {os.path.abspath(hf_dir)}.'
    return _convert(hf_dir, out_dir, cfg, _LLAVA_LAYOUT, dtype, require_tokenizer, notes)


def convert_idefics3(hf_dir: str, out_dir: str, dtype: torch.dtype | None = None,
                     require_tokenizer: bool = True) -> BlueLMVConfig:
    """Convert a local Idefics3 / SmolVLM directory (model only, not its processor)."""
    cfg = idefics3_config(hf_dir)
    notes = f'Converted from Idefics3/SmolVLM at {os.path.abspath(hf_dir)}.'
    return _convert(hf_dir, out_dir, cfg, _IDEFICS3_LAYOUT, dtype, require_tokenizer, notes)


def main(argv=None) -> int:
    """Command line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('family', choices=('llava', 'idefics3'))
    ap.add_argument('hf_dir')
    ap.add_argument('out_dir')
    ap.add_argument('--dtype', choices=('float32', 'float16', 'bfloat16'), default=None)
    ap.add_argument('--no-tokenizer', action='store_true',
                    help='do not require tokenizer.json')
    a = ap.parse_args(argv)
    fn = convert_llava if a.family == 'llava' else convert_idefics3
    dtype = getattr(torch, a.dtype) if a.dtype else None
    try:
        cfg = fn(a.hf_dir, a.out_dir, dtype, not a.no_tokenizer)
    except (ConversionError, ConfigError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    print(f'wrote {a.out_dir} ({cfg.name}, {cfg.tokens_per_tile} tokens/tile)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
