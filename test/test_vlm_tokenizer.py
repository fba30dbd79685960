"""Tokenizer wrapper and chat prompt with image placeholders."""

import dataclasses

import pytest

pytest.importorskip('tokenizers')

from bluelm_ros.tools.vlm.configs import load_config  # noqa: E402
from bluelm_ros.runtime.vlm.sampling import TextStream  # noqa: E402
from bluelm_ros.runtime.vlm.tokenizer import (TokenizerError, VLMTokenizer,  # noqa: E402
                                              expand_image_tokens)


@pytest.fixture()
def tok(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    vocab = {'<unk>': 0, '<s>': 1, '</s>': 2}
    for w in '[|Human|]: ?[|AI|]: what is this ? you are a robot {x}'.split(' '):
        vocab.setdefault(w, len(vocab))
    t = Tokenizer(models.WordLevel(vocab, unk_token='<unk>'))
    t.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split('\n', 'isolated'), pre_tokenizers.Split(':', 'merged_with_previous'),
        pre_tokenizers.WhitespaceSplit()])
    t.decoder = decoders.WordPiece(cleanup=False)
    path = tmp_path / 'tokenizer.json'
    t.save(str(path))
    return VLMTokenizer(str(path), load_config('tiny-test'))


def test_build_prompt_layout(tok):
    img = tok.image_token_id
    ids = tok.build_prompt('what is this ?', 16)
    human = tok.encode('[|Human|]:')
    assert ids[0] == tok.bos_token_id
    assert ids[1:1 + len(human)] == human
    start = 1 + len(human)
    assert ids[start:start + 16] == [img] * 16 and ids.count(img) == 16
    # the text after the image is encoded as one piece (template tail included)
    assert ids[start + 16:] == tok.encode('\nwhat is this ?[|AI|]:')
    # one marker, expanded later, gives the same ids
    single = tok.build_prompt('what is this ?', 1)
    assert expand_image_tokens(single, img, 16) == ids
    # no image: placeholder removed
    assert img not in tok.build_prompt('what is this ?', 0)


def test_system_prompt_and_braces(tok):
    ids = tok.build_prompt('{x} ?', 2, system='you are a robot')
    assert ids[1:5] == tok.encode('you are a robot')
    assert tok.encode('{x}')[0] in ids  # user braces are not template fields
    with pytest.raises(ValueError):
        tok.build_prompt('a', -1)


def test_no_bos_when_disabled(tmp_path, tok):
    cfg = load_config('tiny-test')
    cfg = dataclasses.replace(cfg, prompt=dataclasses.replace(cfg.prompt, add_bos=False))
    t2 = VLMTokenizer(str(tmp_path / 'tokenizer.json'), cfg)
    assert t2.build_prompt('what', 1)[0] != cfg.bos_token_id


def test_decode_and_stream(tok):
    ids = tok.encode('what is this ?')
    text = tok.decode(ids + [tok.eos_token_ids[0], tok.image_token_id])
    assert text == 'what is this ?'
    assert tok.is_eos(tok.eos_token_ids[0]) and not tok.is_eos(ids[0])
    s = TextStream(tok, stop_strings=())
    pieces = [s.push(i) for i in ids]
    assert ''.join(pieces) + s.finish() == 'what is this ?'


def test_missing_or_bad_tokenizer(tmp_path):
    cfg = load_config('tiny-test')
    with pytest.raises(TokenizerError, match='tokenizer.json: tokenizer file not found'):
        VLMTokenizer(str(tmp_path / 'tokenizer.json'), cfg)
    bad = tmp_path / 'bad.json'
    bad.write_text('{"not": "a tokenizer"}')
    with pytest.raises(TokenizerError, match='bad.json'):
        VLMTokenizer(str(bad), cfg)
