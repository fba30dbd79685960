"""Parity of converted checkpoints against transformers (the oracle), plus KV-cache checks.

Tiny random-weight HF models are built from configs (no download), saved with
``save_pretrained``, converted with ``bluelm_ros.tools.vlm.convert`` and compared on an
image + text prompt: logits within 1e-4 (FP32) and identical greedy tokens.
"""

import json
import os

import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
pytest.importorskip('safetensors')
tokenizers = pytest.importorskip('tokenizers')

from bluelm_ros.tools.vlm.configs import load_config  # noqa: E402
from bluelm_ros.tools.vlm.convert import ConversionError, convert, FAMILIES  # noqa: E402
from bluelm_ros.tools.vlm.modeling import BlueLMV  # noqa: E402
from bluelm_ros.runtime.vlm.tokenizer import TokenizerError, VLMTokenizer  # noqa: E402

VOCAB = 128
IMAGE_TOKEN = 127
WORDS = ('what is in the image describe it please a robot cat dog red blue green on table '
         'left right USER ASSISTANT : User Assistant <end_of_utterance> [|Human|] [|AI|]').split()
ATOL = 1e-4
NEW_TOKENS = 12

# name -> (family, overrides)
LLAVA_CASES = {
    # GQA 4q/2kv, untied head, LLaVA-1.5 defaults: layer -2, "default" drops token 0
    'llava_gqa_untied_l-2_default': dict(kv=2, tie=False, layer=-2, strategy='default'),
    # MHA, tied embeddings, last layer, all tokens
    'llava_mha_tied_l-1_full': dict(kv=4, tie=True, layer=-1, strategy='full'),
    # MQA (1 kv head), tied, two feature layers concatenated, tanh-gelu projector
    # (HF runs eager attention here, so the comparison is not op-for-op identical)
    'llava_mqa_tied_multilayer': dict(kv=1, tie=True, layer=[-3, -1], strategy='full',
                                      act='gelu_pytorch_tanh', attn='eager', seed=7),
}


def write_tokenizer(path):
    """A word-level tokenizer.json whose ids fit the tiny vocab."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    vocab = {'<unk>': 0, '<s>': 1, '</s>': 2, '<pad>': 3}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    vocab['\n'] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token='<unk>'))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split('\n', 'isolated'), pre_tokenizers.WhitespaceSplit()])
    tok.decoder = decoders.WordPiece(prefix='##')
    tok.save(os.path.join(path, 'tokenizer.json'))


def _sharpen(model, seed):
    """Re-initialise with larger weights so greedy argmax margins are decisive."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if 'norm' in name and name.endswith('weight'):
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith('bias'):
                p.copy_(0.05 * noise)
            else:
                p.copy_(noise * (0.6 / max(1.0, p.shape[-1] ** 0.5)))
    return model


def _text_config(kv, tie):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=kv,
                       max_position_embeddings=256, tie_word_embeddings=tie,
                       bos_token_id=1, eos_token_id=2, pad_token_id=3)


def build_llava(path, kv, tie, layer, strategy, act='gelu', seed=0, attn='sdpa'):
    """Save a tiny random LlavaForConditionalGeneration (SigLIP + Llama) to ``path``."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, SiglipVisionConfig
    torch.manual_seed(seed)
    vc = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                            num_attention_heads=4, image_size=56, patch_size=14)
    cfg = LlavaConfig(vision_config=vc, text_config=_text_config(kv, tie),
                      image_token_index=IMAGE_TOKEN, vision_feature_layer=layer,
                      vision_feature_select_strategy=strategy, projector_hidden_act=act,
                      tie_word_embeddings=tie)
    model = _sharpen(LlavaForConditionalGeneration(cfg), seed).eval()
    model.set_attn_implementation(attn)
    if tie:
        model.tie_weights()
    model.save_pretrained(path)
    write_tokenizer(path)
    return model


def build_idefics3(path, seed=0, smolvlm=False, image_size=64, scale=2):
    """Save a tiny random Idefics3 (or SmolVLM) to ``path``."""
    if smolvlm:
        from transformers import SmolVLMConfig as C, SmolVLMForConditionalGeneration as M
    else:
        from transformers import Idefics3Config as C, Idefics3ForConditionalGeneration as M
    torch.manual_seed(seed)
    cfg = C(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, image_size=image_size, patch_size=16),
            text_config=_text_config(2, False).to_dict(), image_token_id=IMAGE_TOKEN,
            scale_factor=scale)
    model = _sharpen(M(cfg), seed).eval()
    model.save_pretrained(path)
    write_tokenizer(path)
    return model


def _prompt(tok, n_image_tokens):
    return torch.tensor([tok.build_prompt('what is in the image please describe it',
                                          n_image_tokens)])


def _hf_greedy(hf, ids, **kw):
    hf.generation_config.eos_token_id = None
    out = hf.generate(input_ids=ids, max_new_tokens=NEW_TOKENS, do_sample=False,
                      output_logits=True, return_dict_in_generate=True, pad_token_id=3, **kw)
    return out.sequences[0, ids.shape[1]:].tolist(), torch.cat(out.logits, dim=0)


def _check_parity(hf, ours, tok, pixel_values, hf_kwargs=None, ours_pixels=None):
    hf_kwargs = hf_kwargs or {}
    ours_pixels = pixel_values if ours_pixels is None else ours_pixels
    n_img = ours.config.tokens_per_tile * ours_pixels.shape[0]
    ids = _prompt(tok, n_img)
    assert int((ids == IMAGE_TOKEN).sum()) == n_img
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixel_values, **hf_kwargs).logits
        got, _ = ours(ids, pixel_values=ours_pixels)
    diff = (ref - got).abs().max().item()
    ref_tokens, ref_step_logits = _hf_greedy(hf, ids, pixel_values=pixel_values, **hf_kwargs)
    tokens, step_logits = ours.generate_greedy(ids, pixel_values=ours_pixels,
                                               max_new_tokens=NEW_TOKENS, eos_token_ids=[],
                                               return_logits=True)
    step_diff = (ref_step_logits - step_logits).abs().max().item()
    # report the numbers (visible with pytest -s / in the log on failure)
    print(f'parity: prompt logits max|diff|={diff:.2e} greedy-step max|diff|={step_diff:.2e} '
          f'tokens equal={tokens == ref_tokens} {tokens}')
    assert diff < ATOL
    assert step_diff < ATOL
    assert tokens == ref_tokens
    # the HF prompt must be decisive enough that this test means something
    top2 = torch.topk(ref[0, -1], 2).values
    assert (top2[0] - top2[1]).item() > 10 * ATOL
    # and the image must actually reach the logits
    with torch.no_grad():
        other, _ = ours(ids, pixel_values=ours_pixels + 0.5)
    assert (other - got).abs().max().item() > 1e-3
    return diff, step_diff, tokens == ref_tokens


@pytest.fixture(scope='module', params=sorted(LLAVA_CASES))
def llava_pair(request, tmp_path_factory):
    base = tmp_path_factory.mktemp(request.param)
    hf_dir, out_dir = str(base / 'hf'), str(base / 'ours')
    hf = build_llava(hf_dir, **LLAVA_CASES[request.param])
    cfg = convert('llava', hf_dir, out_dir)
    ours = BlueLMV.from_pretrained(out_dir)
    return request.param, hf, ours, VLMTokenizer.from_dir(out_dir), cfg


def test_llava_parity(llava_pair):
    name, hf, ours, tok, cfg = llava_pair
    case = LLAVA_CASES[name]
    assert cfg.text.tie_word_embeddings == case['tie']
    assert cfg.text.num_key_value_heads == case['kv']
    assert cfg.downsampler == 'none'
    expect = 16 - (1 if case['strategy'] == 'default' else 0)
    assert cfg.tokens_per_tile == expect
    torch.manual_seed(1)
    _check_parity(hf, ours, tok, torch.randn(1, 3, 56, 56))


def test_llava_converted_files(llava_pair, tmp_path):
    name, hf, ours, tok, cfg = llava_pair
    # tied models must not carry a separate lm_head
    names = dict(ours.named_parameters())
    assert ('language_model.lm_head.weight' in names) == (not cfg.text.tie_word_embeddings)
    # dropped: SigLIP pooling head, post-layernorm and blocks after the feature layer
    n_hf_vision = sum(p.numel() for n, p in hf.named_parameters() if 'vision_tower' in n)
    n_ours_vision = sum(p.numel() for p in ours.vision_tower.parameters())
    assert n_ours_vision < n_hf_vision


@pytest.mark.parametrize('smol,size,scale', [(False, 64, 2), (True, 128, 4)],
                         ids=['idefics3_s2', 'smolvlm_s4'])
def test_idefics3_parity(tmp_path, smol, size, scale):
    hf_dir, out_dir = str(tmp_path / 'hf'), str(tmp_path / 'ours')
    hf = build_idefics3(hf_dir, seed=3, smolvlm=smol, image_size=size, scale=scale)
    cfg = convert('idefics3', hf_dir, out_dir)
    assert cfg.downsampler == 'pixel_shuffle' and cfg.downsample_factor == scale
    assert cfg.tokens_per_tile == (size // 16 // scale) ** 2 == 4
    ours = BlueLMV.from_pretrained(out_dir)
    tok = VLMTokenizer.from_dir(out_dir)
    torch.manual_seed(2)
    tiles = torch.randn(2, 3, size, size)  # two images/tiles of one sample
    _check_parity(hf, ours, tok, tiles[None],
                  hf_kwargs={'pixel_attention_mask': torch.ones(1, 2, size, size,
                                                                dtype=torch.bool)},
                  ours_pixels=tiles)


# ---------------------------------------------------------------------------
# KV cache: incremental decode and chunked prefill equal full recompute


@pytest.fixture(scope='module')
def tiny():
    torch.manual_seed(0)
    return _sharpen(BlueLMV(load_config('tiny-test')), 5).eval()


def test_incremental_decode_matches_full(tiny):
    torch.manual_seed(0)
    lm = tiny.language_model
    x = torch.randn(1, 23, lm.config.hidden_size)
    with torch.no_grad():
        full, presents = lm(x)
        past, steps = None, []
        for i in range(x.shape[1]):
            logits, past = lm(x[:, i:i + 1], past_key_values=past)
            steps.append(logits)
    inc = torch.cat(steps, dim=1)
    assert (full - inc).abs().max().item() < 1e-5
    for (k1, v1), (k2, v2) in zip(presents, past):
        assert k1.shape == (1, lm.config.num_key_value_heads, 23, lm.config.head_dim)
        assert torch.allclose(k1, k2, atol=1e-5) and torch.allclose(v1, v2, atol=1e-5)


def test_chunked_prefill_and_padding_mask(tiny):
    torch.manual_seed(0)
    lm = tiny.language_model
    x = torch.randn(1, 40, lm.config.hidden_size)
    with torch.no_grad():
        full, _ = lm(x)
        past, outs = None, []
        for i in range(0, 40, 16):  # chunks of 16, 16, 8
            logits, past = lm(x[:, i:i + 16], past_key_values=past)
            outs.append(logits)
        assert (full - torch.cat(outs, 1)).abs().max().item() < 1e-5
        # left padding + explicit position ids reproduce the unpadded run
        pad = torch.randn(1, 5, lm.config.hidden_size)
        mask = torch.cat([torch.zeros(1, 5), torch.ones(1, 40)], 1).long()
        pos = torch.cat([torch.zeros(1, 5), torch.arange(40)[None]], 1).long()
        padded, _ = lm(torch.cat([pad, x], 1), position_ids=pos, attention_mask=mask)
    assert (padded[:, 5:] - full).abs().max().item() < 1e-5


def test_generate_greedy_chunked_prefill_same_tokens(tiny):
    cfg = tiny.config
    torch.manual_seed(4)
    px = torch.randn(3, 3, cfg.vision.image_size, cfg.vision.image_size)
    n = 3 * cfg.tokens_per_tile
    ids = torch.tensor([[1, 10, 11] + [cfg.image_token_id] * n + [12, 13, 14]])
    a = tiny.generate_greedy(ids, pixel_values=px, max_new_tokens=8, eos_token_ids=[])
    b = tiny.generate_greedy(ids, pixel_values=px, max_new_tokens=8, eos_token_ids=[],
                             prefill_chunk=7)
    # batched tile encoding must not change anything either
    c = tiny.generate_greedy(ids, image_embeds=tiny.encode_images(px, batch_size=1),
                             max_new_tokens=8, eos_token_ids=[])
    assert a == b == c and len(a) == 8


def test_merge_checks_placeholder_count(tiny):
    cfg = tiny.config
    ids = torch.tensor([[1, cfg.image_token_id, 5]])
    with pytest.raises(ValueError, match='image placeholder'):
        tiny.merge(ids, torch.zeros(2, cfg.text.hidden_size))
    emb = torch.full((1, cfg.text.hidden_size), 7.0)
    merged = tiny.merge(ids, emb)
    assert torch.equal(merged[0, 1], emb[0])
    assert torch.equal(merged[0, 0], tiny.embed_tokens(ids)[0, 0])


# ---------------------------------------------------------------------------
# conversion errors


def test_conversion_errors(tmp_path):
    hf_dir = tmp_path / 'hf'
    build_llava(str(hf_dir), kv=2, tie=False, layer=-1, strategy='full')
    out = str(tmp_path / 'out')
    # missing tokenizer.json is named
    os.rename(hf_dir / 'tokenizer.json', tmp_path / 'tok.json')
    with pytest.raises(ConversionError, match='tokenizer.json'):
        convert('llava', str(hf_dir), out)
    convert('llava', str(hf_dir), out, require_tokenizer=False)
    with pytest.raises(TokenizerError, match='tokenizer.json'):
        VLMTokenizer.from_dir(out)
    os.rename(tmp_path / 'tok.json', hf_dir / 'tokenizer.json')
    # config.json disagrees with the weights: the error names file, key and shapes
    cfg_path = hf_dir / 'config.json'
    good = json.loads(cfg_path.read_text())
    bad = json.loads(cfg_path.read_text())
    bad['text_config']['vocab_size'] = VOCAB + 8
    cfg_path.write_text(json.dumps(bad))
    with pytest.raises(ConversionError, match=r'model\.safetensors.*embed_tokens.*shape'):
        convert('llava', str(hf_dir), out)
    # unsupported / missing config keys name the key
    bad = dict(good, vision_config=dict(good['vision_config'], model_type='dinov2'))
    cfg_path.write_text(json.dumps(bad))
    with pytest.raises(ConversionError, match='vision_config.model_type'):
        convert('llava', str(hf_dir), out)
    bad = {k: v for k, v in good.items() if k != 'text_config'}
    cfg_path.write_text(json.dumps(bad))
    with pytest.raises(ConversionError, match='config.json: text_config: missing'):
        convert('llava', str(hf_dir), out)
    cfg_path.write_text(json.dumps(good))
    # a missing tensor is named
    from safetensors.torch import load_file, save_file
    wpath = str(hf_dir / 'model.safetensors')
    state = load_file(wpath)
    state.pop('multi_modal_projector.linear_2.weight')
    save_file(state, wpath)
    with pytest.raises(ConversionError, match='projector.linear_2.weight'):
        convert('llava', str(hf_dir), out)
    state['multi_modal_projector.linear_2.weight'] = torch.zeros(64, 64)
    state['multi_modal_projector.extra.weight'] = torch.zeros(1)
    save_file(state, wpath)
    with pytest.raises(ConversionError, match='multi_modal_projector.extra.weight: unexpected'):
        convert('llava', str(hf_dir), out)
    with pytest.raises(ConversionError, match='config.json: file not found'):
        convert('llava', str(tmp_path / 'nowhere'), out)
    with pytest.raises(ConversionError, match="unknown checkpoint family 'qwen'"):
        convert('qwen', str(hf_dir), out)


def test_every_registered_family_is_one_module_with_its_family():
    from bluelm_ros.tools.vlm.convert import family
    assert set(FAMILIES) >= {'llava', 'idefics3'}
    for name, module in FAMILIES.items():
        fam = family(name)
        assert fam.name == name and module.endswith('.' + name)
        assert callable(fam.config) and fam.layout.text and fam.description


def test_llava_key_layouts_and_shards(tmp_path):
    """transformers 4.x names (``vision_tower.vision_model.*``) and sharded files convert."""
    from safetensors.torch import load_file, save_file
    hf_dir = tmp_path / 'hf'
    build_llava(str(hf_dir), kv=2, tie=False, layer=-1, strategy='full')
    ref_cfg = convert('llava', str(hf_dir), str(tmp_path / 'ref'))
    ref = BlueLMV.from_pretrained(str(tmp_path / 'ref'))
    state = load_file(str(hf_dir / 'model.safetensors'))
    os.remove(hf_dir / 'model.safetensors')
    renamed = {}
    for k, v in state.items():
        if k.startswith('vision_tower.'):
            k = 'vision_tower.vision_model.' + k[len('vision_tower.'):]
        renamed[k] = v
    keys = sorted(renamed)
    shards = {'model-00001-of-00002.safetensors': keys[::2],
              'model-00002-of-00002.safetensors': keys[1::2]}
    weight_map = {}
    for fname, ks in shards.items():
        save_file({k: renamed[k] for k in ks}, str(hf_dir / fname))
        weight_map.update({k: fname for k in ks})
    (hf_dir / 'model.safetensors.index.json').write_text(
        json.dumps({'metadata': {}, 'weight_map': weight_map}))
    cfg = convert('llava', str(hf_dir), str(tmp_path / 'sharded'))
    assert cfg == dataclasses_replace_name(ref_cfg, cfg.name)
    got = BlueLMV.from_pretrained(str(tmp_path / 'sharded'))
    for (k, a), (_, b) in zip(ref.state_dict().items(), got.state_dict().items()):
        assert torch.equal(a, b), k
    os.remove(hf_dir / 'model-00002-of-00002.safetensors')
    with pytest.raises(ConversionError, match='model-00002-of-00002.safetensors'):
        convert('llava', str(hf_dir), str(tmp_path / 'x'))


def dataclasses_replace_name(cfg, name):
    """Copy of ``cfg`` with another name (the name comes from the source directory)."""
    import dataclasses
    return dataclasses.replace(cfg, name=name)
