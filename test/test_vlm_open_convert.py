"""Converter pieces for open checkpoints: assets, tokenizer, chat template, tie, RoPE, paths."""

import json
import os
import sys

import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
pytest.importorskip('jinja2')
from safetensors.torch import load_file, save_file  # noqa: E402

from bluelm_ros.runtime.vlm.chat_template import (ChatTemplate,  # noqa: E402
                                                  ChatTemplateError, chat_messages)
from bluelm_ros.runtime.vlm.config import BlueLMVConfig, TextConfig  # noqa: E402
from bluelm_ros.tools.vlm.configs import load_config  # noqa: E402
from bluelm_ros.tools.vlm.convert import ConversionError, convert, hf_checkpoint  # noqa: E402
from bluelm_ros.tools.vlm.convert.llava import config as llava_config  # noqa: E402
from bluelm_ros.tools.vlm.modeling import BlueLMV, rope_inv_freq  # noqa: E402
import hf_vlm_fixtures as fixtures  # noqa: E402

# exercises tojson, namespace, loop controls and transformers' {% generation %} tag
FANCY_TEMPLATE = (
    "{% set ns = namespace(n=0) %}{% for m in messages %}{% if m['role'] == 'system' %}"
    "{% continue %}{% endif %}{% set ns.n = ns.n + 1 %}<|{{ m['role'] }}|>"
    "{% generation %}{{ m['content'] | tojson }}{% endgeneration %}\n{% endfor %}"
    "{{ bos_token }}#{{ ns.n }}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _hf_render(template, messages, **variables):
    from transformers.utils.chat_template_utils import render_jinja_template
    rendered, _ = render_jinja_template(conversations=[messages], chat_template=template,
                                        add_generation_prompt=True, **variables)
    return rendered[0]


@pytest.mark.parametrize('template', [fixtures.SMOLVLM_TEMPLATE, fixtures.IDEFICS3_TEMPLATE,
                                      fixtures.LLAVA_TEMPLATE, FANCY_TEMPLATE],
                         ids=['smolvlm', 'idefics3', 'llava', 'fancy'])
def test_chat_template_renders_like_transformers(template):
    variables = {'bos_token': '<s>', 'eos_token': '</s>'}
    ours = ChatTemplate(template, variables)
    for with_image in (True, False):
        for system in (None, 'you are a robot. "quote" <b>'):
            msgs = chat_messages('is there a "cat"? <tag> ünï', with_image, system)
            assert ours.render(msgs) == _hf_render(template, msgs, **variables)


def test_chat_template_errors_are_clear(monkeypatch):
    with pytest.raises(ChatTemplateError, match='cannot compile'):
        ChatTemplate('{% for %}')
    bad = ChatTemplate("{{ raise_exception('only user and assistant roles') }}")
    with pytest.raises(ChatTemplateError, match='only user and assistant roles'):
        bad.render(chat_messages('q', True))
    # the sandbox holds: no attribute escapes
    with pytest.raises(ChatTemplateError, match='cannot render'):
        ChatTemplate("{{ messages.__class__.__mro__ }}").render([])
    monkeypatch.setitem(sys.modules, 'jinja2', None)
    with pytest.raises(ChatTemplateError, match='pip install jinja2'):
        ChatTemplate('{{ 1 }}')


def test_tokenizer_is_the_one_transformers_runs(tmp_path):
    """v5's LlamaTokenizer rebuilds the pre-tokenizer: the raw tokenizer.json encodes
    differently (a stray '▁' after special tokens); the written backend does not."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    src = tmp_path / 'tok'
    tok = PreTrainedTokenizerFast(tokenizer_object=fixtures._metaspace_bpe(), bos_token='<s>',
                                  eos_token='</s>', unk_token='<unk>',
                                  additional_special_tokens=['<image>'])
    tok.save_pretrained(str(src))
    fixtures._set_tokenizer_class(str(src), 'LlamaTokenizer', legacy=False,
                                  add_bos_token=True)
    hf = AutoTokenizer.from_pretrained(str(src))
    assert type(hf).__name__ == 'LlamaTokenizer'
    out = str(tmp_path / 'tokenizer.json')
    export = hf_checkpoint.write_tokenizer(str(src), out)
    assert export.source.startswith('transformers')
    assert export.template_vars['bos_token'] == '<s>'
    text = 'USER: <image>\nwhat is in the image? ASSISTANT:'
    want = hf(text).input_ids
    assert Tokenizer.from_file(out).encode(text).ids == want
    assert Tokenizer.from_file(str(src / 'tokenizer.json')).encode(text).ids != want


def test_tokenizer_without_transformers_is_copied(tmp_path, monkeypatch, caplog):
    ck = fixtures.build('llava_siglip', str(tmp_path / 'hf'))
    monkeypatch.setitem(sys.modules, 'transformers', None)
    export = hf_checkpoint.write_tokenizer(ck.path, str(tmp_path / 'tokenizer.json'))
    assert export.source == 'tokenizer.json (copied)'
    assert export.template_vars['bos_token'] == '<s>'
    assert 'transformers not installed' in caplog.text


def test_converted_configs_record_processor_template_and_stops(tmp_path):
    for family in fixtures.FAMILIES:
        ck = fixtures.build(family, str(tmp_path / family))
        name = 'llava' if family.startswith('llava') else 'idefics3'
        cfg = convert(name, ck.path, str(tmp_path / f'{family}_out'))
        tok = ck.processor.tokenizer
        proc = cfg.image.processor
        assert proc['type'] == ('idefics3' if family in ('smolvlm', 'idefics3') else 'single')
        assert cfg.prompt.chat_template == ck.processor.chat_template
        assert cfg.prompt.template_vars['bos_token'] == tok.bos_token
        assert cfg.eos_token_ids == ck.model.generation_config.eos_token_id
        if family in ('smolvlm', 'idefics3'):
            assert cfg.eos_token_ids == [tok.convert_tokens_to_ids('<end_of_utterance>')]
            assert proc['image_seq_len'] == cfg.tokens_per_tile
        v = cfg.vision
        clip = family == 'llava_clip'
        assert (v.class_token, v.pre_layernorm, v.patch_bias) == (clip, clip, not clip)
        assert (v.hidden_act == 'quick_gelu') == clip
        llama3 = family in ('idefics3', 'llava_siglip')
        assert (cfg.text.rope_scaling or {}).get('rope_type') == ('llama3' if llama3 else None)
        # the written config reads back identically (strict loader, new fields included)
        again = BlueLMVConfig.from_json(str(tmp_path / f'{family}_out' / 'config.json'))
        assert again == cfg


def test_configs_written_before_the_new_fields_still_load():
    cfg = load_config('tiny-test')  # a file without processor / chat_template / rope_scaling
    assert cfg.image.processor is None and cfg.prompt.chat_template is None
    assert cfg.text.rope_scaling is None and not cfg.vision.class_token


def test_llama3_rope_matches_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    scaling = dict(rope_type='llama3', factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192)
    hf_cfg = LlamaConfig(hidden_size=4096, num_attention_heads=32,
                         rope_parameters=dict(rope_theta=500000.0, **scaling))
    ref, _ = ROPE_INIT_FUNCTIONS['llama3'](hf_cfg, 'cpu')
    ours = rope_inv_freq(TextConfig(head_dim=128, rope_theta=500000.0, rope_scaling=scaling))
    assert torch.equal(ours, ref)
    plain = rope_inv_freq(TextConfig(head_dim=128, rope_theta=500000.0))
    assert not torch.equal(ours, plain) and torch.equal(ours[:8], plain[:8])


def _edit_json(path, **changes):
    with open(path) as f:
        data = json.load(f)
    for dotted, value in changes.items():
        node = data
        *parents, last = dotted.split('.')
        for k in parents:
            node = node[k]
        node[last] = value
    with open(path, 'w') as f:
        json.dump(data, f)


def test_refusals_name_the_problem(tmp_path):
    ck = fixtures.build('llava_clip', str(tmp_path / 'hf'))
    cfg_path = os.path.join(ck.path, 'config.json')
    good = open(cfg_path).read()
    _edit_json(cfg_path, **{'text_config.rope_parameters': {'rope_type': 'yarn', 'factor': 4.0,
                                                            'rope_theta': 10000.0}})
    with pytest.raises(ConversionError, match='rope_type.*yarn'):
        llava_config(ck.path)
    open(cfg_path, 'w').write(good)
    proc_path = os.path.join(ck.path, 'processor_config.json')
    _edit_json(proc_path, num_additional_image_tokens=0)  # forgets the CLS token
    with pytest.raises(ConversionError, match='15 image tokens.*emits 16'):
        llava_config(ck.path)


def test_tie_is_decided_by_the_weights(tmp_path):
    ck = fixtures.build('llava_siglip', str(tmp_path / 'hf'))
    wpath = os.path.join(ck.path, 'model.safetensors')
    state = load_file(wpath)
    embed_key = next(k for k in state if k.endswith('embed_tokens.weight'))
    head_key = next(k for k in state if k.endswith('lm_head.weight'))
    # an identical head is tied (one copy, same logits)
    state[head_key] = state[embed_key].clone()
    save_file(state, wpath)
    assert convert('llava', ck.path, str(tmp_path / 'a')).text.tie_word_embeddings
    # no head and config says untied: transformers would draw a random head -> refuse
    del state[head_key]
    save_file(state, wpath)
    with pytest.raises(ConversionError, match='no lm_head.weight'):
        convert('llava', ck.path, str(tmp_path / 'b'))
    # no head and the flag set (here only in text_config): tied
    _edit_json(os.path.join(ck.path, 'config.json'), **{'text_config.tie_word_embeddings': True})
    cfg = convert('llava', ck.path, str(tmp_path / 'c'))
    assert cfg.text.tie_word_embeddings
    assert 'language_model.lm_head.weight' not in BlueLMV.from_pretrained(
        str(tmp_path / 'c')).state_dict()


def test_paths_with_glob_characters(tmp_path):
    ck = fixtures.build('llava_clip', str(tmp_path / 'llava [v1.5] *final*'))
    cfg = convert('llava', ck.path, str(tmp_path / 'out'))
    assert cfg.vision.class_token
