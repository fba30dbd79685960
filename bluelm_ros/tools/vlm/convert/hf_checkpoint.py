"""What an HF checkpoint folder says about its prompt, preprocessing and stop tokens.

Used by the converter (offline). Reads only JSON/Jinja files; ``transformers`` is used when
installed, for the one thing its files alone cannot tell exactly: the tokenizer transformers
actually runs (its tokenizer classes rebuild parts of ``tokenizer.json``, e.g. v5's
``LlamaTokenizer`` swaps the legacy ``Prepend("▁")`` normalizer for a Metaspace
pre-tokenizer, and processors add their special tokens). That backend is saved as the
bundle's ``tokenizer.json``, so the ``tokenizers`` library on the robot encodes exactly as
transformers did on the workstation.

Sources, in transformers' order of precedence:

* image processor: ``preprocessor_config.json`` (transformers 4.x layout), else
  ``processor_config.json`` ``["image_processor"]`` (5.x);
* processor settings (``image_seq_len``, ``patch_size``, ``num_additional_image_tokens``,
  ``vision_feature_select_strategy``, ``image_token``): ``processor_config.json``;
* chat template: ``chat_template.jinja``, ``chat_template.json``, ``processor_config.json``
  (the processor's, which ``processor.apply_chat_template`` uses), else the tokenizer's
  ``tokenizer_config.json`` ``chat_template``;
* stop tokens: ``generation_config.json`` ``eos_token_id`` (what ``generate`` stops on).
"""

from __future__ import annotations

from dataclasses import dataclass
import json
import logging
import os
from typing import Optional

log = logging.getLogger(__name__)

_SPECIAL_TOKEN_KEYS = ('bos_token', 'eos_token', 'unk_token', 'sep_token', 'pad_token',
                       'cls_token', 'mask_token')


def _json(path: str) -> Optional[dict]:
    if not os.path.exists(path):
        return None
    with open(path, encoding='utf-8') as f:
        return json.load(f)


def image_processor_dict(hf_dir: str) -> tuple:
    """``(image processor dict or None, source file)``."""
    pre = os.path.join(hf_dir, 'preprocessor_config.json')
    data = _json(pre)
    if data is not None:
        return data, pre
    proc = os.path.join(hf_dir, 'processor_config.json')
    data = _json(proc) or {}
    if isinstance(data.get('image_processor'), dict):
        return data['image_processor'], proc + ' image_processor'
    return None, pre


def processor_settings(hf_dir: str) -> dict:
    """Top-level settings of ``processor_config.json`` (empty if absent)."""
    data = _json(os.path.join(hf_dir, 'processor_config.json')) or {}
    return {k: v for k, v in data.items() if not isinstance(v, dict)}


def chat_template(hf_dir: str) -> tuple:
    """``(template source or None, file it came from)``."""
    path = os.path.join(hf_dir, 'chat_template.jinja')
    if os.path.exists(path):
        with open(path, encoding='utf-8') as f:
            return f.read(), path
    for name in ('chat_template.json', 'processor_config.json', 'tokenizer_config.json'):
        path = os.path.join(hf_dir, name)
        template = (_json(path) or {}).get('chat_template')
        if isinstance(template, list):  # named templates: [{"name", "template"}]
            named = {t.get('name'): t.get('template') for t in template}
            template = named.get('default')
        if isinstance(template, dict):
            template = template.get('default')
        if isinstance(template, str):
            return template, path
    return None, None


def generation_eos(hf_dir: str) -> Optional[list]:
    """Stop token ids from ``generation_config.json`` (None when it has none)."""
    gen = _json(os.path.join(hf_dir, 'generation_config.json')) or {}
    eos = gen.get('eos_token_id')
    if eos is None:
        return None
    return [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]


def _token_text(value) -> Optional[str]:
    if isinstance(value, dict):
        return value.get('content')
    return value if isinstance(value, str) else None


@dataclass
class TokenizerExport:
    """What :func:`write_tokenizer` wrote: the variables for the chat template and how."""

    template_vars: dict
    source: str  # "transformers <version>" or "tokenizer.json (copied)"


def special_tokens_from_files(hf_dir: str) -> dict:
    cfg = _json(os.path.join(hf_dir, 'tokenizer_config.json')) or {}
    stm = _json(os.path.join(hf_dir, 'special_tokens_map.json')) or {}
    out = {}
    for key in _SPECIAL_TOKEN_KEYS:
        text = _token_text(cfg.get(key, stm.get(key)))
        if text is not None:
            out[key] = text
    return out


def write_tokenizer(hf_dir: str, out_path: str) -> TokenizerExport:
    """Write the tokenizer transformers would run for ``hf_dir`` as ``out_path``.

    With transformers installed: the processor's (else the tokenizer's) backend
    ``tokenizers.Tokenizer`` and its special tokens map. Without it: ``tokenizer.json``
    copied as is and the special tokens read from ``tokenizer_config.json``.
    """
    try:
        import transformers
    except ImportError:
        transformers = None
    if transformers is not None:
        tok = _load_transformers_tokenizer(transformers, hf_dir)
        if tok is not None:
            tok.backend_tokenizer.save(out_path)
            variables = {k: _token_text(v) for k, v in tok.special_tokens_map.items()
                         if _token_text(v) is not None}
            return TokenizerExport(variables, f'transformers {transformers.__version__}')
    import shutil
    shutil.copyfile(os.path.join(hf_dir, 'tokenizer.json'), out_path)
    log.warning('%s: transformers not installed: tokenizer.json copied as is (transformers may '
                'tokenize differently, e.g. Llama tokenizers in 5.x)', hf_dir)
    return TokenizerExport(special_tokens_from_files(hf_dir), 'tokenizer.json (copied)')


def _load_transformers_tokenizer(transformers, hf_dir: str):
    # the processor first: it adds its own special tokens (Idefics3's <image>, ...)
    try:
        proc = transformers.AutoProcessor.from_pretrained(hf_dir)
        tok = getattr(proc, 'tokenizer', None)
        if tok is not None and hasattr(tok, 'backend_tokenizer'):
            return tok
    except Exception as e:  # any loader failure: fall back to the tokenizer alone
        log.info('%s: AutoProcessor failed (%s); using AutoTokenizer', hf_dir, e)
    try:
        tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    except Exception as e:
        log.warning('%s: AutoTokenizer failed (%s); copying tokenizer.json', hf_dir, e)
        return None
    return tok if hasattr(tok, 'backend_tokenizer') else None
