"""BlueLM-V PyTorch modules: token downsampler layout, persistence, ONNX exportability."""

import json
import os
import warnings

import numpy as np
import pytest

torch = pytest.importorskip('torch')
pytest.importorskip('safetensors')

from bluelm_ros.runtime.vlm.config import BlueLMVConfig  # noqa: E402
from bluelm_ros.tools.vlm.configs import CONFIG_DIR, load_config  # noqa: E402
from bluelm_ros.tools.vlm.modeling import (BlueLMV, build_attention_mask,  # noqa: E402
                                           TokenDownsampler)


def tiny_dict():
    with open(os.path.join(CONFIG_DIR, 'tiny-test.json')) as f:
        return json.load(f)


def test_vila_downsampler_layout():
    d = tiny_dict()
    d.update(downsampler_norm=False, downsampler_dim=0)  # bare merge, no weights
    cfg = BlueLMVConfig.from_dict(d)
    g, c = cfg.vision.grid, cfg.vision.hidden_size
    assert g == 7 and cfg.tokens_per_tile == 16  # 7x7 -> padded 8x8 -> 4x4
    ds = TokenDownsampler(cfg)
    # token (r, col) carries the value 100*r + col + 1 in every channel
    x = torch.tensor([[100.0 * r + col + 1 for r in range(g) for col in range(g)]])
    x = x[..., None].expand(1, g * g, c)
    y = ds(x)
    assert y.shape == (1, 16, 4 * c)
    for i in range(4):
        for j in range(4):
            tok = y[0, 4 * i + j]  # output tokens are row-major
            for k, (di, dj) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
                r, col = 2 * i + di, 2 * j + dj
                expect = 100.0 * r + col + 1 if r < g and col < g else 0.0  # pad bottom/right
                assert torch.all(tok[k * c:(k + 1) * c] == expect), (i, j, k)


def test_causal_mask_offsets():
    m = build_attention_mask(None, 2, 3, torch.device('cpu'))[0, 0]
    assert m.tolist() == [[True, True, True, True, False], [True] * 5]
    pad = torch.tensor([[0, 1, 1, 1, 1]])
    m = build_attention_mask(pad, 2, 3, torch.device('cpu'))[0, 0]
    assert m[:, 0].tolist() == [False, False]


def test_save_load_round_trip_and_errors(tmp_path):
    torch.manual_seed(0)
    model = BlueLMV(load_config('tiny-test')).eval()
    model.save_pretrained(str(tmp_path))
    again = BlueLMV.from_pretrained(str(tmp_path))
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    from safetensors.torch import load_file, save_file
    path = str(tmp_path / 'model.safetensors')
    state = load_file(path)
    state['projector.linear_1.weight'] = state['projector.linear_1.weight'][:, :-1].clone()
    save_file(state, path)
    with pytest.raises(ValueError, match=r'model\.safetensors.*projector\.linear_1\.weight'):
        BlueLMV.from_pretrained(str(tmp_path))
    del state['projector.linear_1.weight']
    save_file(state, path)
    with pytest.raises(KeyError, match='missing tensor'):
        BlueLMV.from_pretrained(str(tmp_path))


def test_vision_onnx_export_fixed_batch(tmp_path):
    pytest.importorskip('onnx')
    ort = pytest.importorskip('onnxruntime')
    torch.manual_seed(0)
    model = BlueLMV(load_config('tiny-test')).eval()

    class Tiles(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, px):
            return self.m.encode_tiles(px)

    s = model.config.vision.image_size
    px = torch.randn(4, 3, s, s)  # the paper's static batch of 4 tiles
    path = str(tmp_path / 'vision.onnx')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        torch.onnx.export(Tiles(model).eval(), (px,), path, input_names=['pixel_values'],
                          output_names=['image_embeds'], opset_version=17, dynamo=False)
    got = ort.InferenceSession(path, providers=['CPUExecutionProvider']).run(
        None, {'pixel_values': px.numpy()})[0]
    with torch.no_grad():
        ref = model.encode_tiles(px)
    assert got.shape == (4, model.config.tokens_per_tile, model.config.text.hidden_size)
    assert np.abs(got - ref.numpy()).max() < 1e-4


def test_full_config_builds_on_meta_device():
    # the 3B model's module tree matches the analytic count without allocating memory
    from bluelm_ros.tools.vlm.configs import count_parameters
    cfg = load_config('bluelm-v-3b')
    with torch.device('meta'):
        model = BlueLMV(cfg)
    assert sum(p.numel() for p in model.parameters()) == count_parameters(cfg)['total']
