r"""Per-family image preprocessing of open VLM checkpoints (numpy + exact Pillow resize).

A converted checkpoint records its image processor in ``config.json`` (``image.processor``)
and the runtime reproduces transformers' (Pillow backend) processor from it, without
torch or transformers:

* ``single``: one tile per image, the pipeline shared by ``SiglipImageProcessor``
  (stretch to ``height x width``), ``CLIPImageProcessor`` (shortest edge, then centre
  crop) and ``LlavaImageProcessor`` (optionally padded to a square with the mean colour
  first). The prompt gets ``tokens_per_image`` image tokens.
* ``idefics3``: ``Idefics3ImageProcessor`` / ``SmolVLMImageProcessor``: resize the longest
  edge, round both sides up to multiples of the tile, cut ``rows x cols`` crops and add
  the whole image squeezed into one tile (the global image, last). The prompt gets
  ``<fake_token_around_image><row_r_col_c><image>*image_seq_len`` per crop, a newline
  after each row, then ``\\n<fake_token_around_image><global-img><image>*n<fake...>``.

Without ``image.processor`` (BlueLM-V bundles) the relaxed-aspect-ratio tiler of
:mod:`dynamic_resolution` is used. Every processor returns a
:class:`~bluelm_ros.vlm.dynamic_resolution.TiledImage` and tells the prompt builder
what text stands for the image (:meth:`image_prompt`).

Pixel arithmetic follows transformers exactly: Pillow resizes on uint8
(:mod:`pil_resample`), then ``float32(float64(x) * rescale_factor)``, then
``(x - mean) / std`` in float32. So ``pixel_values`` are bit-identical.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
import math
from typing import Any, Optional

import numpy as np

from bluelm_ros.runtime.vlm import pil_resample
from bluelm_ros.runtime.vlm.dynamic_resolution import DynamicResolution, TiledImage

PROCESSOR_TYPES = ('single', 'idefics3')
# HF image_processor_type -> our processor type (Fast = torchvision backend, see docs)
HF_PROCESSOR_TYPES = {
    'SiglipImageProcessor': 'single', 'SiglipImageProcessorFast': 'single',
    'CLIPImageProcessor': 'single', 'CLIPImageProcessorFast': 'single',
    'LlavaImageProcessor': 'single', 'LlavaImageProcessorFast': 'single',
    'Idefics3ImageProcessor': 'idefics3', 'Idefics3ImageProcessorFast': 'idefics3',
    'SmolVLMImageProcessor': 'idefics3', 'SmolVLMImageProcessorFast': 'idefics3',
}
# transformers' class defaults (a preprocessor_config.json may omit values equal to them)
_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
_HF_DEFAULTS = {
    'SiglipImageProcessor': dict(resample=3, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                 size={'height': 224, 'width': 224}, do_center_crop=False,
                                 default_to_square=False),
    'CLIPImageProcessor': dict(resample=3, image_mean=_CLIP_MEAN, image_std=_CLIP_STD,
                               size={'shortest_edge': 224}, do_center_crop=True,
                               crop_size={'height': 224, 'width': 224},
                               default_to_square=False),
    'LlavaImageProcessor': dict(resample=3, image_mean=_CLIP_MEAN, image_std=_CLIP_STD,
                                size={'shortest_edge': 224}, do_center_crop=True,
                                crop_size={'height': 224, 'width': 224}, do_pad=False,
                                default_to_square=False),
    'Idefics3ImageProcessor': dict(resample=1, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                   size={'longest_edge': 4 * 364},
                                   max_image_size={'longest_edge': 364},
                                   do_image_splitting=True),
}
_HF_DEFAULTS['SmolVLMImageProcessor'] = dict(_HF_DEFAULTS['Idefics3ImageProcessor'],
                                             size={'longest_edge': 4 * 512},
                                             max_image_size={'longest_edge': 512})
MAX_IMAGE_SIZE = 4096  # transformers' Idefics3 cap on the resized longest edge


class ProcessorConfigError(ValueError):
    """An image processor config is malformed or unsupported; the message names the key."""


# ---------------------------------------------------------------------------
# configs (stored in config.json under image.processor)


@dataclass
class SingleTileConfig:
    """One tile per image: [pad to square] -> resize -> [centre crop] -> rescale/normalise.

    ``resize``: ``{"height", "width"}`` (stretch), ``{"shortest_edge"}`` (aspect kept,
    optionally with ``"longest_edge"``) or null; ``crop``: ``[height, width]`` or null.
    """

    type: str = 'single'
    hf_class: str = 'SiglipImageProcessor'
    resample: int = pil_resample.BICUBIC
    pad_to_square: bool = False
    resize: Any = None
    crop: Any = None
    rescale_factor: Any = 1 / 255
    image_mean: Any = None
    image_std: Any = None
    tokens_per_image: int = 0
    image_token: str = '<image>'


@dataclass
class Idefics3Config:
    """Idefics3 / SmolVLM splitting (see the module docstring)."""

    type: str = 'idefics3'
    hf_class: str = 'Idefics3ImageProcessor'
    resample: int = pil_resample.LANCZOS
    longest_edge: Any = 1456
    tile_size: int = 364
    split: bool = True
    rescale_factor: Any = 1 / 255
    image_mean: Any = None
    image_std: Any = None
    image_seq_len: int = 169
    image_token: str = '<image>'
    fake_image_token: str = '<fake_token_around_image>'
    global_image_token: str = '<global-img>'


_CONFIG_TYPES = {'single': SingleTileConfig, 'idefics3': Idefics3Config}


def processor_config_from_dict(data: dict, source: str = 'image.processor'):
    """Build a processor config from its JSON form; every key required, none unknown."""
    if not isinstance(data, dict) or data.get('type') not in _CONFIG_TYPES:
        raise ProcessorConfigError(f'{source}.type: must be one of {PROCESSOR_TYPES}')
    cls = _CONFIG_TYPES[data['type']]
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            raise ProcessorConfigError(f'{source}.{k}: unknown key')
    missing = sorted(names - set(data))
    if missing:
        raise ProcessorConfigError(f'{source}.{missing[0]}: missing key')
    cfg = cls(**data)
    _validate(cfg, source)
    return cfg


def _validate(cfg, source: str) -> None:
    def fail(key, msg):
        raise ProcessorConfigError(f'{source}.{key}: {msg}')

    if cfg.resample not in pil_resample.FILTER_NAMES:
        fail('resample', f'{cfg.resample!r} is not a Pillow filter id {pil_resample.FILTER_NAMES}')
    for k in ('image_mean', 'image_std'):
        v = getattr(cfg, k)
        if v is not None and (not isinstance(v, list) or len(v) != 3):
            fail(k, 'must be null or a list of 3 numbers')
    if cfg.image_std is not None and any(s <= 0 for s in cfg.image_std):
        fail('image_std', 'must be > 0')
    if isinstance(cfg, SingleTileConfig):
        if cfg.resize is not None and _resize_kind(cfg.resize) is None:
            fail('resize', f'{cfg.resize!r} is not {{height, width}}, {{shortest_edge}} or '
                 '{shortest_edge, longest_edge}')
        if cfg.crop is not None and (len(cfg.crop) != 2 or min(cfg.crop) < 1):
            fail('crop', 'must be null or [height, width]')
        if cfg.tokens_per_image < 1:
            fail('tokens_per_image', 'must be >= 1')
    else:
        if cfg.tile_size < 1:
            fail('tile_size', 'must be >= 1')
        if cfg.longest_edge is not None and cfg.longest_edge < 1:
            fail('longest_edge', 'must be null or >= 1')
        if cfg.image_seq_len < 1:
            fail('image_seq_len', 'must be >= 1')


def _resize_kind(size: dict) -> Optional[str]:
    keys = set(size)
    if keys == {'height', 'width'}:
        return 'stretch'
    if keys in ({'shortest_edge'}, {'shortest_edge', 'longest_edge'}):
        return 'shortest_edge'
    return None


# ---------------------------------------------------------------------------
# from a checkpoint's preprocessor_config.json


def _size_dict(size, default_to_square: bool, key: str):
    """Normalise a size like transformers' ``get_size_dict`` (ints, lists -> dicts)."""
    if isinstance(size, int):
        return ({'height': size, 'width': size} if default_to_square
                else {'shortest_edge': size})
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return {'height': int(size[0]), 'width': int(size[1])}
    if isinstance(size, dict):
        return {k: int(v) for k, v in size.items() if v is not None}
    raise ProcessorConfigError(f'preprocessor_config.json: {key}: unsupported value {size!r}')


def from_hf_preprocessor(pre: dict, source: str = 'preprocessor_config.json',
                         tile_size: Optional[int] = None, tokens_per_tile: int = 0,
                         image_seq_len: Optional[int] = None,
                         image_token: str = '<image>') -> dict:
    """Translate an HF ``preprocessor_config.json`` dict into our ``image.processor`` dict.

    ``tokens_per_tile`` (image tokens the vision graph emits per tile) sets LLaVA's token
    count; ``image_seq_len`` (Idefics3 processors' ``processor_config.json``) must equal it.
    Unsupported settings raise :class:`ProcessorConfigError` naming the key.
    """
    hf_class = pre.get('image_processor_type')
    if hf_class not in HF_PROCESSOR_TYPES:
        raise ProcessorConfigError(f'{source}: image_processor_type: {hf_class!r} unsupported '
                                   f'(supported: {sorted(HF_PROCESSOR_TYPES)})')
    base = hf_class[:-4] if hf_class.endswith('Fast') else hf_class
    defaults = _HF_DEFAULTS[base]

    def get(key, default=None):
        value = pre.get(key)
        return defaults.get(key, default) if value is None else value

    common = dict(hf_class=hf_class, resample=int(get('resample')),
                  rescale_factor=float(get('rescale_factor', 1 / 255))
                  if get('do_rescale', True) else None,
                  image_mean=[float(x) for x in get('image_mean')]
                  if get('do_normalize', True) else None,
                  image_std=[float(x) for x in get('image_std')]
                  if get('do_normalize', True) else None,
                  image_token=image_token)
    if HF_PROCESSOR_TYPES[hf_class] == 'single':
        square = bool(get('default_to_square', defaults['default_to_square']))
        resize = (_size_dict(get('size'), square, 'size') if get('do_resize', True) else None)
        crop = None
        if get('do_center_crop', defaults['do_center_crop']):
            c = _size_dict(get('crop_size'), True, 'crop_size')
            if set(c) != {'height', 'width'}:
                raise ProcessorConfigError(f'{source}: crop_size: needs height and width')
            crop = [c['height'], c['width']]
        data = dict(type='single', pad_to_square=bool(get('do_pad', False)), resize=resize,
                    crop=crop, tokens_per_image=int(tokens_per_tile), **common)
    else:
        size = _size_dict(get('size'), False, 'size')
        tile = _size_dict(get('max_image_size'), False, 'max_image_size')
        if set(size) != {'longest_edge'} or set(tile) != {'longest_edge'}:
            raise ProcessorConfigError(f'{source}: size / max_image_size: need "longest_edge"')
        if tile_size is not None and tile['longest_edge'] != tile_size:
            raise ProcessorConfigError(
                f'{source}: max_image_size.longest_edge {tile["longest_edge"]} differs from the '
                f'vision tower image_size {tile_size}')
        seq = tokens_per_tile if image_seq_len is None else int(image_seq_len)
        if tokens_per_tile and seq != tokens_per_tile:
            raise ProcessorConfigError(f'{source}: image_seq_len {seq} differs from the '
                                       f'{tokens_per_tile} tokens the vision tower emits per tile')
        data = dict(type='idefics3',
                    longest_edge=size['longest_edge'] if get('do_resize', True) else None,
                    tile_size=tile['longest_edge'],
                    split=bool(get('do_image_splitting', True)), image_seq_len=seq,
                    # fixed strings in transformers' Idefics3/SmolVLM processors
                    fake_image_token='<fake_token_around_image>',
                    global_image_token='<global-img>', **common)
    processor_config_from_dict(data, source)  # validate now, not on the robot
    return data


# ---------------------------------------------------------------------------
# pixel operations shared by the processors


def rescale_normalize(image: np.ndarray, rescale_factor, mean, std) -> np.ndarray:
    """uint8 HWC -> float32 CHW with transformers' exact arithmetic (see module doc)."""
    if rescale_factor is not None:
        x = (image.astype(np.float64) * rescale_factor).astype(np.float32)
    else:
        x = image.astype(np.float32)
    if mean is not None:
        x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def shortest_edge_size(height: int, width: int, shortest: int,
                       longest: Optional[int] = None) -> tuple:
    """``(h, w)`` with the short side at ``shortest`` (capped so the long side <= ``longest``)."""
    if longest is None:
        short, long_ = (width, height) if width <= height else (height, width)
        new_short, new_long = shortest, int(shortest * long_ / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)
    raw = None
    lo, hi = float(min(height, width)), float(max(height, width))
    if hi / lo * shortest > longest:
        raw = longest * lo / hi
        shortest = int(round(raw))
    if (height <= width and height == shortest) or (width <= height and width == shortest):
        return height, width
    if width < height:
        return (int(raw * height / width) if raw is not None else int(shortest * height / width),
                shortest)
    return shortest, (int(raw * width / height) if raw is not None
                      else int(shortest * width / height))


def center_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Centre crop of an HWC image; zero-padded first where it is smaller (as transformers)."""
    h, w = image.shape[:2]
    top, left = (h - height) // 2, (w - width) // 2
    if top >= 0 and left >= 0:
        return image[top:top + height, left:left + width]
    new_h, new_w = max(height, h), max(width, w)
    canvas = np.zeros((new_h, new_w) + image.shape[2:], image.dtype)
    top_pad, left_pad = math.ceil((new_h - h) / 2), math.ceil((new_w - w) / 2)
    canvas[top_pad:top_pad + h, left_pad:left_pad + w] = image
    top, left = top + top_pad, left + left_pad
    return canvas[max(0, top):min(new_h, top + height), max(0, left):min(new_w, left + width)]


def pad_to_square(image: np.ndarray, color) -> np.ndarray:
    """Centre the image on a square of ``color`` (LLaVA's ``do_pad``)."""
    h, w = image.shape[:2]
    if h == w:
        return image
    side = max(h, w)
    out = np.empty((side, side, image.shape[2]), image.dtype)
    out[:] = np.asarray(color, image.dtype)
    if w > h:
        top = (side - h) // 2
        out[top:top + h] = image
    else:
        left = (side - w) // 2
        out[:, left:left + w] = image
    return out


def _as_rgb(image: np.ndarray, bgr: bool) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f'expected an HxWx3 uint8 image, got {image.shape} {image.dtype}')
    return np.ascontiguousarray(image[:, :, ::-1]) if bgr else image


# ---------------------------------------------------------------------------
# processors


class SingleTileProcessor:
    """SigLIP / CLIP / LLaVA: one tile per image (see :class:`SingleTileConfig`)."""

    def __init__(self, config: SingleTileConfig, tile_size: int, tile_batch_size: int = 4):
        self.config = config
        self.tile_size = tile_size
        self.tile_batch_size = tile_batch_size

    def output_size(self, height: int, width: int) -> tuple:
        """``(h, w)`` after the resize step."""
        r = self.config.resize
        if r is None:
            return height, width
        if _resize_kind(r) == 'stretch':
            return r['height'], r['width']
        return shortest_edge_size(height, width, r['shortest_edge'], r.get('longest_edge'))

    def __call__(self, image: np.ndarray, bgr: bool = False) -> TiledImage:
        """Preprocess one ``H x W x 3`` uint8 frame into one tile."""
        c = self.config
        rgb = _as_rgb(image, bgr)
        h0, w0 = rgb.shape[:2]
        x = rgb
        if c.pad_to_square:
            mean = c.image_mean or [0.0, 0.0, 0.0]
            x = pad_to_square(x, [int(m * 255) for m in mean])
        h, w = self.output_size(*x.shape[:2])
        x = pil_resample.resize(x, w, h, c.resample)
        if c.crop is not None:
            x = center_crop(x, *c.crop)
        if x.shape[:2] != (self.tile_size, self.tile_size):
            raise ValueError(f'{c.hf_class} settings give a {x.shape[1]}x{x.shape[0]} tile but '
                             f'the vision tower takes {self.tile_size}x{self.tile_size}')
        tile = rescale_normalize(x, c.rescale_factor, c.image_mean, c.image_std)
        return TiledImage(tiles=tile[None], grid=(1, 1), image_size=(w0, h0),
                          content_box=(0, 0, self.tile_size, self.tile_size),
                          has_thumbnail=False, num_tokens=c.tokens_per_image)

    def image_prompt(self, grid: tuple, has_thumbnail: bool) -> str:
        """Return the text standing for one image in the prompt."""
        return self.config.image_token * self.config.tokens_per_image


def idefics3_resize_size(height: int, width: int, longest_edge: int) -> tuple:
    """``(h, w)`` with the longest edge at ``longest_edge``, the other even (transformers)."""
    aspect = width / height
    if width >= height:
        width = longest_edge
        height = int(width / aspect)
        height += height % 2
    else:
        height = longest_edge
        width = int(height * aspect)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    # then scaled below MAX_IMAGE_SIZE
    aspect = width / height
    if width >= height and width > MAX_IMAGE_SIZE:
        width, height = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE / aspect)
    elif height > width and height > MAX_IMAGE_SIZE:
        height, width = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE * aspect)
    return max(height, 1), max(width, 1)


def tile_multiple_size(height: int, width: int, tile: int) -> tuple:
    """``(h, w)`` rounded up to multiples of ``tile``, as ``resize_for_vision_encoder``."""
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect) / tile) * tile
    return height, width


class Idefics3Processor:
    """Idefics3 / SmolVLM crops + global image (see :class:`Idefics3Config`).

    The :class:`TiledImage` ``grid`` is ``(cols, rows)`` of crops; ``has_thumbnail`` says
    the last tile is the global image of a split frame. An unsplit frame is one tile,
    ``grid == (1, 1)`` without thumbnail (transformers' ``rows == cols == 0``).
    """

    def __init__(self, config: Idefics3Config, tile_size: int, tile_batch_size: int = 4):
        if config.tile_size != tile_size:
            raise ValueError(f'processor tile_size {config.tile_size} != vision image_size '
                             f'{tile_size}')
        self.config = config
        self.tile_size = tile_size
        self.tile_batch_size = tile_batch_size

    def _tiles(self, x: np.ndarray) -> tuple:
        """Crops (row-major) + global image as uint8 arrays; return ``(tiles, rows, cols)``."""
        c, t = self.config, self.tile_size
        if not c.split:
            return [pil_resample.resize(x, t, t, c.resample)], 0, 0
        h, w = tile_multiple_size(x.shape[0], x.shape[1], t)
        x = pil_resample.resize(x, w, h, c.resample)
        if h <= t and w <= t:
            return [x], 0, 0
        rows, cols = (h - t) // t + 1, (w - t) // t + 1
        crops = [x[r * t:(r + 1) * t, q * t:(q + 1) * t] for r in range(rows) for q in range(cols)]
        crops.append(pil_resample.resize(x, t, t, c.resample))
        return crops, rows, cols

    def __call__(self, image: np.ndarray, bgr: bool = False) -> TiledImage:
        """Preprocess one ``H x W x 3`` uint8 frame into crops + global image."""
        c = self.config
        x = _as_rgb(image, bgr)
        h0, w0 = x.shape[:2]
        if c.longest_edge is not None:
            h, w = idefics3_resize_size(h0, w0, c.longest_edge)
            x = pil_resample.resize(x, w, h, c.resample)
        tiles, rows, cols = self._tiles(x)
        pixel_values = np.stack([rescale_normalize(t, c.rescale_factor, c.image_mean,
                                                   c.image_std) for t in tiles])
        split = rows > 0
        return TiledImage(tiles=pixel_values, grid=(cols, rows) if split else (1, 1),
                          image_size=(w0, h0), content_box=(0, 0, x.shape[1], x.shape[0]),
                          has_thumbnail=split, num_tokens=len(tiles) * c.image_seq_len)

    def image_prompt(self, grid: tuple, has_thumbnail: bool) -> str:
        """Return the marker-token text transformers' processor puts for ``<image>``."""
        c = self.config
        image = c.image_token * c.image_seq_len
        global_image = f'{c.fake_image_token}{c.global_image_token}{image}{c.fake_image_token}'
        if not has_thumbnail:
            return global_image
        cols, rows = grid
        lines = [''.join(f'{c.fake_image_token}<row_{r + 1}_col_{q + 1}>{image}'
                         for q in range(cols)) + '\n' for r in range(rows)]
        return ''.join(lines) + '\n' + global_image


class TilerProcessor:
    """BlueLM-V's relaxed-aspect-ratio tiler behind the processor interface."""

    def __init__(self, tiler: DynamicResolution, image_token: str):
        self.tiler = tiler
        self.image_token = image_token
        self.tile_size = tiler.tile_size
        self.tile_batch_size = tiler.tile_batch_size

    def __call__(self, image: np.ndarray, bgr: bool = False) -> TiledImage:
        """Tile one frame."""
        return self.tiler(image, bgr=bgr)

    def image_prompt(self, grid: tuple, has_thumbnail: bool) -> str:
        """Return one image token per image embedding."""
        return self.image_token * self.tiler.num_tokens(grid)


def build_image_processor(config):
    """Build the image processor a :class:`~bluelm_ros.vlm.config.BlueLMVConfig` asks for."""
    im = config.image
    if im.processor is None:
        return TilerProcessor(DynamicResolution.from_config(config), config.prompt.image_token)
    pc = processor_config_from_dict(im.processor)
    cls = SingleTileProcessor if pc.type == 'single' else Idefics3Processor
    return cls(pc, config.vision.image_size, im.tile_batch_size)
