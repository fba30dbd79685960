"""Pillow's image resize, bit-exact, in numpy (no Pillow at run time).

The HF image processors resize with Pillow (``Image.resize`` on uint8 RGB). OpenCV's
resize differs from it by several grey levels (other kernels, no antialiasing when
shrinking with cubic/Lanczos, different rounding), which moves ``pixel_values`` by up to
0.1 after normalisation. This module follows Pillow's algorithm (``libImaging/Resample.c``)
step by step so the output is identical, byte for byte:

* per output pixel a window of input pixels ``[xmin, xmin + n)`` around
  ``center = (x + 0.5) * in / out`` and filter weights scaled by ``max(in / out, 1)``
  (the filter is stretched when shrinking: antialiasing), normalised to sum 1;
* weights to fixed point with 22 fraction bits, rounded half away from zero;
* two passes, each rounding to uint8 (``+ 2**21 >> 22``, clipped to 0..255), integer
  arithmetic throughout; horizontal first, except (Pillow >= 13, python-pillow/Pillow#9549)
  when the height shrinks by more than twice as many pixels as the width: then vertical
  first. The order changes a few pixels by a few grey levels, so it is a parameter
  (``pillow_13_order=False`` reproduces Pillow <= 12);
* NEAREST is Pillow's affine scaling with accumulated source coordinates.

Weights are computed with Python floats (the same IEEE doubles and libm ``sin``/``cos``
as Pillow's C code) and cached per (input size, output size, filter).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
import math

import numpy as np

# PIL.Image.Resampling values, as stored in ``preprocessor_config.json`` "resample"
NEAREST, LANCZOS, BILINEAR, BICUBIC, BOX, HAMMING = 0, 1, 2, 3, 4, 5
FILTER_NAMES = {NEAREST: 'nearest', LANCZOS: 'lanczos', BILINEAR: 'bilinear',
                BICUBIC: 'bicubic', BOX: 'box', HAMMING: 'hamming'}
_PRECISION_BITS = 32 - 8 - 2
# 0.54f and 0.46f in Pillow's Hamming window are float32 literals promoted to double
_HAMMING_A = float(np.float32(0.54))
_HAMMING_B = float(np.float32(0.46))


def _box(x: float) -> float:
    return 1.0 if -0.5 < x <= 0.5 else 0.0


def _bilinear(x: float) -> float:
    x = abs(x)
    return 1.0 - x if x < 1.0 else 0.0


def _hamming(x: float) -> float:
    x = abs(x)
    if x == 0.0:
        return 1.0
    if x >= 1.0:
        return 0.0
    x = x * math.pi
    return math.sin(x) / x * (_HAMMING_A + _HAMMING_B * math.cos(x))


def _bicubic(x: float) -> float:
    a = -0.5
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


def _sinc(x: float) -> float:
    if x == 0.0:
        return 1.0
    x = x * math.pi
    return math.sin(x) / x


def _lanczos(x: float) -> float:
    return _sinc(x) * _sinc(x / 3) if -3.0 <= x < 3.0 else 0.0


# filter id -> (function, support in input pixels at scale 1)
_FILTERS = {BOX: (_box, 0.5), BILINEAR: (_bilinear, 1.0), HAMMING: (_hamming, 1.0),
            BICUBIC: (_bicubic, 2.0), LANCZOS: (_lanczos, 3.0)}


@dataclass(frozen=True)
class AxisWeights:
    """Fixed-point weights of one resampling pass.

    Output pixel ``i`` is ``sum_k in[index[i, k]] * weights[i, k]`` (then rounded); unused
    taps have weight 0 and a valid index.
    """

    index: np.ndarray    # [out, taps] int64
    weights: np.ndarray  # [out, taps] int32, 22 fraction bits


@lru_cache(maxsize=64)
def axis_weights(in_size: int, out_size: int, resample: int) -> AxisWeights:
    """Pillow's ``precompute_coeffs`` + ``normalize_coeffs_8bpc`` for one axis."""
    func, support = _FILTERS[resample]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = support * filterscale
    taps = int(math.ceil(support)) * 2 + 1
    index = np.zeros((out_size, taps), np.int64)
    weights = np.zeros((out_size, taps), np.int32)
    one = 1 << _PRECISION_BITS
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        ss = 1.0 / filterscale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size) - xmin
        k = [func((x + xmin - center + 0.5) * ss) for x in range(xmax)]
        total = 0.0
        for w in k:  # sequential sum, as in C (a pairwise sum can differ in the last bit)
            total += w
        if total != 0.0:
            k = [w / total for w in k]
        # int() truncates toward zero like the C cast: round half away from zero
        weights[xx, :xmax] = [int(w * one - 0.5) if w < 0 else int(w * one + 0.5) for w in k]
        index[xx, :xmax] = np.arange(xmin, xmin + xmax)
        index[xx, xmax:] = xmin
    return AxisWeights(index, weights)


def _resample_axis(image: np.ndarray, w: AxisWeights, axis: int) -> np.ndarray:
    """One pass along ``axis`` (0 rows, 1 columns) of an ``H x W x C`` uint8 image."""
    src = image.astype(np.int32)
    shape = [1, 1, 1]
    shape[axis] = -1
    acc = None
    for k in range(w.index.shape[1]):
        term = np.take(src, w.index[:, k], axis=axis) * w.weights[:, k].reshape(shape)
        acc = term if acc is None else acc + term
    acc += 1 << (_PRECISION_BITS - 1)
    return np.clip(acc >> _PRECISION_BITS, 0, 255).astype(np.uint8)


@lru_cache(maxsize=64)
def _nearest_index(in_size: int, out_size: int) -> np.ndarray:
    # Pillow's ImagingScaleAffine: the source coordinate is accumulated step by step
    step = in_size / out_size
    pos = step * 0.5
    out = np.empty(out_size, np.int64)
    for x in range(out_size):
        out[x] = min(int(pos), in_size - 1)
        pos += step
    return out


def vertical_pass_first(in_w: int, in_h: int, out_w: int, out_h: int,
                        pillow_13_order: bool = True) -> bool:
    """Tell whether Pillow runs the vertical pass first for this resize.

    Pillow 13 does when the height shrinks and loses more than twice as many rows as the
    width loses columns (measured bit-exact on ~2900 random resizes; Pillow <= 12 never).
    """
    return pillow_13_order and out_h < in_h and (in_h - out_h) > 2 * (in_w - out_w)


def resize(image: np.ndarray, width: int, height: int, resample: int = BICUBIC,
           pillow_13_order: bool = True) -> np.ndarray:
    """Resize an ``H x W x C`` uint8 image to ``width x height`` exactly like Pillow."""
    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f'expected an HxWxC uint8 image, got {image.shape} {image.dtype}')
    if width < 1 or height < 1:
        raise ValueError(f'output size must be positive, got {width}x{height}')
    if resample not in FILTER_NAMES:
        raise ValueError(f'unknown resample filter {resample!r} (Pillow ids {FILTER_NAMES})')
    in_h, in_w = image.shape[:2]
    if (in_w, in_h) == (width, height):
        return image.copy()
    if resample == NEAREST:
        rows = _nearest_index(in_h, height)
        cols = _nearest_index(in_w, width)
        return np.ascontiguousarray(image[rows][:, cols])
    passes = [(1, in_w, width), (0, in_h, height)]
    if vertical_pass_first(in_w, in_h, width, height, pillow_13_order):
        passes.reverse()
    out = image
    for axis, n_in, n_out in passes:
        if n_in != n_out:
            out = _resample_axis(out, axis_weights(n_in, n_out, resample), axis=axis)
    return out
