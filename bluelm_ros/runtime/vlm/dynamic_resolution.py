"""Dynamic-resolution tiling: relaxed aspect ratio matching (numpy + OpenCV, no torch).

Shared by the PyTorch model, the ONNX runtime engine and the ROS node.

Conventions (used everywhere in this module):

* A grid ``(m, n)`` (written m:n) has **m tile columns and n tile rows**: the image is
  resized (aspect preserved) and padded onto a canvas ``W x H = 384m wide x 384n high``.
  So the phone's 2:4 grid is a 768 x 1536 portrait canvas.
* Images are ``H x W x 3`` uint8 arrays, RGB unless ``bgr=True`` is passed (ROS/OpenCV
  images are usually BGR).
* Tiles are cut row-major (top row left to right, then the next row); the global
  thumbnail (whole image fitted into one tile) comes **last**, after the m*n tiles, and
  only when m*n > 1. Output is float32 NCHW normalised with ``(x/255 - mean) / std``.
* Padding is centred and uses the value that normalises to 0 (the mean colour, like
  LLaVA's ``expand2square``), so padded pixels carry no signal.

Grid selection rules, for an image ``w x h`` and candidate canvas ``W x H``:
``scale = min(W/w, H/h)``, effective resolution ``R_e = min(int(w*scale)*int(h*scale), w*h)``,
wasted resolution ``R_w = W*H - R_e``.

* ``llava_next``: max ``R_e``, ties broken by min ``R_w`` (first wins on full ties).
* ``internvl`` (InternVL 1.5): grid whose aspect ratio m/n is closest to w/h; on an exact
  tie the larger grid wins if the image area exceeds half its canvas area. InternVL then
  *stretches* the image to the canvas instead of padding, and so does this module.
* ``relaxed`` (BlueLM-V-3B): candidates are enumerated in **descending** order (see
  :func:`descending_order`) keeping a running best ``(R_e_max, R_w_min)``; a candidate
  replaces it if ``(R_e - R_e_max) > alpha*R_e_max`` or
  ``((R_e_max - R_e) < alpha*R_e_max and R_w < R_w_min)``; alpha = 0.1.
"""

from __future__ import annotations

from dataclasses import dataclass
import math
from typing import Iterable, Sequence

import cv2
import numpy as np

Grid = tuple  # (m, n): m columns (width), n rows (height)

DEFAULT_TILE = 384
DEFAULT_MEAN = (0.5, 0.5, 0.5)  # SigLIP
DEFAULT_STD = (0.5, 0.5, 0.5)


# ---------------------------------------------------------------------------
# candidates and metrics


def candidate_grids(max_tiles: int = 9, grids: Iterable | None = None) -> list:
    """Candidate grids: ``grids`` if given, else all (m, n) with m*n <= max_tiles.

    Returned in ascending order of tile count (then m, then n); the rules reorder as
    they need.
    """
    if grids is not None:
        out = [(int(g[0]), int(g[1])) for g in grids]
        if not out or any(m < 1 or n < 1 for m, n in out):
            raise ValueError(f'grids must be non-empty (m, n) pairs >= 1, got {grids!r}')
    else:
        if max_tiles < 1:
            raise ValueError('max_tiles must be >= 1')
        out = [(m, n) for m in range(1, max_tiles + 1) for n in range(1, max_tiles + 1)
               if m * n <= max_tiles]
    return sorted(set(out), key=lambda g: (g[0] * g[1], g[0], g[1]))


def square_grids(k: int) -> list:
    """Return the k*k candidates 1:1 .. k:k of the paper's example (k=3 -> 9)."""
    return candidate_grids(grids=[(m, n) for m in range(1, k + 1) for n in range(1, k + 1)])


def descending_order(candidates: Iterable) -> list:
    """Order candidates for the relaxed rule: largest grid first.

    "Largest" is the number of tiles m*n (= canvas area); among equal tile counts the
    wider grid (larger m) comes first, e.g. 3:3, 3:2, 2:3, 2:2, 3:1, 1:3, 2:1, 1:2, 1:1.
    """
    return sorted({(int(m), int(n)) for m, n in candidates},
                  key=lambda g: (g[0] * g[1], g[0], g[1]), reverse=True)


def resolution_metrics(width: int, height: int, grid: Grid,
                       tile_size: int = DEFAULT_TILE) -> tuple:
    """Return ``(R_e, R_w)`` of an image ``width x height`` on the canvas of ``grid``."""
    cw, ch = grid[0] * tile_size, grid[1] * tile_size
    scale = min(cw / width, ch / height)
    r_e = min(int(width * scale) * int(height * scale), width * height)
    return r_e, cw * ch - r_e


def relaxed_should_replace(r_e: float, r_w: float, best_e: float, best_w: float,
                           alpha: float) -> bool:
    """Apply the relaxed rule's update test to a candidate ``(r_e, r_w)``."""
    return ((r_e - best_e) > alpha * best_e
            or ((best_e - r_e) < alpha * best_e and r_w < best_w))


def select_grid_relaxed(width: int, height: int, candidates: Iterable,
                        tile_size: int = DEFAULT_TILE, alpha: float = 0.1) -> Grid:
    """BlueLM-V-3B relaxed aspect ratio matching."""
    best, best_e, best_w = None, 0.0, math.inf
    for grid in descending_order(candidates):
        r_e, r_w = resolution_metrics(width, height, grid, tile_size)
        # the first candidate always wins against the empty best (0, inf)
        if best is None or relaxed_should_replace(r_e, r_w, best_e, best_w, alpha):
            best, best_e, best_w = grid, r_e, r_w
    return best


def select_grid_llava_next(width: int, height: int, candidates: Iterable,
                           tile_size: int = DEFAULT_TILE) -> Grid:
    """LLaVA-NeXT ``select_best_resolution``: max R_e, then min R_w."""
    best, best_e, best_w = None, -1, math.inf
    for grid in candidate_grids(grids=candidates):
        r_e, r_w = resolution_metrics(width, height, grid, tile_size)
        if r_e > best_e or (r_e == best_e and r_w < best_w):
            best, best_e, best_w = grid, r_e, r_w
    return best


def select_grid_internvl(width: int, height: int, candidates: Iterable,
                         tile_size: int = DEFAULT_TILE) -> Grid:
    """Pick like InternVL 1.5 ``find_closest_aspect_ratio`` (ascending tile count)."""
    aspect = width / height
    area = width * height
    best, best_diff = None, math.inf
    for grid in candidate_grids(grids=candidates):
        diff = abs(aspect - grid[0] / grid[1])
        if diff < best_diff:
            best, best_diff = grid, diff
        elif diff == best_diff and area > 0.5 * tile_size * tile_size * grid[0] * grid[1]:
            best = grid
    return best


def select_grid(width: int, height: int, candidates: Iterable, rule: str = 'relaxed',
                tile_size: int = DEFAULT_TILE, alpha: float = 0.1) -> Grid:
    """Pick a grid with ``rule`` in {"relaxed", "llava_next", "internvl"}."""
    if width < 1 or height < 1:
        raise ValueError(f'image size must be positive, got {width}x{height}')
    candidates = list(candidates)
    if rule == 'relaxed':
        return select_grid_relaxed(width, height, candidates, tile_size, alpha)
    if rule == 'llava_next':
        return select_grid_llava_next(width, height, candidates, tile_size)
    if rule == 'internvl':
        return select_grid_internvl(width, height, candidates, tile_size)
    raise ValueError(f'unknown rule {rule!r}')


def num_tiles(grid: Grid, thumbnail: bool = True) -> int:
    """Tiles encoded for a grid: m*n plus the thumbnail when m*n > 1."""
    k = grid[0] * grid[1]
    return k + (1 if thumbnail and k > 1 else 0)


def num_image_tokens(grid: Grid, tokens_per_tile: int = 196, thumbnail: bool = True) -> int:
    """LLM image tokens for a grid (196 per tile: 27x27 padded to 28x28 -> 14x14)."""
    return num_tiles(grid, thumbnail) * tokens_per_tile


# ---------------------------------------------------------------------------
# pixels


def _resize(image: np.ndarray, w: int, h: int) -> np.ndarray:
    src_h, src_w = image.shape[:2]
    if (w, h) == (src_w, src_h):
        return image
    # INTER_AREA avoids aliasing when shrinking; cubic (as the HF processors) to enlarge
    interp = cv2.INTER_AREA if w * h < src_w * src_h else cv2.INTER_CUBIC
    return cv2.resize(image, (w, h), interpolation=interp)


def fit_size(width: int, height: int, canvas_w: int, canvas_h: int) -> tuple:
    """Aspect-preserving size of a ``width x height`` image fitted in the canvas."""
    scale = min(canvas_w / width, canvas_h / height)
    return (min(canvas_w, max(1, math.ceil(width * scale - 1e-6))),
            min(canvas_h, max(1, math.ceil(height * scale - 1e-6))))


def normalize(image: np.ndarray, mean: Sequence = DEFAULT_MEAN,
              std: Sequence = DEFAULT_STD) -> np.ndarray:
    """uint8 HWC -> float32 CHW, ``(x/255 - mean) / std``."""
    x = image.astype(np.float32) * np.float32(1.0 / 255.0)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def resize_and_pad(image: np.ndarray, canvas_w: int, canvas_h: int,
                   mean: Sequence = DEFAULT_MEAN, std: Sequence = DEFAULT_STD,
                   stretch: bool = False) -> tuple:
    """Fit ``image`` on a canvas and normalise it.

    Returns ``(chw float32 canvas, (x0, y0, w, h) box of the image on the canvas)``.
    The pad value is 0 after normalisation, i.e. the mean colour.
    """
    h0, w0 = image.shape[:2]
    if stretch:
        w, h = canvas_w, canvas_h
    else:
        w, h = fit_size(w0, h0, canvas_w, canvas_h)
    content = normalize(_resize(image, w, h), mean, std)
    out = np.zeros((image.shape[2], canvas_h, canvas_w), np.float32)
    x0, y0 = (canvas_w - w) // 2, (canvas_h - h) // 2
    out[:, y0:y0 + h, x0:x0 + w] = content
    return out, (x0, y0, w, h)


def split_tiles(canvas: np.ndarray, grid: Grid, tile_size: int = DEFAULT_TILE) -> np.ndarray:
    """Cut a CHW canvas of ``m*T x n*T`` into ``[m*n, C, T, T]`` tiles, row-major."""
    m, n = grid
    c, h, w = canvas.shape
    if (w, h) != (m * tile_size, n * tile_size):
        raise ValueError(f'canvas {w}x{h} does not match grid {m}:{n} of {tile_size}')
    t = canvas.reshape(c, n, tile_size, m, tile_size).transpose(1, 3, 0, 2, 4)
    return np.ascontiguousarray(t.reshape(n * m, c, tile_size, tile_size))


@dataclass
class TiledImage:
    """Output of :class:`DynamicResolution`.

    ``tiles``: float32 ``[num_tiles, 3, T, T]`` (grid tiles row-major, thumbnail last);
    ``grid``: (m columns, n rows); ``image_size``: original (width, height);
    ``content_box``: (x0, y0, w, h) of the resized image on the ``384m x 384n`` canvas.
    """

    tiles: np.ndarray
    grid: tuple
    image_size: tuple
    content_box: tuple
    has_thumbnail: bool
    num_tokens: int

    @property
    def num_tiles(self) -> int:
        """Number of tiles, thumbnail included."""
        return int(self.tiles.shape[0])


def tile_batches(tiles: np.ndarray, batch_size: int = 4, pad: bool = True) -> list:
    """Split tiles into fixed-size batches ``[(batch, n_valid), ...]``.

    With ``pad`` the last batch is zero-padded to ``batch_size`` so an accelerator sees one
    static shape (the paper encodes 2:4 = 9 tiles as 4 + 4 + 1); drop the padded rows'
    outputs using ``n_valid``.
    """
    if batch_size < 1:
        raise ValueError('batch_size must be >= 1')
    out = []
    for i in range(0, tiles.shape[0], batch_size):
        b = tiles[i:i + batch_size]
        k = b.shape[0]
        if pad and k < batch_size:
            b = np.concatenate([b, np.zeros((batch_size - k,) + b.shape[1:], b.dtype)])
        out.append((b, k))
    return out


class DynamicResolution:
    """Select a grid for an image and produce normalised tiles."""

    def __init__(self, tile_size: int = DEFAULT_TILE, rule: str = 'relaxed',
                 alpha: float = 0.1, max_tiles: int = 8, grids: Iterable | None = None,
                 thumbnail: bool = True, tile_batch_size: int = 4,
                 image_mean: Sequence = DEFAULT_MEAN, image_std: Sequence = DEFAULT_STD,
                 tokens_per_tile: int = 196):
        if rule not in ('relaxed', 'llava_next', 'internvl'):
            raise ValueError(f'unknown rule {rule!r}')
        self.tile_size = int(tile_size)
        self.rule = rule
        self.alpha = float(alpha)
        self.candidates = candidate_grids(max_tiles, grids)
        self.thumbnail = bool(thumbnail)
        self.tile_batch_size = int(tile_batch_size)
        self.mean = tuple(float(x) for x in image_mean)
        self.std = tuple(float(x) for x in image_std)
        self.tokens_per_tile = int(tokens_per_tile)

    @classmethod
    def from_config(cls, config, **overrides) -> 'DynamicResolution':
        """Build from a :class:`BlueLMVConfig` (uses its image section and token count)."""
        im = config.image
        kw = dict(tile_size=im.tile_size, rule=im.rule, alpha=im.alpha,
                  max_tiles=im.max_tiles, grids=im.grids, thumbnail=im.thumbnail,
                  tile_batch_size=im.tile_batch_size, image_mean=im.image_mean,
                  image_std=im.image_std, tokens_per_tile=config.tokens_per_tile)
        kw.update(overrides)
        return cls(**kw)

    def select(self, width: int, height: int) -> Grid:
        """Grid for an image of ``width x height`` pixels."""
        return select_grid(width, height, self.candidates, self.rule, self.tile_size,
                           self.alpha)

    def num_tokens(self, grid: Grid) -> int:
        """LLM image tokens for ``grid``."""
        return num_image_tokens(grid, self.tokens_per_tile, self.thumbnail)

    def __call__(self, image: np.ndarray, bgr: bool = False) -> TiledImage:
        """Tile an ``H x W x 3`` uint8 image."""
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != len(self.mean) or image.dtype != np.uint8:
            raise ValueError(f'expected HxWx{len(self.mean)} uint8 image, got '
                             f'{image.shape} {image.dtype}')
        if bgr:
            image = image[:, :, ::-1]
        h, w = image.shape[:2]
        grid = self.select(w, h)
        t = self.tile_size
        stretch = self.rule == 'internvl'
        canvas, box = resize_and_pad(image, grid[0] * t, grid[1] * t, self.mean, self.std,
                                     stretch)
        tiles = split_tiles(canvas, grid, t)
        thumb = self.thumbnail and grid[0] * grid[1] > 1
        if thumb:
            small, _ = resize_and_pad(image, t, t, self.mean, self.std, stretch)
            tiles = np.concatenate([tiles, small[None]], axis=0)
        return TiledImage(tiles=tiles, grid=grid, image_size=(w, h), content_box=box,
                          has_thumbnail=thumb, num_tokens=self.num_tokens(grid))

    def batches(self, tiled: TiledImage, pad: bool = True) -> list:
        """Fixed-size tile batches of ``tile_batch_size`` (see :func:`tile_batches`)."""
        return tile_batches(tiled.tiles, self.tile_batch_size, pad)
