"""Per-family image preprocessing (runtime/vlm/processors.py) against transformers' own.

Each case is a ``preprocessor_config.json`` as found on the Hub, loaded by transformers'
``AutoImageProcessor`` (its Pillow backend: torchvision is not installed here) and translated
by our converter; both process real photos (scikit-image) and the ``pixel_values`` must
match within 1e-5 (they are bit-identical: the resize is Pillow's own algorithm, the
arithmetic transformers' float64 rescale then float32 normalise).
"""

import json
import time

import numpy as np
import pytest

pytest.importorskip('transformers')
pytest.importorskip('skimage')
from PIL import Image  # noqa: E402

from bluelm_ros.runtime.vlm import processors  # noqa: E402
from hf_vlm_fixtures import photos  # noqa: E402

OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]
# name -> (preprocessor_config.json, vision tile size, image tokens per tile)
CASES = {
    # SmolVLM-256M/500M-Instruct
    'smolvlm_2048_512': ({'image_processor_type': 'Idefics3ImageProcessor', 'do_convert_rgb': True,
                          'do_image_splitting': True, 'do_normalize': True, 'do_pad': True,
                          'do_rescale': True, 'do_resize': True, 'image_mean': [0.5] * 3,
                          'image_std': [0.5] * 3, 'max_image_size': {'longest_edge': 512},
                          'resample': 1, 'rescale_factor': 0.00392156862745098,
                          'size': {'longest_edge': 2048}}, 512, 64),
    # Idefics3-8B: only the type given, everything else from the class defaults
    'idefics3_defaults': ({'image_processor_type': 'Idefics3ImageProcessor'}, 364, 169),
    'idefics3_no_split': ({'image_processor_type': 'Idefics3ImageProcessor',
                           'do_image_splitting': False, 'size': {'longest_edge': 364}},
                          364, 169),
    # LLaVA with SigLIP-so400m: stretch to 384x384, bicubic
    'siglip_384': ({'image_processor_type': 'SiglipImageProcessor',
                    'size': {'height': 384, 'width': 384}, 'resample': 3,
                    'image_mean': [0.5] * 3, 'image_std': [0.5] * 3}, 384, 729),
    # LLaVA-1.5 (CLIP ViT-L/14-336): shortest edge 336, centre crop; old int sizes
    'clip_336_int_sizes': ({'image_processor_type': 'CLIPImageProcessor', 'size': 336,
                            'crop_size': 336, 'do_center_crop': True, 'resample': 3,
                            'image_mean': OPENAI_MEAN, 'image_std': OPENAI_STD}, 336, 576),
    # LlavaImageProcessor with do_pad: pad to a square of the mean colour first
    'llava_pad_square': ({'image_processor_type': 'LlavaImageProcessor', 'do_pad': True,
                          'size': {'shortest_edge': 336},
                          'crop_size': {'height': 336, 'width': 336}}, 336, 576),
    # crop larger than the resized image: transformers zero-pads around it
    'clip_crop_pads': ({'image_processor_type': 'CLIPImageProcessorFast',
                        'size': {'shortest_edge': 300}, 'crop_size': 336}, 336, 576),
}


def _hf_processor(tmp_path, pre: dict):
    from transformers import AutoImageProcessor
    (tmp_path / 'preprocessor_config.json').write_text(json.dumps(pre))
    return AutoImageProcessor.from_pretrained(str(tmp_path))


def _ours(pre: dict, tile: int, tokens: int):
    data = processors.from_hf_preprocessor(pre, tile_size=tile, tokens_per_tile=tokens,
                                           image_seq_len=tokens)
    cfg = processors.processor_config_from_dict(json.loads(json.dumps(data)))  # as in a file
    cls = (processors.Idefics3Processor if cfg.type == 'idefics3'
           else processors.SingleTileProcessor)
    return cls(cfg, tile)


@pytest.mark.parametrize('case', sorted(CASES))
def test_pixel_values_match_transformers_on_photos(tmp_path, case):
    pre, tile, tokens = CASES[case]
    hf = _hf_processor(tmp_path, pre)
    assert type(hf).__name__.endswith('Pil')  # the Pillow backend is the reference
    ours = _ours(pre, tile, tokens)
    split = isinstance(ours, processors.Idefics3Processor)
    for name, img in photos().items():
        kw = {'return_row_col_info': True} if split else {}
        ref = hf(images=[Image.fromarray(img)], return_tensors='np', **kw)
        ref_pv = np.asarray(ref['pixel_values']).reshape(-1, 3, tile, tile)
        t0 = time.perf_counter()
        got = ours(img)
        ms = (time.perf_counter() - t0) * 1e3
        assert got.tiles.shape == ref_pv.shape, (name, got.tiles.shape, ref_pv.shape)
        assert got.tiles.dtype == np.float32
        diff = float(np.abs(got.tiles - ref_pv).max())
        print(f'{case:20s} {name:13s} {img.shape[1]}x{img.shape[0]}: {got.num_tiles:2d} '
              f'tiles, max |pixel_values diff| {diff:.1e}, {ms:.0f} ms')
        assert diff <= 1e-5, (case, name, diff)
        if split:
            rows, cols = ref['rows'][0][0], ref['cols'][0][0]
            assert got.has_thumbnail == (rows > 0)
            assert got.grid == ((cols, rows) if rows else (1, 1))
            assert got.num_tokens == got.num_tiles * tokens
        else:
            assert got.num_tiles == 1 and got.num_tokens == tokens
    # bgr input (OpenCV/ROS frames) gives the same tiles
    img = photos()['chelsea']
    assert np.array_equal(ours(img[:, :, ::-1].copy(), bgr=True).tiles, ours(img).tiles)


def test_frame_640x480_gives_smolvlm_13_tiles_and_832_tokens():
    pre, tile, tokens = CASES['smolvlm_2048_512']
    ours = _ours(pre, tile, tokens)
    tiled = ours(np.zeros((480, 640, 3), np.uint8))
    assert tiled.grid == (4, 3) and tiled.has_thumbnail and tiled.num_tiles == 13
    assert tiled.num_tokens == 832
    text = ours.image_prompt(tiled.grid, tiled.has_thumbnail)
    image = '<image>' * 64
    rows = text.split('\n')
    # 3 rows of 4 crops, a blank line, then the global image
    assert len(rows) == 5 and rows[3] == ''
    assert rows[0] == ''.join(f'<fake_token_around_image><row_1_col_{c}>{image}'
                              for c in range(1, 5))
    assert rows[2].startswith('<fake_token_around_image><row_3_col_1>')
    assert rows[4] == f'<fake_token_around_image><global-img>{image}<fake_token_around_image>'
    assert text.count('<image>') == 832
    single = ours.image_prompt((1, 1), False)
    assert single == rows[4]


def test_translation_errors_name_the_key():
    with pytest.raises(processors.ProcessorConfigError, match='image_processor_type'):
        processors.from_hf_preprocessor({'image_processor_type': 'Qwen2VLImageProcessor'})
    with pytest.raises(processors.ProcessorConfigError, match='max_image_size.longest_edge 512'):
        processors.from_hf_preprocessor(CASES['smolvlm_2048_512'][0], tile_size=384,
                                        tokens_per_tile=64)
    with pytest.raises(processors.ProcessorConfigError, match='image_seq_len 81'):
        processors.from_hf_preprocessor(CASES['smolvlm_2048_512'][0], tile_size=512,
                                        tokens_per_tile=64, image_seq_len=81)
    with pytest.raises(processors.ProcessorConfigError, match='size'):
        processors.from_hf_preprocessor({'image_processor_type': 'SiglipImageProcessor',
                                         'size': {'max_height': 3}}, tokens_per_tile=9)
    good = processors.from_hf_preprocessor(CASES['siglip_384'][0], tokens_per_tile=729)
    with pytest.raises(processors.ProcessorConfigError, match='image.processor.extra'):
        processors.processor_config_from_dict(dict(good, extra=1), 'image.processor')
    with pytest.raises(processors.ProcessorConfigError, match='resample'):
        processors.processor_config_from_dict(dict(good, resample=7))
    # a processor whose output is not the tower's tile size fails loudly on the first frame
    proc = processors.SingleTileProcessor(processors.processor_config_from_dict(good), 224)
    with pytest.raises(ValueError, match='384x384 tile but the vision tower takes 224x224'):
        proc(np.zeros((10, 10, 3), np.uint8))
