"""A checkpoint's own chat template, rendered as transformers renders it (jinja2, no torch).

Converted open checkpoints keep their Jinja chat template in ``config.json``
(``prompt.chat_template``) with the tokenizer's special tokens map (``prompt.template_vars``:
``bos_token``, ``eos_token``, ...). The prompt is then built the way a transformers user
builds it::

    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    ids = processor(text=text, images=[image]).input_ids

i.e. the template is rendered (sandboxed environment, ``trim_blocks``, ``lstrip_blocks``,
``loopcontrols``, transformers' ``tojson`` / ``raise_exception`` / ``strftime_now``), each
``<image>`` placeholder is replaced by the image processor's expansion (marker tokens and
``image_seq_len`` image tokens for Idefics3), and the whole text is tokenized **in one piece**
with the tokenizer's special tokens (BOS from its post-processor). Tokenizing the parts around
the image separately adds a stray ``▁`` with Metaspace (Llama) tokenizers.

``jinja2`` is imported when a template is compiled, so BlueLM-V bundles (no template)
run without it.
"""

from __future__ import annotations

from datetime import datetime
import json
from typing import Optional

from bluelm_ros.runtime.vlm.tokenizer import VLMTokenizer


class ChatTemplateError(ValueError):
    """A chat template cannot be compiled or rendered; the message says why."""


def _environment():
    try:
        import jinja2
        from jinja2 import nodes
        from jinja2.ext import Extension, loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ChatTemplateError('this bundle renders its prompt with the checkpoint\'s chat '
                                'template, which needs jinja2: pip install jinja2') from None

    class GenerationBlock(Extension):
        """``{% generation %}...{% endgeneration %}``: rendered as its body.

        transformers uses the tag to mark assistant tokens for training masks; for
        rendering a prompt it is transparent.
        """

        tags = {'generation'}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(['name:endgeneration'], drop_needle=True)
            return nodes.CallBlock(self.call_method('_body'), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # transformers' override: no HTML escaping, json.dumps options exposed
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, loopcontrols])
    env.filters['tojson'] = tojson
    env.globals['raise_exception'] = raise_exception
    env.globals['strftime_now'] = strftime_now
    return env


def chat_messages(question: str, with_image: bool, system: Optional[str] = None) -> list:
    """Return the conversation a user passes to ``apply_chat_template``: image, then text.

    (SmolVLM's template writes ``User:`` without a space when the content starts with an
    image, as its model card shows; LLaVA's templates put images first whatever the order.)
    """
    messages = []
    if system:
        messages.append({'role': 'system', 'content': [{'type': 'text', 'text': system}]})
    content = [{'type': 'image'}] if with_image else []
    content.append({'type': 'text', 'text': question})
    messages.append({'role': 'user', 'content': content})
    return messages


class ChatTemplate:
    """A compiled chat template plus the variables transformers passes to it."""

    def __init__(self, source: str, variables: Optional[dict] = None):
        env = _environment()
        import jinja2
        try:
            self.template = env.from_string(source)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f'prompt.chat_template: cannot compile: {e}') from None
        self.variables = dict(variables or {})

    def render(self, messages: list, add_generation_prompt: bool = True) -> str:
        """Render a conversation (``messages`` as in transformers)."""
        import jinja2
        try:
            return self.template.render(messages=messages, tools=None, documents=None,
                                        add_generation_prompt=add_generation_prompt,
                                        **self.variables)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f'prompt.chat_template: cannot render: {e}') from None


class FormatPromptBuilder:
    """BlueLM-V bundles: the config's ``prompt.template`` format string (no Jinja)."""

    def __init__(self, tokenizer: VLMTokenizer):
        self.tokenizer = tokenizer

    def ids(self, question: str, image=None, system: Optional[str] = None) -> list:
        """Prompt ids with one placeholder per image token (``image``: an ImageEmbedding)."""
        return self.tokenizer.build_prompt(question, image.num_tokens if image else 0, system)


class ChatPromptBuilder:
    """Prompt ids from the checkpoint's template, image expansion and one-piece tokenization.

    ``image_processor`` says what text stands for an encoded image (``image_prompt``);
    ``placeholder`` is what the template writes for it (``<image>``).
    """

    def __init__(self, tokenizer: VLMTokenizer, template: ChatTemplate, image_processor,
                 placeholder: str = '<image>'):
        self.tokenizer = tokenizer
        self.template = template
        self.image_processor = image_processor
        self.placeholder = placeholder

    def text(self, question: str, image=None, system: Optional[str] = None) -> str:
        """Return the prompt string (``image``: an ImageEmbedding, placeholder expanded)."""
        text = self.template.render(chat_messages(question, image is not None, system))
        if image is None:
            return text
        if self.placeholder not in text:
            raise ChatTemplateError(f'the chat template rendered no {self.placeholder!r} for '
                                    'the image; check prompt.chat_template')
        expansion = self.image_processor.image_prompt(image.grid, image.has_thumbnail)
        # the processor replaces placeholders one image at a time, in order
        return text.replace(self.placeholder, expansion, 1)

    def ids(self, question: str, image=None, system: Optional[str] = None) -> list:
        """Token ids of :meth:`text`, tokenized in one piece with special tokens."""
        return self.tokenizer.encode_prompt(self.text(question, image, system))


def prompt_builder(config, tokenizer: VLMTokenizer, image_processor):
    """Build the prompt builder the bundle config asks for (template or format string)."""
    p = config.prompt
    if not p.chat_template:
        return FormatPromptBuilder(tokenizer)
    return ChatPromptBuilder(tokenizer, ChatTemplate(p.chat_template, p.template_vars),
                             image_processor, p.image_token)
