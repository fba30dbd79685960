"""Tiny random-weight open-VLM checkpoints as a user would download them (nothing downloaded).

Each builder writes a folder with ``config.json``, ``model.safetensors``,
``generation_config.json`` and the checkpoint's processor (tokenizer files, image processor
config, chat template) saved by transformers itself, shaped like the real families:

* ``smolvlm``: Idefics3 architecture (as SmolVLM-256M/500M-Instruct), SmolLM2-style
  byte-level BPE tokenizer (no BOS), ``<|im_start|>User:<image>...<end_of_utterance>``
  template, stops on ``<end_of_utterance>``, tie flag only in ``text_config`` with its own
  ``lm_head.weight`` in the file, 256 px longest edge split into 64 px tiles.
* ``idefics3``: Llama 3 style tokenizer (BOS ``<|begin_of_text|>`` from the post-processor,
  which the template writes too), Llama 3 RoPE scaling, 192 px longest edge.
* ``llava_siglip``: SigLIP tower, stretch resize, Metaspace (Llama) tokenizer with byte
  fallback loaded by v5's ``LlamaTokenizer``, LLaVA-1.5 style template.
* ``llava_clip``: CLIP tower (class token, pre-layernorm, quick_gelu), shortest-edge resize
  + centre crop, ``vision_feature_select_strategy="default"``.

Weights are re-drawn larger than the init (see :func:`sharpen`) so greedy argmax margins
are decisive and a token comparison means something.
"""

from __future__ import annotations

from dataclasses import dataclass
import json
import os

import numpy as np

CORPUS = [
    'what is in the image? describe it in detail please.',
    'is there a robot, a dog, a cat or a red car on the left of the table?',
    'the photo shows a woman in a white space suit next to a flag.',
    'a cup of coffee on a saucer, seen from above, on a wooden table.',
    'a cat with green eyes looks at the camera. count the objects.',
    'User: Assistant: USER: ASSISTANT: System: you are a helpful robot.',
    'How many people are there? What colour is the wall? Where is the door?',
]
IDEFICS3_SPECIALS = (['<fake_token_around_image>', '<image>', '<end_of_utterance>',
                      '<global-img>']
                     + [f'<row_{r}_col_{c}>' for r in range(1, 7) for c in range(1, 7)])

# Same rules as the real templates (SmolVLM's chat_template.json, llava-hf's llava-1.5),
# written out here.
SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}"
    "{% endif %}")
IDEFICS3_TEMPLATE = SMOLVLM_TEMPLATE.replace('<|im_start|>', '<|begin_of_text|>', 1)
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for part in message['content'] if part['type'] == 'image' %}{{ '<image>\n' }}"
    "{% endfor %}{% for part in message['content'] if part['type'] == 'text' %}"
    "{{ part['text'] + ' ' }}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")

FAMILIES = ('smolvlm', 'idefics3', 'llava_siglip', 'llava_clip')


@dataclass
class Checkpoint:
    """A saved tiny checkpoint and the transformers objects that wrote it."""

    family: str
    path: str
    model: object
    processor: object
    model_class: type


# ---------------------------------------------------------------------------
# tokenizers


def _bytelevel_bpe(specials: list, llama3_split: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    if llama3_split:  # Llama 3: a regex split, then bytes without its own regex
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
                                 r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
                                 'isolated'),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    return tok


def _metaspace_bpe():
    """SentencePiece-style BPE with byte fallback and the legacy prepend normalizer."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    tok = Tokenizer(models.BPE(unk_token='<unk>', byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend('▁'),
                                           normalizers.Replace(' ', '▁')])
    tok.decoder = decoders.Sequence([decoders.Replace('▁', ' '), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(' ', 1, 0)])
    alphabet = sorted(set(''.join(CORPUS).replace(' ', '▁')) | {'▁'})
    trainer = trainers.BpeTrainer(
        vocab_size=600, show_progress=False, initial_alphabet=alphabet,
        special_tokens=['<unk>', '<s>', '</s>'] + [f'<0x{i:02X}>' for i in range(256)])
    tok.train_from_iterator(CORPUS * 4, trainer)
    from tokenizers import processors
    tok.post_processor = processors.TemplateProcessing(
        single='<s> $A', pair='<s> $A <s> $B', special_tokens=[('<s>', tok.token_to_id('<s>'))])
    return tok


def _set_tokenizer_class(path: str, cls: str, **extra) -> None:
    p = os.path.join(path, 'tokenizer_config.json')
    with open(p, encoding='utf-8') as f:
        data = json.load(f)
    data.update(tokenizer_class=cls, **extra)
    with open(p, 'w', encoding='utf-8') as f:
        json.dump(data, f, indent=2)


# ---------------------------------------------------------------------------
# models


def sharpen(model, seed: int):
    """Re-draw weights larger than the init so greedy margins are decisive."""
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if 'norm' in name and name.endswith('weight'):
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith('bias'):
                p.copy_(0.05 * noise)
            elif p.dim() == 1:  # CLIP's class embedding
                p.copy_(noise * 0.5)
            else:
                p.copy_(noise * (0.6 / max(1.0, p.shape[-1] ** 0.5)))
    return model


def _llama(vocab: int, ids: dict, tie: bool, rope_llama3: bool = False):
    from transformers import LlamaConfig
    kw = {}
    if rope_llama3:
        # original length 32: wavelengths 6, 20, 63.. fall in all three llama3 regimes
        kw['rope_parameters'] = dict(rope_type='llama3', rope_theta=10000.0, factor=8.0,
                                     low_freq_factor=1.0, high_freq_factor=4.0,
                                     original_max_position_embeddings=32)
    return LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=512, tie_word_embeddings=tie, **ids, **kw)


def _vocab_size(tokenizer) -> int:
    return -(-len(tokenizer) // 8) * 8  # a few unused rows, as real checkpoints have


def _finish(model, processor, path: str, eos: list, seed: int):
    sharpen(model, seed).eval()
    if model.config.get_text_config().tie_word_embeddings and model.config.tie_word_embeddings:
        model.tie_weights()
    model.generation_config.eos_token_id = eos
    model.generation_config.do_sample = False
    model.save_pretrained(path)
    processor.save_pretrained(path)


# The real SmolVLM-Instruct shapes (SigLIP-B/16 at 512 px, SmolLM2 text models, 4x4
# pixel shuffle: 64 tokens per 512 px tile, images resized to a 2048 px longest edge with
# Lanczos), for benchmarks with random weights at the real cost.
_SIGLIP_B16_512 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                       num_attention_heads=12, image_size=512, patch_size=16)
SMOLVLM_SHAPES = {
    'smolvlm-256m': dict(vision=_SIGLIP_B16_512, longest_edge=2048, text=dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49280, max_position_embeddings=8192)),
    'smolvlm-500m': dict(vision=_SIGLIP_B16_512, longest_edge=2048, text=dict(
        hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
        num_key_value_heads=5, vocab_size=49280, max_position_embeddings=8192)),
}


def build_idefics3_family(path: str, smolvlm: bool, seed: int = 0,
                          shape: str | None = None) -> Checkpoint:
    """SmolVLM-like (``smolvlm=True``) or Idefics3-like tiny checkpoint.

    ``shape``: a key of :data:`SMOLVLM_SHAPES` for real-size SmolVLM random weights.
    """
    import torch
    from transformers import (Idefics3Config, Idefics3ForConditionalGeneration,
                              Idefics3Processor, PreTrainedTokenizerFast)
    from transformers.models.idefics3.image_processing_pil_idefics3 import (
        Idefics3ImageProcessorPil)
    torch.manual_seed(seed)
    if smolvlm:
        base = ['<|endoftext|>', '<|im_start|>', '<|im_end|>']
        tok = PreTrainedTokenizerFast(tokenizer_object=_bytelevel_bpe(base, False),
                                      bos_token='<|im_start|>', eos_token='<|im_end|>',
                                      unk_token='<|endoftext|>', pad_token='<|im_end|>',
                                      additional_special_tokens=IDEFICS3_SPECIALS)
        template, longest, vision = SMOLVLM_TEMPLATE, 256, dict(image_size=64, patch_size=8)
        scale = 4  # SmolVLM: 4x4 pixel shuffle
    else:
        from tokenizers import processors
        base = ['<|begin_of_text|>', '<|end_of_text|>', '<|eot_id|>']
        backend = _bytelevel_bpe(base, True)
        backend.post_processor = processors.TemplateProcessing(
            single='<|begin_of_text|> $A', pair='<|begin_of_text|> $A <|begin_of_text|> $B',
            special_tokens=[('<|begin_of_text|>', backend.token_to_id('<|begin_of_text|>'))])
        tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token='<|begin_of_text|>',
                                      eos_token='<|end_of_text|>',
                                      pad_token='<|end_of_text|>',
                                      additional_special_tokens=IDEFICS3_SPECIALS)
        template, longest, vision = IDEFICS3_TEMPLATE, 192, dict(image_size=64, patch_size=16)
        scale = 2
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id)
    real = SMOLVLM_SHAPES[shape] if shape else None
    text = _llama(_vocab_size(tok), ids, tie=smolvlm, rope_llama3=not smolvlm).to_dict()
    if real:
        text.update(real['text'])
        vision = dict(real['vision'])
        longest = real['longest_edge']
        hidden = {}
    else:
        hidden = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4)
    image_id = tok.convert_tokens_to_ids('<image>')
    cfg = Idefics3Config(vision_config=dict(**hidden, **vision),
                         text_config=text, image_token_id=image_id, scale_factor=scale,
                         tie_word_embeddings=False)
    tokens_per_tile = (vision['image_size'] // vision['patch_size'] // scale) ** 2
    image_processor = Idefics3ImageProcessorPil(
        size={'longest_edge': longest}, max_image_size={'longest_edge': vision['image_size']},
        resample=1, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tok,
                                  image_seq_len=tokens_per_tile, chat_template=template)
    model = Idefics3ForConditionalGeneration(cfg)
    eos = [tok.convert_tokens_to_ids('<end_of_utterance>')]
    _finish(model, processor, path, eos, seed)
    if smolvlm:
        _set_tokenizer_class(path, 'GPT2Tokenizer')
    return Checkpoint('smolvlm' if smolvlm else 'idefics3', path, model, processor,
                      Idefics3ForConditionalGeneration)


def build_llava_family(path: str, tower: str, seed: int = 0) -> Checkpoint:
    """LLaVA with a SigLIP (``tower="siglip"``) or CLIP (``"clip"``) vision tower."""
    import torch
    from transformers import (CLIPVisionConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor,
                              PreTrainedTokenizerFast, SiglipVisionConfig)
    torch.manual_seed(seed)
    tok = PreTrainedTokenizerFast(tokenizer_object=_metaspace_bpe(), bos_token='<s>',
                                  eos_token='</s>', unk_token='<unk>', pad_token='<unk>',
                                  additional_special_tokens=['<image>'])
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4, image_size=56, patch_size=14)
    if tower == 'clip':
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
        vc = CLIPVisionConfig(projection_dim=16, **vision)
        image_processor = CLIPImageProcessorPil(size={'shortest_edge': 56},
                                                crop_size={'height': 56, 'width': 56})
        strategy, extra_tokens = 'default', 1  # drop CLS; the processor counts it
    else:
        from transformers.models.siglip.image_processing_pil_siglip import (
            SiglipImageProcessorPil)
        vc = SiglipVisionConfig(**vision)
        image_processor = SiglipImageProcessorPil(size={'height': 56, 'width': 56},
                                                  resample=3, image_mean=[0.5] * 3,
                                                  image_std=[0.5] * 3)
        strategy, extra_tokens = 'full', 0
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id)
    image_id = tok.convert_tokens_to_ids('<image>')
    cfg = LlavaConfig(vision_config=vc, text_config=_llama(_vocab_size(tok), ids, tie=False,
                                                           rope_llama3=tower == 'siglip'),
                      image_token_index=image_id, vision_feature_layer=-2,
                      vision_feature_select_strategy=strategy)
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=14,
                               vision_feature_select_strategy=strategy,
                               num_additional_image_tokens=extra_tokens,
                               chat_template=LLAVA_TEMPLATE)
    model = LlavaForConditionalGeneration(cfg)
    _finish(model, processor, path, [tok.eos_token_id], seed)
    # as llava-hf checkpoints: transformers 5 loads it as LlamaTokenizer, which rebuilds the
    # pre-tokenizer (Metaspace) instead of the legacy normalizer stored in tokenizer.json
    _set_tokenizer_class(path, 'LlamaTokenizer', legacy=False, add_bos_token=True)
    return Checkpoint(f'llava_{tower}', path, model, processor, LlavaForConditionalGeneration)


def build(family: str, path: str, seed: int = 0) -> Checkpoint:
    """Build one of :data:`FAMILIES` into ``path``."""
    if family in ('smolvlm', 'idefics3'):
        return build_idefics3_family(path, smolvlm=family == 'smolvlm', seed=seed)
    return build_llava_family(path, tower=family.split('_')[1], seed=seed)


# ---------------------------------------------------------------------------
# photos


def photos() -> dict:
    """Real photos from scikit-image (RGB uint8), plus a 640x480 frame and a portrait."""
    from skimage import data
    return {'astronaut': data.astronaut(), 'chelsea': data.chelsea(), 'coffee': data.coffee(),
            'frame640x480': np.ascontiguousarray(data.hubble_deep_field()[:480, :640]),
            'portrait': np.ascontiguousarray(np.rot90(data.coffee()))}
