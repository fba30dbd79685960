"""Pillow's resize reproduced in numpy (runtime/vlm/pil_resample.py), compared byte for byte."""

import numpy as np
import pytest

PIL = pytest.importorskip('PIL')
from PIL import Image  # noqa: E402

from bluelm_ros.runtime.vlm import pil_resample  # noqa: E402

PILLOW_13 = int(PIL.__version__.split('.')[0]) >= 13


def pillow_resize(image, width, height, resample):
    return np.asarray(Image.fromarray(image).resize((width, height), resample=resample))


def ours(image, width, height, resample):
    return pil_resample.resize(image, width, height, resample, pillow_13_order=PILLOW_13)


@pytest.fixture(scope='module')
def photos():
    pytest.importorskip('skimage')
    from hf_vlm_fixtures import photos
    return photos()


@pytest.mark.parametrize('resample', sorted(pil_resample.FILTER_NAMES),
                         ids=[pil_resample.FILTER_NAMES[k] for k in
                              sorted(pil_resample.FILTER_NAMES)])
def test_identical_to_pillow_on_photos(photos, resample):
    for name, img in photos.items():
        h, w = img.shape[:2]
        # up, down, mixed, stretch to a square tile, one axis only, tiny
        for ow, oh in [(w * 3 // 2 + 1, h * 2 - 3), (w // 3, h // 5 + 1), (w // 2, h + 7),
                       (384, 384), (w, h // 2), (w // 2 + 3, h), (5, 3)]:
            ref = pillow_resize(img, ow, oh, resample)
            got = ours(img, ow, oh, resample)
            assert got.shape == ref.shape and got.dtype == np.uint8
            assert np.array_equal(got, ref), (name, resample, (ow, oh),
                                              int(np.abs(got.astype(int) - ref).max()))


def test_identical_to_pillow_on_random_sizes():
    rng = np.random.default_rng(7)
    for _ in range(60):
        h, w = (int(x) for x in rng.integers(2, 120, 2))
        oh, ow = (int(x) for x in rng.integers(1, 160, 2))
        resample = int(rng.integers(0, 6))
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        assert np.array_equal(ours(img, ow, oh, resample),
                              pillow_resize(img, ow, oh, resample)), (h, w, oh, ow, resample)


def test_pass_order_rule_and_its_effect(photos):
    """Pillow 13 runs the vertical pass first when the height loses > 2x the width's pixels.

    The order moves a few pixels by a few grey levels: reproducing the installed Pillow
    needs the right order, and pillow_13_order=False is Pillow <= 12.
    """
    rule = pil_resample.vertical_pass_first
    assert rule(400, 600, 384, 384)           # 216 rows lost > 2 * 16 columns
    assert not rule(600, 400, 384, 384)
    assert not rule(100, 150, 80, 110)        # 40 rows == 2 * 20 columns: horizontal first
    assert not rule(100, 150, 200, 160)       # the height grows
    assert not rule(400, 600, 384, 384, pillow_13_order=False)
    portrait = photos['portrait']  # 400 x 600 -> 384 x 384 (SigLIP's stretch)
    new = pil_resample.resize(portrait, 384, 384, pil_resample.BICUBIC)
    old = pil_resample.resize(portrait, 384, 384, pil_resample.BICUBIC, pillow_13_order=False)
    diff = np.abs(new.astype(int) - old)
    print(f'pass order: {np.mean(diff > 0) * 100:.2f}% of values differ, max {diff.max()} levels')
    assert 0 < diff.max() <= 16
    assert np.array_equal(new if PILLOW_13 else old,
                          pillow_resize(portrait, 384, 384, pil_resample.BICUBIC))


def test_same_size_is_a_copy_and_bad_input_is_refused():
    img = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    out = pil_resample.resize(img, 3, 2)
    assert np.array_equal(out, img) and out is not img
    with pytest.raises(ValueError, match='uint8'):
        pil_resample.resize(img.astype(np.float32), 4, 4)
    with pytest.raises(ValueError, match='filter'):
        pil_resample.resize(img, 4, 4, resample=9)
    with pytest.raises(ValueError, match='positive'):
        pil_resample.resize(img, 0, 4)
