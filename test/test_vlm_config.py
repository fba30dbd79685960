"""Model configs: strict loading, validation, parameter counts."""

import copy
import json
import os

import pytest

from bluelm_ros.runtime.vlm.config import BlueLMVConfig, ConfigError
from bluelm_ros.tools.vlm.configs import (CONFIG_DIR, count_parameters, format_parameter_counts,
                                          load_config, main)

NAMES = ('bluelm-v-3b', 'tiny-test')


def raw(name):
    with open(os.path.join(CONFIG_DIR, name + '.json')) as f:
        return json.load(f)


@pytest.mark.parametrize('name', NAMES)
def test_shipped_configs_load_and_round_trip(name, tmp_path):
    cfg = load_config(name)
    assert cfg.name == name
    assert BlueLMVConfig.from_dict(cfg.to_dict()) == cfg
    path = str(tmp_path / 'c.json')
    cfg.to_json(path, notes='round trip')
    assert BlueLMVConfig.from_json(path) == cfg
    assert '_notes' in raw(name)  # documents what is paper vs assumed


def test_bluelm_v_3b_matches_paper():
    cfg = load_config('bluelm-v-3b')
    v, t = cfg.vision, cfg.text
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size,
            v.image_size, v.patch_size, v.hidden_act) == (1152, 27, 16, 4304, 384, 14,
                                                          'gelu_tanh')
    assert v.grid == 27 and cfg.tokens_per_tile == 196 and not v.post_layernorm
    assert (t.vocab_size, t.rope_theta) == (100096, 10000.0)
    assert cfg.image.alpha == 0.1 and cfg.image.tile_batch_size == 4
    n = count_parameters(cfg)
    print('\n' + format_parameter_counts(cfg))
    # paper: ~400M vision encoder, 2.7B LLM; within a few percent
    assert abs(n['vision'] / 400e6 - 1) < 0.05
    assert abs((n['vision'] + n['downsampler'] + n['projector']) / 400e6 - 1) < 0.08
    assert abs(n['llm'] / 2.7e9 - 1) < 0.03
    assert abs(n['total'] / 3.1e9 - 1) < 0.05


@pytest.mark.parametrize('path,value,match', [
    (('vision', 'hidden_sizee'), 3, r'vision\.hidden_sizee: unknown key'),
    (('extra',), 1, 'extra: unknown key'),
    (('text', 'vocab_size'), '100', r'text\.vocab_size: bad value'),
    (('image', 'alpha'), None, r'image\.alpha: bad value'),
    (('text', 'tie_word_embeddings'), 1, r'text\.tie_word_embeddings: bad value'),
    (('eos_token_ids',), ['2'], 'eos_token_ids: bad element'),
    (('vision', 'feature_layer'), [], r'vision\.feature_layer: bad value'),
])
def test_bad_keys_are_named(tmp_path, path, value, match):
    data = raw('tiny-test')
    node = data
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    p = tmp_path / 'bad.json'
    p.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=match) as e:
        BlueLMVConfig.from_json(str(p))
    assert str(p) in str(e.value)


@pytest.mark.parametrize('path', [('image_token_id',), ('vision', 'patch_size'),
                                  ('prompt',), ('image', 'grids')])
def test_missing_keys_are_named(tmp_path, path):
    data = raw('tiny-test')
    node = data
    for k in path[:-1]:
        node = node[k]
    del node[path[-1]]
    p = tmp_path / 'missing.json'
    p.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=f'{p}: {".".join(path)}: missing key'):
        BlueLMVConfig.from_json(str(p))


@pytest.mark.parametrize('edit,match', [
    (lambda d: d['image'].update(tile_size=448), 'image.tile_size'),
    (lambda d: d['text'].update(num_key_value_heads=3), 'text.num_key_value_heads'),
    (lambda d: d['vision'].update(feature_select_strategy='default'),
     'vision.feature_select_strategy'),
    (lambda d: d['vision'].update(feature_layer=5), 'vision.feature_layer'),
    (lambda d: d.update(downsampler='avgpool'), 'downsampler'),
    (lambda d: d.update(downsampler='pixel_shuffle', downsample_factor=2), 'downsample_factor'),
    (lambda d: d.update(image_token_id=512), 'image_token_id'),
    (lambda d: d['image'].update(rule='biggest'), 'image.rule'),
    (lambda d: d['image'].update(grids=[[2, 0]]), 'image.grids'),
    (lambda d: d['prompt'].update(template='{question}'), 'prompt.template'),
])
def test_inconsistent_values_rejected(edit, match):
    data = raw('tiny-test')
    edit(data)
    with pytest.raises(ConfigError, match=match):
        BlueLMVConfig.from_dict(data, source='x.json')


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match='not found'):
        load_config(str(tmp_path / 'none.json'))
    p = tmp_path / 'broken.json'
    p.write_text('{"name": ')
    with pytest.raises(ConfigError, match='broken.json: invalid JSON'):
        BlueLMVConfig.from_json(str(p))


def test_cli_prints_counts(capsys):
    assert main(['tiny-test']) == 0
    out = capsys.readouterr().out
    assert 'tiny-test' in out and 'total' in out


def _variants():
    base = raw('tiny-test')
    out = {'tiny-test': base}
    v = copy.deepcopy(base)
    v['text'].update(tie_word_embeddings=False, attention_bias=True, mlp_bias=True)
    v.update(downsampler_norm=False, downsampler_dim=0, projector='linear',
             projector_bias=False)
    out['untied-bias-no-linear'] = v
    v = copy.deepcopy(base)
    v['vision'].update(feature_layer=[-2, -1])
    v.update(downsampler='none', downsample_factor=1)
    out['no-downsampler-two-layers'] = v
    v = copy.deepcopy(base)
    v['vision'].update(patch_size=48, post_layernorm=True)  # 8x8 grid
    v.update(downsampler='pixel_shuffle', downsample_factor=4)
    out['pixel-shuffle'] = v
    v = copy.deepcopy(base)
    v['vision'].update(feature_layer=1, feature_select_strategy='default')
    v.update(downsampler='none')
    out['layer1-default'] = v
    return out


@pytest.mark.parametrize('name', sorted(_variants()))
def test_count_matches_torch_module(name):
    torch = pytest.importorskip('torch')
    from bluelm_ros.tools.vlm.modeling import BlueLMV
    cfg = BlueLMVConfig.from_dict(_variants()[name], source=name)
    model = BlueLMV(cfg)
    n = count_parameters(cfg)
    assert n['total'] == sum(p.numel() for p in model.parameters())
    assert n['vision'] == sum(p.numel() for p in model.vision_tower.parameters())
    assert n['llm'] == sum(p.numel() for p in model.language_model.parameters())
    # the module honours the derived token count
    px = torch.zeros(2, 3, cfg.vision.image_size, cfg.vision.image_size)
    with torch.no_grad():
        emb = model.encode_images(px)
    assert emb.shape == (2 * cfg.tokens_per_tile, cfg.text.hidden_size)
