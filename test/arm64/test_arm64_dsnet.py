"""DSNet runtime (Segmenter) on aarch64 ONNX Runtime vs the x86 reference masks.

FP32: the argmax mask must match x86 pixel for pixel (float reassociation in other SIMD
kernels may flip a pixel whose two best classes are tied to the last bits: then >= 0.9999
is accepted and the flips and their x86 logit margins are reported). The camera-sized scene
also goes through cv2.resize, whose aarch64 build rounds some pixels one step differently,
so the model is also compared on the x86 input tensor alone. INT8: ARM runs other integer
kernels (dotprod/i8mm instead of AVX-512 VNNI), so agreement is reported, with a floor.
"""
import os
import time

import numpy as np
import pytest

REF_DIR = os.environ.get('BLUELM_ARM64_REF', '')
THREADS = int(os.environ.get('BLUELM_ARM64_THREADS', '2'))
FP32_MIN_AGREEMENT = 0.9999
INT8_MIN_AGREEMENT = 0.99
LOGITS_MAX_ABS_DIFF = 1e-3
# One uint8 step after normalization: 1 / 255 / the smallest ImageNet std.
ONE_LSB = 1.0 / 255.0 / 0.224


def _model_dir():
    # Inside the root the package is on PYTHONPATH, not next to this file.
    import bluelm_ros
    return os.path.join(os.path.dirname(bluelm_ros.__file__), 'models', 'dsnet')


@pytest.fixture(scope='module')
def ref(reference):
    data = np.load(os.path.join(REF_DIR, 'dsnet.npz'))
    scenes = reference['dsnet']['scenes']
    return {'data': data, 'scenes': scenes, 'meta': reference['dsnet']}


@pytest.fixture(scope='module')
def segmenters(reference):
    from bluelm_ros.runtime.segmenter import Segmenter
    names = reference['dsnet']['models']
    return {prec: Segmenter(os.path.join(_model_dir(), name), threads=THREADS)
            for prec, name in names.items()}


@pytest.fixture(scope='module')
def arm_masks(ref, segmenters):
    """masks(prec) -> ([mask per scene], [ms per scene]), each model run once per scene.

    Lazy, so `-k int8` never pays for the FP32 runs (about a minute each under emulation).
    """
    done = {}

    def masks(prec):
        if prec not in done:
            out, ms = [], []
            for i in range(len(ref['scenes'])):
                t0 = time.perf_counter()
                out.append(segmenters[prec].segment(ref['data'][f'image_{i}']).mask)
                ms.append(round((time.perf_counter() - t0) * 1e3))
            done[prec] = out, ms
        return done[prec]
    return masks


def _agreement(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, a.dtype, b.shape, b.dtype)
    return float((a == b).mean())


def test_models_load_with_metadata(segmenters):
    for prec, seg in segmenters.items():
        assert seg.variant == 'dsnet_tiny' and seg.num_classes == 19
        assert seg.input_size == (480, 640)
        assert seg.precision == prec
        assert seg.providers == ['CPUExecutionProvider']


def _resized_scenes(ref):
    keys = [k for k in ref['data'].files if k.startswith('input_')]
    assert keys, 'reference has no resized scene'
    return [int(k.split('_')[1]) for k in keys]


def test_preprocessing_on_resize_path(ref, segmenters, report):
    """cv2 resize + normalization of a camera-sized frame: at most one uint8 step off x86."""
    from bluelm_ros.runtime.image import to_rgb_uint8
    from bluelm_ros.runtime.segmenter import normalize
    for i in _resized_scenes(ref):
        x = normalize(to_rgb_uint8(ref['data'][f'image_{i}']), segmenters['fp32'].input_size)
        diff = np.abs(x - ref['data'][f'input_{i}'])
        report[f'dsnet_preprocess_scene{ref["scenes"][i][0]}'] = {
            'resize': '{2}x{1} -> 640x480 cv2.INTER_LINEAR'.format(*ref['scenes'][i]),
            'input_values_differing': f'{float((diff > 0).mean()):.6f}',
            'max_diff_uint8_steps': round(float(diff.max()) / ONE_LSB, 3),
        }
        assert float(diff.max()) <= ONE_LSB * 1.01, f'scene {i}: input differs by {diff.max()}'


def test_fp32_mask_matches_x86(ref, arm_masks, report):
    masks, ms = arm_masks('fp32')
    rows, worst = [], 1.0
    for i, (seed, h, w) in enumerate(ref['scenes']):
        want = ref['data'][f'mask_fp32_{i}']
        got = masks[i]
        agree = _agreement(got, want)
        flips = got != want
        margin = ref['data'][f'margin_fp32_{i}'][flips]
        path = '' if (h, w) == (480, 640) else ', input through cv2.resize'
        rows.append(f'scene {seed} {w}x{h}{path}: agreement {agree:.6f} '
                    f'({int(flips.sum())} px differ'
                    + (f', x86 top-2 margin there <= {float(margin.max()):.2e}' if flips.any()
                       else '') + ')')
        worst = min(worst, agree)
    total = sum(int((masks[i] != ref['data'][f'mask_fp32_{i}']).sum())
                for i in range(len(ref['scenes'])))
    pixels = sum(h * w for _, h, w in ref['scenes'])
    report['dsnet_fp32'] = {
        'scenes': rows,
        'pixels_compared': pixels,
        'pixels_differing': total,
        'identical': total == 0,
        'arm_ms_per_scene_emulated': ms,
        'x86_ms_per_scene': ref['meta']['ms']['fp32'],
    }
    assert worst >= FP32_MIN_AGREEMENT, rows


def test_fp32_model_on_x86_input(ref, segmenters, report):
    """The model alone, fed the x86 input tensor: same mask, logits within reassociation."""
    seg = segmenters['fp32']
    i = _resized_scenes(ref)[0]
    t0 = time.perf_counter()
    logits, mask = seg.session.run(['logits', 'mask'], {seg.input_name: ref['data'][f'input_{i}']})
    ms = round((time.perf_counter() - t0) * 1e3)
    want = ref['data'][f'logits_fp32_{i}']
    diff = np.abs(logits[0] - want)
    want_mask = want.argmax(0)
    report['dsnet_fp32_model_only'] = {
        'input': f'x86 tensor of scene {ref["scenes"][i][0]}',
        'mask_agreement': float((mask[0] == want_mask).mean()),
        'logits_max_abs_diff': float(diff.max()),
        'logits_mean_abs_diff': float(diff.mean()),
        'logit_range': [round(float(want.min()), 3), round(float(want.max()), 3)],
        'logits_bit_identical_share': round(float((logits[0] == want).mean()), 4),
        'arm_ms_emulated': ms,
    }
    assert float(diff.max()) <= LOGITS_MAX_ABS_DIFF
    assert float((mask[0] == want_mask).mean()) >= FP32_MIN_AGREEMENT


def test_int8_agreement_reported(ref, arm_masks, report):
    masks, ms = arm_masks('int8')
    n = len(ref['scenes'])
    vs_x86_int8 = [_agreement(masks[i], ref['data'][f'mask_int8_{i}']) for i in range(n)]
    vs_x86_fp32 = [_agreement(masks[i], ref['data'][f'mask_fp32_{i}']) for i in range(n)]
    report['dsnet_int8'] = {
        'arm_int8_vs_x86_int8': [round(a, 6) for a in vs_x86_int8],
        'arm_int8_vs_x86_fp32': [round(a, 6) for a in vs_x86_fp32],
        'x86_int8_vs_x86_fp32': [round(a, 6) for a in ref['meta']['x86_int8_vs_fp32_agreement']],
        'arm_ms_per_scene_emulated': ms,
        'x86_ms_per_scene': ref['meta']['ms']['int8'],
    }
    assert min(vs_x86_int8) >= INT8_MIN_AGREEMENT, vs_x86_int8
