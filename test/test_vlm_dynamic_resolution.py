"""Dynamic resolution: grid selection rules (spec: shared/papers/bluelm-v-3b.md) and tiling."""

import math

import numpy as np
import pytest

from bluelm_ros.runtime.vlm import dynamic_resolution as dr
from bluelm_ros.tools.vlm.configs import load_config

RULES = ('relaxed', 'llava_next', 'internvl')
NINE = dr.square_grids(3)  # the paper's 9 candidates 1:1 .. 3:3


def sweep_sizes():
    """Image sizes from tiny to 3k on both axes, odd steps to hit awkward ratios."""
    return [(w, h) for w in range(24, 3100, 97) for h in range(24, 3100, 89)]


def relaxed_in_order(w, h, order, alpha=0.1):
    """Reference relaxed rule over an explicit enumeration order."""
    best, be, bw = None, 0, math.inf
    for g in order:
        e, waste = dr.resolution_metrics(w, h, g)
        if best is None or dr.relaxed_should_replace(e, waste, be, bw, alpha):
            best, be, bw = g, e, waste
    return best


# ---------------------------------------------------------------------------
# the spec's numbers


def test_paper_example_394x390():
    assert len(NINE) == 9
    assert dr.select_grid(394, 390, NINE, 'llava_next') == (2, 2)
    assert dr.select_grid(394, 390, NINE, 'relaxed', alpha=0.1) == (1, 1)
    # why: 2:2 (768x768, 4x the area) only gains ~5% effective resolution over 1:1
    e11, _ = dr.resolution_metrics(394, 390, (1, 1))
    e22, w22 = dr.resolution_metrics(394, 390, (2, 2))
    assert e22 == 394 * 390 and e22 < 1.1 * e11
    assert w22 == 768 * 768 - 394 * 390


def test_token_counts():
    assert dr.num_image_tokens((1, 1)) == 196  # single tile, no thumbnail
    assert dr.num_tiles((2, 4)) == 9
    assert dr.num_image_tokens((2, 4)) == 1764  # 8 tiles + thumbnail
    assert dr.num_image_tokens((2, 2)) == 5 * 196
    assert dr.num_image_tokens((2, 4), thumbnail=False) == 8 * 196
    assert load_config('bluelm-v-3b').tokens_per_tile == 196  # 27x27 -> 28x28 -> 14x14


def test_grid_is_columns_by_rows():
    # 2:4 is the phone's 768 wide x 1536 high portrait canvas
    e, w = dr.resolution_metrics(768, 1536, (2, 4))
    assert (e, w) == (768 * 1536, 0)
    cands = dr.candidate_grids(8)
    for rule in RULES:
        assert dr.select_grid(768, 1536, cands, rule) == (2, 4)
        assert dr.select_grid(1536, 768, cands, rule) == (4, 2)


# ---------------------------------------------------------------------------
# relaxed rule semantics


def test_descending_order():
    assert dr.descending_order(NINE) == [(3, 3), (3, 2), (2, 3), (2, 2), (3, 1), (1, 3),
                                         (2, 1), (1, 2), (1, 1)]


def test_enumeration_order_matters_and_descending_is_used():
    asc = list(reversed(dr.descending_order(NINE)))
    # 400x410: descending keeps shrinking to 1:1; ascending is lured upward to 2:2
    assert dr.select_grid_relaxed(400, 410, NINE) == (1, 1)
    assert relaxed_in_order(400, 410, asc) == (2, 2)
    for w, h in sweep_sizes()[::7]:
        assert dr.select_grid_relaxed(w, h, NINE) == relaxed_in_order(
            w, h, dr.descending_order(NINE))


def test_descending_by_area_equals_lexicographic_descending():
    # "largest grid first" read as tile count or as (m, n) lexicographic: same picks
    for cands in (NINE, dr.candidate_grids(8), dr.candidate_grids(16)):
        lex = sorted(cands, reverse=True)
        for w, h in sweep_sizes()[::3]:
            assert dr.select_grid_relaxed(w, h, cands) == relaxed_in_order(w, h, lex)


@pytest.mark.parametrize('r_e,r_w,expect', [
    (1100, 50, True),    # gain exactly 10% is not enough ... but less waste wins (cond 2)
    (1100, 500, False),  # gain exactly alpha*R_e_max, more waste: strict '>' fails
    (1101, 500, True),   # gain above 10%
    (901, 99, True),     # loss just under 10% and less waste
    (901, 100, False),   # equal waste is not less
    (900, 1, False),     # loss of exactly 10% is too much
    (1000, 99, True),    # same resolution, less waste
])
def test_replace_rule_boundaries(r_e, r_w, expect):
    assert dr.relaxed_should_replace(r_e, r_w, 1000, 100, 0.1) is expect


def test_alpha_zero_is_max_effective_resolution_ties_to_largest():
    # alpha = 0: replace only on strictly higher R_e, so ties go to the first (largest) grid
    assert dr.select_grid(394, 390, NINE, 'relaxed', alpha=0.0) == (3, 3)
    cands = dr.candidate_grids(8)
    for w, h in sweep_sizes()[::5]:
        a = dr.select_grid(w, h, cands, 'relaxed', alpha=0.0)
        b = dr.select_grid(w, h, cands, 'llava_next')
        assert dr.resolution_metrics(w, h, a)[0] == dr.resolution_metrics(w, h, b)[0]


def test_huge_alpha_minimises_waste():
    # alpha -> inf: condition 1 never fires, condition 2 always admits less waste
    for w, h in sweep_sizes()[::5]:
        g = dr.select_grid(w, h, NINE, 'relaxed', alpha=1e12)
        wastes = [dr.resolution_metrics(w, h, c)[1] for c in NINE]
        assert dr.resolution_metrics(w, h, g)[1] == min(wastes)


def test_small_images_are_not_upscaled_onto_many_tiles():
    # any image that fits one tile: relaxed keeps 1:1, LLaVA-NeXT enlarges if it can
    for w, h in [(100, 80), (383, 200), (384, 384), (50, 300)]:
        assert dr.select_grid(w, h, NINE, 'relaxed') == (1, 1)


# ---------------------------------------------------------------------------
# comparison of the three rules on a sweep


@pytest.mark.parametrize('cands', [NINE, dr.candidate_grids(8), dr.candidate_grids(16)],
                         ids=['3x3', 'max8', 'max16'])
def test_rule_sweep(cands):
    tokens = {r: 0 for r in RULES}
    for w, h in sweep_sizes():
        picks = {r: dr.select_grid(w, h, cands, r) for r in RULES}
        m = {r: dr.resolution_metrics(w, h, g) for r, g in picks.items()}
        for r, g in picks.items():
            tokens[r] += dr.num_image_tokens(g)
            assert g in cands
            # LLaVA-NeXT maximises effective resolution
            assert m['llava_next'][0] >= m[r][0]
        rel, llv = picks['relaxed'], picks['llava_next']
        # relaxed never uses more tiles, nor wastes more canvas, than LLaVA-NeXT
        assert rel[0] * rel[1] <= llv[0] * llv[1]
        assert m['relaxed'][1] <= m['llava_next'][1]
        # at equal effective resolution it wastes exactly as little
        if m['relaxed'][0] == m['llava_next'][0]:
            assert m['relaxed'][1] == m['llava_next'][1]
        # InternVL: closest aspect ratio
        ar = w / h
        best = min(abs(ar - c[0] / c[1]) for c in cands)
        assert abs(ar - picks['internvl'][0] / picks['internvl'][1]) == best
    assert tokens['relaxed'] < tokens['llava_next']


# ---------------------------------------------------------------------------
# tiling


def quadrant_image(m, n, tile=384):
    """An image exactly m*tile x n*tile whose tiles have distinct flat colours."""
    img = np.zeros((n * tile, m * tile, 3), np.uint8)
    for r in range(n):
        for c in range(m):
            img[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] = (
                20 * (r * m + c) + 10, 255 - 20 * (r * m + c), 7 * r)
    return img


def test_tiles_row_major_then_thumbnail():
    tiler = dr.DynamicResolution(max_tiles=8)
    img = quadrant_image(2, 4)
    out = tiler(img)
    assert out.grid == (2, 4) and out.image_size == (768, 1536)
    assert out.tiles.shape == (9, 3, 384, 384) and out.tiles.dtype == np.float32
    assert out.has_thumbnail and out.num_tokens == 1764
    for k in range(8):
        r, c = divmod(k, 2)
        expect = (img[r * 384, c * 384].astype(np.float32) / 255 - 0.5) / 0.5
        assert np.allclose(out.tiles[k, :, 100, 100], expect, atol=1e-6)
    thumb = out.tiles[8]
    # 768x1536 fits 192x384, centred: 96 px of zero padding each side
    assert np.all(thumb[:, :, :96] == 0) and np.all(thumb[:, :, -96:] == 0)
    assert np.abs(thumb[:, :, 96:288]).max() > 0.1


def test_normalisation_and_padding():
    tiler = dr.DynamicResolution(grids=[(1, 1)])
    white = np.full((100, 384, 3), 255, np.uint8)
    out = tiler(white)
    assert out.grid == (1, 1) and out.tiles.shape == (1, 3, 384, 384)
    assert not out.has_thumbnail
    x0, y0, w, h = out.content_box
    assert (x0, w, h) == (0, 384, 100) and y0 == (384 - 100) // 2
    assert np.allclose(out.tiles[0, :, y0:y0 + h], 1.0)
    assert np.all(out.tiles[0, :, :y0] == 0) and np.all(out.tiles[0, :, y0 + h:] == 0)
    black = tiler(np.zeros((384, 384, 3), np.uint8))
    assert np.allclose(black.tiles, -1.0)


def test_bgr_input_and_validation():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (300, 500, 3), dtype=np.uint8)
    tiler = dr.DynamicResolution(max_tiles=4)
    a = tiler(img)
    b = tiler(np.ascontiguousarray(img[:, :, ::-1]), bgr=True)
    assert np.array_equal(a.tiles, b.tiles)
    with pytest.raises(ValueError):
        tiler(img.astype(np.float32))
    with pytest.raises(ValueError):
        tiler(img[:, :, :2])
    with pytest.raises(ValueError):
        dr.DynamicResolution(rule='nope')
    with pytest.raises(ValueError):
        dr.select_grid(0, 10, NINE)


def test_internvl_stretches():
    tiler = dr.DynamicResolution(rule='internvl', max_tiles=6)
    out = tiler(np.full((500, 1000, 3), 200, np.uint8))
    assert out.grid == (2, 1)
    assert out.content_box == (0, 0, 768, 384)
    assert np.allclose(out.tiles, (200 / 255 - 0.5) / 0.5, atol=1e-6)


def test_fixed_tile_batches():
    tiler = dr.DynamicResolution(max_tiles=8, tile_batch_size=4)
    out = tiler(quadrant_image(2, 4))
    batches = tiler.batches(out)
    assert [b.shape[0] for b, _ in batches] == [4, 4, 4]
    assert [k for _, k in batches] == [4, 4, 1]  # 2:4 -> 4 + 4 + 1
    assert np.array_equal(batches[2][0][0], out.tiles[8])
    assert np.all(batches[2][0][1:] == 0)
    assert [b.shape[0] for b, _ in tiler.batches(out, pad=False)] == [4, 4, 1]


def test_from_config():
    for name, tpt in (('bluelm-v-3b', 196), ('tiny-test', 16)):
        cfg = load_config(name)
        tiler = dr.DynamicResolution.from_config(cfg)
        assert tiler.tokens_per_tile == tpt and tiler.tile_size == cfg.vision.image_size
        assert (2, 4) in tiler.candidates and tiler.alpha == 0.1 and tiler.rule == 'relaxed'
        assert tiler.num_tokens((2, 4)) == 9 * tpt


def test_candidate_grids():
    assert dr.candidate_grids(1) == [(1, 1)]
    c8 = dr.candidate_grids(8)
    assert all(m * n <= 8 for m, n in c8) and (1, 8) in c8 and (3, 3) not in c8
    assert len(dr.candidate_grids(16)) == 50
    assert dr.candidate_grids(grids=[[2, 4], [1, 1], [2, 4]]) == [(1, 1), (2, 4)]
    with pytest.raises(ValueError):
        dr.candidate_grids(grids=[(0, 1)])
