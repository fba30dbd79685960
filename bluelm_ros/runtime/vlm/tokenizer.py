"""Tokenizer and chat prompt building with HF ``tokenizers`` (no torch, no transformers).

The image placeholder never goes through the tokenizer: the prompt template is split at
``{image}`` and ``config.image_token_id`` is inserted directly, once per image token
(or once, as a single marker, with :meth:`VLMTokenizer.build_prompt` ``n_image_tokens=1``
and :func:`expand_image_tokens` later). So any tokenizer works, whether or not it has an
``<image>`` token.
"""

from __future__ import annotations

import os
from typing import Iterable, Optional, Sequence

from bluelm_ros.runtime.vlm.config import BlueLMVConfig, CONFIG_FILE

TOKENIZER_FILE = 'tokenizer.json'
# tokenizer.json and the companions a model folder may have; copied along with it.
TOKENIZER_FILES = (TOKENIZER_FILE, 'tokenizer_config.json', 'special_tokens_map.json',
                   'added_tokens.json', 'chat_template.jinja', 'chat_template.json',
                   'generation_config.json')


class TokenizerError(ValueError):
    """Missing or unusable tokenizer files; the message names the file."""


class VLMTokenizer:
    """``tokenizer.json`` + the prompt section of a :class:`BlueLMVConfig`."""

    def __init__(self, tokenizer_file: str, config: BlueLMVConfig):
        from tokenizers import Tokenizer
        if not os.path.exists(tokenizer_file):
            raise TokenizerError(f'{tokenizer_file}: tokenizer file not found')
        try:
            self.tokenizer = Tokenizer.from_file(tokenizer_file)
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise TokenizerError(f'{tokenizer_file}: cannot load tokenizer: {e}') from None
        self.config = config
        self.prompt = config.prompt
        self.image_token_id = config.image_token_id
        self.bos_token_id = config.bos_token_id
        self.eos_token_ids = list(config.eos_token_ids)
        vocab = self.tokenizer.get_vocab_size(with_added_tokens=True)
        if vocab > config.text.vocab_size:
            raise TokenizerError(f'{tokenizer_file}: {vocab} tokens exceed the model vocab '
                                 f'{config.text.vocab_size}')

    @classmethod
    def from_dir(cls, model_dir: str, config: Optional[BlueLMVConfig] = None) -> 'VLMTokenizer':
        """Load ``tokenizer.json`` (and ``config.json`` unless given) from a model dir."""
        if config is None:
            config = BlueLMVConfig.from_json(os.path.join(model_dir, CONFIG_FILE))
        return cls(os.path.join(model_dir, TOKENIZER_FILE), config)

    # -- plain text ------------------------------------------------------------------

    def encode(self, text: str) -> list:
        """Text -> ids, without BOS/EOS or other post-processing."""
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def encode_prompt(self, text: str) -> list:
        """Tokenize a whole rendered prompt with the tokenizer's special tokens (e.g. BOS).

        This is what transformers' processors do with a chat-template prompt.
        """
        return list(self.tokenizer.encode(text, add_special_tokens=True).ids)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Ids -> text (image placeholders and EOS dropped when skipping specials)."""
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            drop = set(self.eos_token_ids) | {self.image_token_id}
            ids = [i for i in ids if i not in drop]
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    # -- prompts ---------------------------------------------------------------------------

    def build_prompt(self, question: str, n_image_tokens: int,
                     system: Optional[str] = None) -> list:
        """Chat prompt ids: [BOS] system? template(image tokens, question).

        ``n_image_tokens`` = 0 drops the image; 1 leaves a single marker to expand later.
        """
        if n_image_tokens < 0:
            raise ValueError('n_image_tokens must be >= 0')
        p = self.prompt
        system = p.default_system if system is None else system
        text = p.template
        if system:
            text = p.system_template.replace('{system}', system) + text
        before, after = text.split('{image}', 1)
        ids = []
        if p.add_bos and self.bos_token_id is not None:
            ids.append(self.bos_token_id)
        # {question} is substituted last so braces in user text are never interpreted
        ids += self.encode(before.replace('{question}', question))
        ids += [self.image_token_id] * n_image_tokens
        ids += self.encode(after.replace('{question}', question))
        return ids

    def is_eos(self, token_id: int) -> bool:
        """Tell whether ``token_id`` ends a sequence."""
        return token_id in self.eos_token_ids


def expand_image_tokens(ids: Sequence[int], image_token_id: int, n: int) -> list:
    """Replace each single image marker by ``n`` image tokens."""
    out = []
    for i in ids:
        out.extend([i] * n if i == image_token_id else [i])
    return out
