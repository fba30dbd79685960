"""Configuration of BlueLM-V style VLMs as plain dataclasses (no torch).

A config is data: a bundle's ``config.json`` (and the model definitions in
``tools/vlm/configs/*.json``) are read with :meth:`BlueLMVConfig.from_json`.
Every field must be present in a file and unknown fields are rejected, so a typo
never silently falls back to a default; keys starting with ``_`` (e.g. ``_notes``)
are comments and ignored. The exception is :data:`OPTIONAL_FIELDS`, added for open
checkpoints after the first bundles shipped: older files omit them and get the
BlueLM-V behaviour.

Layout (LLaVA style): tiles -> ViT -> token downsampler -> projector -> LLaMA decoder.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
import json
import math
from typing import Any

CONFIG_FILE = 'config.json'  # in a bundle and in a model folder (save_pretrained, convert)
DOWNSAMPLERS = ('vila2x2', 'pixel_shuffle', 'none')
PROJECTORS = ('mlp2', 'linear')
ACTIVATIONS = ('gelu', 'gelu_tanh', 'silu', 'relu', 'quick_gelu')
ROPE_TYPES = ('default', 'llama3')
SELECT_STRATEGIES = ('full', 'default')
RULES = ('relaxed', 'llava_next', 'internvl')


class ConfigError(ValueError):
    """A config is malformed; the message names the file (or source) and the key."""


# ---------------------------------------------------------------------------
# dataclasses


@dataclass
class VisionConfig:
    """SigLIP-style ViT encoder.

    ``feature_layer`` indexes HF's ``hidden_states`` tuple (index 0 = patch embeddings,
    index i = output of block i, -1 = last block *before* the post-layernorm), which is
    what LLaVA's ``vision_feature_layer`` means; a list concatenates several layers on
    the channel axis. ``feature_select_strategy`` "default" drops the first token (the
    CLS token of CLIP; SigLIP has none, but HF drops a patch anyway, so we do the same to
    stay exact), "full" keeps all tokens. ``post_layernorm`` applies the final LayerNorm
    to the selected features (Idefics3/SmolVLM do; LLaVA does not).

    CLIP towers (LLaVA-1.5) set ``class_token`` (a learned token before the patches, with
    its own position), ``pre_layernorm`` (LayerNorm on the embeddings before the blocks)
    and ``patch_bias`` False (the patch conv has no bias).
    """

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    image_size: int = 384
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    hidden_act: str = 'gelu_tanh'
    feature_layer: Any = -1
    feature_select_strategy: str = 'full'
    post_layernorm: bool = False
    class_token: bool = False
    pre_layernorm: bool = False
    patch_bias: bool = True

    @property
    def grid(self) -> int:
        """Patches per side of one tile (27 for 384 / 14)."""
        return self.image_size // self.patch_size

    @property
    def feature_layers(self) -> list:
        """Selected hidden-state indices as a list."""
        fl = self.feature_layer
        return list(fl) if isinstance(fl, (list, tuple)) else [fl]

    def num_layers_used(self) -> int:
        """Return how many encoder blocks must run to produce the selected features."""
        n = self.num_hidden_layers
        return max(i if i >= 0 else n + 1 + i for i in self.feature_layers)


@dataclass
class TextConfig:
    """LLaMA-style decoder (RMSNorm, RoPE, SwiGLU, GQA).

    ``rope_scaling``: null (plain RoPE) or Llama 3's frequency scaling,
    ``{"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    "original_max_position_embeddings"}``.
    """

    vocab_size: int = 100096
    hidden_size: int = 2560
    intermediate_size: int = 6912
    num_hidden_layers: int = 28
    num_attention_heads: int = 20
    num_key_value_heads: int = 20
    head_dim: int = 128
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    hidden_act: str = 'silu'
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    rope_scaling: Any = None


@dataclass
class ImageConfig:
    """Dynamic-resolution tiling (see ``dynamic_resolution.py``).

    Candidate grids are ``grids`` if given (list of ``[m, n]``: m tile columns, n tile
    rows, i.e. a 384m wide x 384n high canvas), else every m x n with m*n <= max_tiles.

    ``processor``: null (this tiler, BlueLM-V's default) or a converted checkpoint's own
    image processor (see :mod:`bluelm_ros.vlm.processors`); then ``rule`` .. ``thumbnail``
    and the mean/std above are unused.
    """

    tile_size: int = 384
    rule: str = 'relaxed'
    alpha: float = 0.1
    max_tiles: int = 8
    grids: Any = None
    thumbnail: bool = True
    tile_batch_size: int = 4
    image_mean: list = field(default_factory=lambda: [0.5, 0.5, 0.5])
    image_std: list = field(default_factory=lambda: [0.5, 0.5, 0.5])
    processor: Any = None


@dataclass
class PromptConfig:
    """Chat template: ``template`` holds ``{image}`` and ``{question}``.

    ``{image}`` becomes the image token id repeated once per image token (the ids are
    inserted directly, never produced by tokenizing ``image_token``). ``system_template``
    (with ``{system}``) is prepended when a system prompt is given.

    ``chat_template`` (a converted checkpoint's Jinja template; see
    :mod:`bluelm_ros.vlm.chat_template`) replaces ``template``/``system_template``/
    ``add_bos``: the prompt is rendered as transformers' ``apply_chat_template`` renders
    it, with ``template_vars`` (the tokenizer's special tokens map) as variables, and
    tokenized in one piece.
    """

    template: str = '[|Human|]:{image}\n{question}[|AI|]:'
    system_template: str = '{system}\n'
    default_system: Any = None
    add_bos: bool = True
    image_token: str = '<image>'
    chat_template: Any = None
    template_vars: Any = None


@dataclass
class BlueLMVConfig:
    """Whole model: vision tower, downsampler, projector, LLM, tiling, prompt."""

    name: str = 'bluelm-v'
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    # Token downsampler: "vila2x2" (zero-pad the patch grid to even, merge 2x2),
    # "pixel_shuffle" (merge factor x factor, grid must divide), "none".
    downsampler: str = 'vila2x2'
    downsample_factor: int = 2
    downsampler_norm: bool = True
    downsampler_dim: int = 1152
    projector: str = 'mlp2'
    projector_act: str = 'gelu'
    projector_bias: bool = True
    image_token_id: int = 100095
    bos_token_id: Any = 1
    eos_token_ids: list = field(default_factory=lambda: [2])
    pad_token_id: Any = 0

    # -- derived sizes -------------------------------------------------------

    @property
    def merge_factor(self) -> int:
        """Side of the square of patch tokens merged into one LLM token."""
        return 1 if self.downsampler == 'none' else self.downsample_factor

    @property
    def tokens_per_tile(self) -> int:
        """LLM image tokens produced by one tile (196 for SigLIP-384 + vila2x2)."""
        g = self.vision.grid
        if self.downsampler == 'none':
            return (g * g + int(self.vision.class_token)
                    - (1 if self.vision.feature_select_strategy == 'default' else 0))
        s = self.downsample_factor
        side = math.ceil(g / s)
        return side * side

    @property
    def vision_feature_dim(self) -> int:
        """Channels of the selected vision features (layers concatenated)."""
        return self.vision.hidden_size * len(self.vision.feature_layers)

    @property
    def projector_in_dim(self) -> int:
        """Input width of the projector."""
        merged = self.vision_feature_dim * self.merge_factor ** 2
        if self.downsampler != 'none' and self.downsampler_dim > 0:
            return self.downsampler_dim
        return merged

    # -- (de)serialisation -----------------------------------------------------

    def to_dict(self) -> dict:
        """Return a JSON-serialisable dict with every field."""
        return dataclasses.asdict(self)

    def to_json(self, path: str, notes: str | None = None) -> None:
        """Write the config as JSON (with an optional ``_notes`` comment)."""
        data = self.to_dict()
        if notes:
            data = {'_notes': notes, **data}
        with open(path, 'w', encoding='utf-8') as f:
            json.dump(data, f, indent=2)
            f.write('\n')

    @classmethod
    def from_dict(cls, data: dict, source: str = '<dict>') -> 'BlueLMVConfig':
        """Build and validate a config; every field required, unknown keys rejected."""
        cfg = _build(cls, data, source, '')
        cfg.validate(source)
        return cfg

    @classmethod
    def from_json(cls, path: str) -> 'BlueLMVConfig':
        """Read a config JSON file."""
        try:
            with open(path, encoding='utf-8') as f:
                data = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f'{path}: config file not found') from None
        except json.JSONDecodeError as e:
            raise ConfigError(f'{path}: invalid JSON: {e}') from None
        return cls.from_dict(data, source=path)

    # -- validation ------------------------------------------------------------

    def validate(self, source: str = '<config>') -> None:
        """Check value ranges and cross-field consistency; raise ConfigError."""
        def fail(key, msg):
            raise ConfigError(f'{source}: {key}: {msg}')

        v, t, im = self.vision, self.text, self.image
        for sect, obj in (('vision', v), ('text', t)):
            for k in ('hidden_size', 'intermediate_size', 'num_hidden_layers',
                      'num_attention_heads'):
                if getattr(obj, k) < 1:
                    fail(f'{sect}.{k}', 'must be >= 1')
        if v.hidden_size % v.num_attention_heads:
            fail('vision.num_attention_heads', 'must divide vision.hidden_size')
        if v.patch_size > v.image_size:
            # 384 / 14 does not divide: the conv drops the last 6 pixels, as in SigLIP
            fail('vision.patch_size', 'must be <= vision.image_size')
        if v.hidden_act not in ACTIVATIONS:
            fail('vision.hidden_act', f'{v.hidden_act!r} not in {ACTIVATIONS}')
        if v.feature_select_strategy not in SELECT_STRATEGIES:
            fail('vision.feature_select_strategy', f'not in {SELECT_STRATEGIES}')
        for i in v.feature_layers:
            if not -(v.num_hidden_layers + 1) <= i <= v.num_hidden_layers:
                fail('vision.feature_layer', f'{i} out of range for '
                     f'{v.num_hidden_layers} layers')
        if v.post_layernorm and any(i not in (-1, v.num_hidden_layers)
                                    for i in v.feature_layers):
            fail('vision.post_layernorm', 'only applies to the last layer (feature_layer -1)')
        if t.num_key_value_heads < 1 or t.num_attention_heads % t.num_key_value_heads:
            fail('text.num_key_value_heads', 'must divide text.num_attention_heads')
        if t.head_dim < 2 or t.head_dim % 2:
            fail('text.head_dim', 'must be even (RoPE rotates pairs)')
        if t.hidden_act not in ACTIVATIONS:
            fail('text.hidden_act', f'{t.hidden_act!r} not in {ACTIVATIONS}')
        if t.rope_scaling is not None:
            _validate_rope_scaling(t.rope_scaling, fail)
        if v.class_token and self.downsampler != 'none':
            fail('vision.class_token', 'needs downsampler "none" (the class token is not '
                 'part of the patch grid)')
        if self.downsampler not in DOWNSAMPLERS:
            fail('downsampler', f'{self.downsampler!r} not in {DOWNSAMPLERS}')
        if self.downsampler != 'none':
            if v.feature_select_strategy != 'full':
                fail('vision.feature_select_strategy',
                     'must be "full" with a downsampler (tokens must form a square grid)')
            if self.downsample_factor < 1:
                fail('downsample_factor', 'must be >= 1')
            if self.downsampler == 'vila2x2' and self.downsample_factor != 2:
                fail('downsample_factor', 'vila2x2 merges 2x2: must be 2')
            if self.downsampler == 'pixel_shuffle' and v.grid % self.downsample_factor:
                fail('downsample_factor', f'must divide the patch grid {v.grid}')
            if self.downsampler_dim < 0:
                fail('downsampler_dim', 'must be >= 0 (0 = no linear layer)')
        if self.projector not in PROJECTORS:
            fail('projector', f'{self.projector!r} not in {PROJECTORS}')
        if self.projector_act not in ACTIVATIONS:
            fail('projector_act', f'{self.projector_act!r} not in {ACTIVATIONS}')
        if not 0 <= self.image_token_id < t.vocab_size:
            fail('image_token_id', f'must be in [0, {t.vocab_size})')
        for k in ('bos_token_id', 'pad_token_id'):
            val = getattr(self, k)
            if val is not None and not 0 <= val < t.vocab_size:
                fail(k, f'must be null or in [0, {t.vocab_size})')
        for e in self.eos_token_ids:
            if not 0 <= e < t.vocab_size:
                fail('eos_token_ids', f'{e} not in [0, {t.vocab_size})')
        if im.tile_size != v.image_size:
            fail('image.tile_size', f'must equal vision.image_size ({v.image_size})')
        if im.rule not in RULES:
            fail('image.rule', f'{im.rule!r} not in {RULES}')
        if im.alpha < 0:
            fail('image.alpha', 'must be >= 0')
        if im.max_tiles < 1:
            fail('image.max_tiles', 'must be >= 1')
        if im.tile_batch_size < 1:
            fail('image.tile_batch_size', 'must be >= 1')
        if im.grids is not None:
            if not im.grids:
                fail('image.grids', 'must be null or a non-empty list of [m, n]')
            for g in im.grids:
                if (not isinstance(g, (list, tuple)) or len(g) != 2
                        or not all(isinstance(x, int) and x >= 1 for x in g)):
                    fail('image.grids', f'{g!r} is not a [m, n] pair of positive ints')
        for k in ('image_mean', 'image_std'):
            val = getattr(im, k)
            if len(val) != v.num_channels:
                fail(f'image.{k}', f'needs {v.num_channels} values')
        if any(s <= 0 for s in im.image_std):
            fail('image.image_std', 'must be > 0')
        for k in ('{image}', '{question}'):
            if k not in self.prompt.template:
                fail('prompt.template', f'must contain {k}')
        if '{system}' not in self.prompt.system_template:
            fail('prompt.system_template', 'must contain {system}')
        if im.processor is not None:
            from bluelm_ros.runtime.vlm.processors import (ProcessorConfigError,
                                                           processor_config_from_dict)
            try:
                processor_config_from_dict(im.processor, 'image.processor')
            except ProcessorConfigError as e:
                fail('image.processor', str(e))
        pv = self.prompt.template_vars
        if pv is not None and not all(isinstance(k, str) and isinstance(x, (str, list))
                                      for k, x in pv.items()):
            fail('prompt.template_vars', 'must map names to strings (or lists of strings)')


def _validate_rope_scaling(rs, fail) -> None:
    kind = rs.get('rope_type') if isinstance(rs, dict) else None
    if kind not in ROPE_TYPES:
        fail('text.rope_scaling.rope_type', f'{kind!r} not in {ROPE_TYPES}')
    if kind == 'llama3':
        for k in ('factor', 'low_freq_factor', 'high_freq_factor',
                  'original_max_position_embeddings'):
            if not _is_num(rs.get(k)) or rs[k] <= 0:
                fail(f'text.rope_scaling.{k}', 'must be a positive number')
        if rs['high_freq_factor'] <= rs['low_freq_factor']:
            fail('text.rope_scaling.high_freq_factor', 'must exceed low_freq_factor')


# annotation string -> predicate; only the forms used above
def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x):
    return _is_int(x) or isinstance(x, float)


_FIELD_TYPES = {
    'int': _is_int,
    'float': _is_num,
    'bool': lambda x: isinstance(x, bool),
    'str': lambda x: isinstance(x, str),
    'list': lambda x: isinstance(x, list),
}
# fields annotated ``Any`` accept these
_ANY_FIELDS = {
    'feature_layer': lambda x: _is_int(x) or (
        isinstance(x, list) and x and all(_is_int(i) for i in x)),
    'grids': lambda x: x is None or isinstance(x, list),
    'default_system': lambda x: x is None or isinstance(x, str),
    'bos_token_id': lambda x: x is None or _is_int(x),
    'pad_token_id': lambda x: x is None or _is_int(x),
    'rope_scaling': lambda x: x is None or isinstance(x, dict),
    'processor': lambda x: x is None or isinstance(x, dict),
    'chat_template': lambda x: x is None or isinstance(x, str),
    'template_vars': lambda x: x is None or isinstance(x, dict),
}
# fields added after format 1 (open checkpoints); files written before omit them
OPTIONAL_FIELDS = {
    VisionConfig: {'class_token': False, 'pre_layernorm': False, 'patch_bias': True},
    TextConfig: {'rope_scaling': None},
    ImageConfig: {'processor': None},
    PromptConfig: {'chat_template': None, 'template_vars': None},
}
# element checks for plain ``list`` fields
_LIST_ITEMS = {'eos_token_ids': _is_int, 'image_mean': _is_num, 'image_std': _is_num}
_NESTED = {'vision': VisionConfig, 'text': TextConfig, 'image': ImageConfig,
           'prompt': PromptConfig}


def _build(cls, data, source, prefix):
    if not isinstance(data, dict):
        raise ConfigError(f'{source}: {prefix.rstrip(".") or "<root>"}: expected an object')
    names = {f.name: f for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names and not k.startswith('_'):
            raise ConfigError(f'{source}: {prefix}{k}: unknown key')
    kwargs = {}
    for name, f in names.items():
        key = prefix + name
        optional = OPTIONAL_FIELDS.get(cls, {})
        if name not in data and name not in optional:
            raise ConfigError(f'{source}: {key}: missing key')
        val = data.get(name, optional.get(name))
        if name in _NESTED and cls is BlueLMVConfig:
            kwargs[name] = _build(_NESTED[name], val, source, key + '.')
            continue
        check = _ANY_FIELDS.get(name) if f.type == 'Any' else _FIELD_TYPES.get(f.type)
        if check is not None and not check(val):
            raise ConfigError(f'{source}: {key}: bad value {val!r} (expected {f.type})')
        item = _LIST_ITEMS.get(name)
        if item is not None and not all(item(x) for x in val):
            raise ConfigError(f'{source}: {key}: bad element in {val!r}')
        if f.type == 'float':
            val = float(val)
        elif item is _is_num:
            val = [float(x) for x in val]
        kwargs[name] = val
    return cls(**kwargs)
