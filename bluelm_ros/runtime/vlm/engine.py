"""BlueLM-V generation engine on ONNX Runtime (numpy + onnxruntime + tokenizers + OpenCV).

No torch at run time. The engine runs a bundle written by ``bluelm-ros vlm-export``:

* **Image path** (:class:`~bluelm_ros.runtime.vlm.image_encoder.ImageEncoder`): tiles ->
  vision graph -> image embeddings, cached by key (decoupled image encoding).
* **Text path** (:meth:`VLMEngine.generate`): chat template (the config's or the
  checkpoint's own, :mod:`~bluelm_ros.runtime.vlm.chat_template`) -> token embeddings with
  the image spliced in (:mod:`~bluelm_ros.runtime.vlm.prompt`) -> chunked prefill
  (``prefill_chunk`` tokens per decoder call) -> one token per decoder step ->
  greedy or temperature / top-k / top-p sampling, stop tokens and stop strings,
  ``max_new_tokens``, streaming callback, cancellation between tokens.
* **Prefix reuse**: the decoder (:mod:`~bluelm_ros.runtime.vlm.decoder`) keeps which
  tokens, and which image, its KV cache holds; a new prompt only prefills from its first
  difference, so several questions about the same frame pay the image + system prefix
  once. :meth:`VLMEngine.prepare` prefills that prefix before the question exists.

The decoder is a backend behind a small interface; ``decoder_factory`` picks it (default:
:func:`open_decoder`, the backend the bundle's manifest names for that decoder:
:class:`~bluelm_ros.runtime.vlm.kv_buffer_decoder.KVBufferDecoder` or
:class:`~bluelm_ros.runtime.vlm.gqa_decoder.GqaDecoder`).
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Optional, Sequence, Union

import numpy as np

from bluelm_ros.runtime.memory import limit_heap_retention, trim_heap
from bluelm_ros.runtime.vlm.bundle import Bundle, BundleError, EXPORT_COMMAND, MANIFEST_NAME
from bluelm_ros.runtime.vlm.chat_template import prompt_builder
from bluelm_ros.runtime.vlm.image_encoder import image_key, ImageEmbedding, ImageEncoder
from bluelm_ros.runtime.vlm.gqa_decoder import GqaDecoder
from bluelm_ros.runtime.vlm.kv_buffer_decoder import KVBufferDecoder
from bluelm_ros.runtime.vlm.results import (ContextOverflowError, GenerationResult,
                                            Interrupted, StreamCallback, Timings)
from bluelm_ros.runtime.vlm.sampling import sample_token, TextStream
from bluelm_ros.runtime.vlm.prompt import PromptEmbedder
from bluelm_ros.runtime.vlm.tokenizer import VLMTokenizer

# attention layout in the manifest -> the backend that runs it
DECODER_BACKENDS = {'kv_buffer': KVBufferDecoder.from_bundle, 'gqa': GqaDecoder.from_bundle}


def open_decoder(bundle: Bundle, precision: str, *args, **kwargs):
    """Open a bundle's decoder with the backend of its attention layout."""
    attention = bundle.decoder_attention(precision)
    if attention not in DECODER_BACKENDS:
        raise BundleError(f'{bundle.file(MANIFEST_NAME)}: decoder {precision} has attention '
                          f'{attention!r}; this runtime knows {sorted(DECODER_BACKENDS)}. '
                          f'Update bluelm_ros or re-export with `{EXPORT_COMMAND}`.')
    return DECODER_BACKENDS[attention](bundle, precision, *args, **kwargs)


class VLMEngine:
    """BlueLM-V on ONNX Runtime.

    Args:
        bundle: bundle folder or a :class:`~bluelm_ros.runtime.vlm.bundle.Bundle`.
        vision_precision / decoder_precision: which exported graphs to run
            (``int8``/``fp32`` and ``int4``/``fp32``).
        threads: ONNX Runtime intra-op threads (0 = all cores).
        prefill_chunk: prompt tokens per decoder call (the paper's 128).
        max_context: KV cache length in tokens (default: the config's
            ``max_position_embeddings``).
        tile_batch_size: tiles per vision call (default: the config's, 4).
        pad_tile_batches: zero-pad the last tile batch to ``tile_batch_size`` (a static
            shape for accelerators; wasted work on CPU).
        image_cache_size: encoded images kept (LRU).
        release_vision: the low-memory mode: free the vision session after each encoding,
            and the KV cache before a new image is encoded (never both resident).
        kv_block: KV buffers grow in steps of this many tokens (attention reads the whole
            buffer, so it should stay close to the used length).
        verify: bundle verification, ``sha256`` / ``size`` / ``none``.
        spinning / arena: ONNX Runtime thread spinning and memory arena (both off by default:
            the node shares the cores, and variable chunk shapes inflate an arena).
        low_memory: call :func:`limit_heap_retention` (lowest peak RSS, slower prefill).
        decoder_factory: ``(bundle, precision, max_context, kv_block, providers,
            **session_options) -> Decoder``; default :func:`open_decoder`.
    """

    def __init__(self, bundle: Union[str, Bundle], vision_precision: str = 'int8',
                 decoder_precision: str = 'int4', threads: int = 0, prefill_chunk: int = 128,
                 max_context: Optional[int] = None, tile_batch_size: Optional[int] = None,
                 pad_tile_batches: bool = False, image_cache_size: int = 4,
                 release_vision: bool = False, kv_block: int = 256, verify: str = 'sha256',
                 providers: Optional[list] = None, spinning: bool = False,
                 arena: bool = False, low_memory: bool = False,
                 decoder_factory: Callable = open_decoder):
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle(bundle, verify=verify)
        self.config = cfg = self.bundle.config
        if prefill_chunk < 1:
            raise ValueError('prefill_chunk must be >= 1')
        self.vision_precision = vision_precision
        self.decoder_precision = decoder_precision
        self.prefill_chunk = int(prefill_chunk)
        self.max_context = int(max_context or cfg.text.max_position_embeddings)
        if low_memory:
            limit_heap_retention()
        session_options = dict(threads=threads, spinning=spinning, arena=arena)
        self._open_decoder = lambda: decoder_factory(
            self.bundle, decoder_precision, self.max_context, kv_block, providers,
            **session_options)
        # fail now, not at the first question, if the bundle lacks or corrupts a part
        self.bundle.component_files('decoder', decoder_precision)
        if 'vision' in self.bundle.components:
            self.bundle.component_files('vision', vision_precision)
        self.tokenizer = VLMTokenizer(self.bundle.component_files('tokenizer')[0], cfg)
        self.prompts = PromptEmbedder(self.bundle)
        self._lock = threading.RLock()
        self.images = ImageEncoder(
            self.bundle, vision_precision, self._lock,
            tile_batch_size or cfg.image.tile_batch_size, pad_tile_batches, image_cache_size,
            release_vision, providers, **session_options)
        self.tiler = self.images.tiler
        self.prompt_builder = prompt_builder(cfg, self.tokenizer, self.tiler)
        self.decoder = None  # opened on first use (or load)

    # -- sessions ------------------------------------------------------------------

    def load(self, vision: bool = True) -> 'VLMEngine':
        """Create the sessions now (they are otherwise created on first use)."""
        with self._lock:
            if vision:
                self.images.load()
            self._decoder()
        return self

    def _decoder(self):
        if self.decoder is None:
            self.decoder = self._open_decoder()
        return self.decoder

    def release_vision_session(self) -> None:
        """Free the vision session (reloaded on the next :meth:`encode_image`)."""
        self.images.release()

    def close(self) -> None:
        """Free both sessions, the KV cache and the image cache."""
        with self._lock:
            if self.decoder is not None:
                self.decoder.close()
            self.decoder = None
            self.images.release()
            self.images.clear()
        trim_heap()

    # -- images ----------------------------------------------------------------------

    image_key = staticmethod(image_key)

    def cached_image(self, key: str) -> Optional[ImageEmbedding]:
        """Return an encoded image by key, or None if never encoded or evicted."""
        return self.images.cached(key)

    def encode_image(self, image: np.ndarray, key: Optional[str] = None,
                     bgr: bool = False) -> ImageEmbedding:
        """Tile and encode an ``H x W x 3`` uint8 image, or return the cached encoding."""
        return self._resolve_image(image, key, bgr)[0]

    def _make_room_for_vision(self) -> None:
        """Free the KV cache before a new image is encoded, in the low-memory mode.

        With ``release_vision`` a full KV cache and the vision graph are never resident
        together. It costs nothing when the new image's prompt follows (its prefix differs
        from the image on), only a re-prefill for a later question about an older frame.
        """
        if self.images.release_vision and self.decoder is not None:
            with self._lock:
                self.decoder.release()

    def _resolve_image(self, image, key, bgr, on_stage=None, cancel=None) -> tuple:
        """Return ``(ImageEmbedding or None, was_cached)``; encode an uncached image."""
        if isinstance(image, ImageEmbedding):
            return image, True
        if image is None and key is None:
            return None, False
        if key is None:
            key = self.image_key(np.asarray(image))
        hit = self.images.cached(key)
        if hit is not None:
            return hit, True
        if image is None:
            raise KeyError(f'image {key!r} is not encoded (or was evicted from the cache of '
                           f'{self.images.cache_size}); call encode_image first or pass '
                           f'the image')
        if on_stage is not None:
            on_stage('encoding')
        self._make_room_for_vision()
        return self.images.encode(image, key=key, bgr=bgr, cancel=cancel), False

    # -- prompt --------------------------------------------------------------------------

    def build_prompt(self, question: str, image: Optional[ImageEmbedding] = None,
                     system: Optional[str] = None) -> list:
        """Chat-template token ids with one placeholder per image token."""
        return self.prompt_builder.ids(question, image, system)

    def _check_fits(self, n_prompt: int, image: Optional[ImageEmbedding]) -> None:
        if n_prompt >= self.max_context:
            what = (f' ({image.num_tokens} of them image tokens from {image.num_tiles} tiles; '
                    f'lower image.max_tiles or pick smaller grids)') if image else ''
            raise ContextOverflowError(
                f'prompt of {n_prompt} tokens{what} does not fit the context of '
                f'{self.max_context} tokens (at least one token must be left to generate); '
                f'shorten the question/system prompt or raise max_context')

    # -- KV cache (held by the decoder) -------------------------------------------------

    def reset(self) -> None:
        """Forget the KV cache (the next prompt is prefilled from scratch)."""
        with self._lock:
            if self.decoder is not None:
                self.decoder.reset()

    @property
    def cached_tokens(self) -> int:
        """Tokens currently held in the KV cache."""
        return 0 if self.decoder is None else self.decoder.cached_tokens

    def prepare(self, image=None, image_key: Optional[str] = None,
                system: Optional[str] = None, bgr: bool = False,
                cancel: Optional[Callable[[], bool]] = None) -> int:
        """Encode the image and prefill the prompt up to its end, before the question.

        The next :meth:`generate` with the same image and system prompt reuses that KV
        prefix and only prefills the question. Cheap when that prefix is cached already.
        Returns the number of cached tokens. ``cancel`` (checked between tile batches and
        prefill chunks) makes it give way: :class:`Interrupted`, keeping what was done.
        """
        with self._lock:
            emb, _ = self._resolve_image(image, image_key, bgr, cancel=cancel)
            decoder = self._decoder()
            ids = self.build_prompt('', emb, system)
            # the prefix ends at the last image token: text after it merges with the
            # question when tokenized, so it is not final yet
            img = self.config.image_token_id
            last = max((i for i, t in enumerate(ids) if t == img), default=-1)
            ids = ids[:last + 1] if emb is not None else ids[:1]
            self._check_fits(len(ids), emb)
            decoder.prefill(self.prompts.embed(ids, emb), self.prompts.identities(ids, emb),
                            self.prefill_chunk, need_logits=False, cancel=cancel)
            if decoder.cached_tokens < len(ids):
                raise Interrupted(f'prefill gave way to a request after '
                                  f'{decoder.cached_tokens} of {len(ids)} tokens')
            return decoder.cached_tokens

    def teacher_forced_logits(self, prompt_ids: Sequence[int], continuation: Sequence[int],
                              image: Optional[ImageEmbedding] = None,
                              prefill_chunk: Optional[int] = None) -> np.ndarray:
        """Logits after the prompt and after each continuation token, ``[n + 1, vocab]``.

        For parity checks: feeds a reference continuation instead of sampling, so every
        step is compared on the same context. The KV cache is reset first.
        """
        with self._lock:
            decoder = self._decoder()
            decoder.reset()
            ids = list(prompt_ids)
            self._check_fits(len(ids) + len(continuation), image)
            logits = decoder.prefill(self.prompts.embed(ids, image),
                                     self.prompts.identities(ids, image),
                                     int(prefill_chunk or self.prefill_chunk)).logits
            out = [logits]
            for tok in continuation:
                out.append(decoder.step(self.prompts.embed([tok], None), [int(tok)]))
            return np.stack(out)

    # -- generation ------------------------------------------------------------------------------

    def generate(self, question: str, image=None, image_key: Optional[str] = None,
                 system: Optional[str] = None, bgr: bool = False,
                 on_stage: Optional[Callable[[str], None]] = None,
                 **kwargs) -> GenerationResult:
        """Answer ``question`` about an image.

        ``image``: ``H x W x 3`` uint8 array (encoded unless cached under ``image_key`` or
        its pixel hash), an :class:`ImageEmbedding`, or None with ``image_key`` of a frame
        already passed to :meth:`encode_image` (decoupled encoding). ``on_stage`` is told
        ``'encoding'`` (only when the image is encoded now) and ``'prefill'``. Other
        keyword arguments are those of :meth:`generate_ids`.
        """
        t0 = time.perf_counter()
        with self._lock:
            emb, cached = self._resolve_image(image, image_key, bgr, on_stage)
            ids = self.build_prompt(question, emb, system)
            if on_stage is not None:
                on_stage('prefill')
            res = self.generate_ids(ids, emb, _t0=t0, **kwargs)
            tm = res.timings
            if emb is not None:
                tm.image_cached = cached
                tm.image_encode_ms = 0.0 if cached else emb.encode_ms
                tm.image_tiles, tm.image_tokens = emb.num_tiles, emb.num_tokens
            return res

    def generate_ids(self, prompt_ids: Sequence[int], image: Optional[ImageEmbedding] = None,
                     max_new_tokens: int = 128, temperature: float = 0.0, top_k: int = 0,
                     top_p: float = 1.0, seed: Optional[int] = None,
                     stop_token_ids: Optional[Sequence[int]] = None,
                     stop_strings: Sequence[str] = (),
                     on_token: Optional[StreamCallback] = None,
                     cancel: Optional[Union[threading.Event, Callable[[], bool]]] = None,
                     prefill_chunk: Optional[int] = None, reuse_prefix: bool = True,
                     _t0: Optional[float] = None) -> GenerationResult:
        """Generate from prompt ids (image placeholders filled from ``image``).

        ``stop_token_ids`` default to the config's EOS ids (``[]``: never stop on a token).
        ``on_token(text_delta, token_id)`` is called after every generated token; return
        False from it to stop. ``cancel`` (an Event, or a callable returning True) is
        checked between tokens. Raises :class:`ContextOverflowError` when the prompt does
        not fit; generation that reaches the end of the context stops with
        ``stop_reason == "context_full"``.
        """
        t0 = _t0 if _t0 is not None else time.perf_counter()
        chunk = int(prefill_chunk or self.prefill_chunk)
        stops = set(self.config.eos_token_ids if stop_token_ids is None else stop_token_ids)
        rng = np.random.default_rng(seed)
        if isinstance(cancel, threading.Event):
            cancelled = cancel.is_set
        else:
            cancelled = cancel or (lambda: False)
        with self._lock:
            decoder = self._decoder()
            ids = list(prompt_ids)
            if not ids:
                raise ValueError('empty prompt')
            self._check_fits(len(ids), image)
            if not reuse_prefix:
                decoder.reset()
            tm = Timings(prompt_tokens=len(ids))
            embeds = self.prompts.embed(ids, image)
            t1 = time.perf_counter()
            logits, tm.reused_prefix_tokens = decoder.prefill(
                embeds, self.prompts.identities(ids, image), chunk)
            tm.prefill_ms = (time.perf_counter() - t1) * 1e3
            computed = len(ids) - tm.reused_prefix_tokens
            tm.prefill_tokens_per_second = computed / max(tm.prefill_ms, 1e-6) * 1e3

            stream = TextStream(self.tokenizer, stop_strings)
            tokens, reason = [], 'max_new_tokens'
            t2 = time.perf_counter()
            while len(tokens) < max_new_tokens:
                if cancelled():
                    reason = 'cancelled'
                    break
                if tokens:
                    if decoder.cached_tokens >= self.max_context:
                        reason = 'context_full'
                        break
                    logits = decoder.step(self.prompts.embed([tokens[-1]], None), [tokens[-1]])
                tok = sample_token(logits, temperature, top_k, top_p, rng)
                tokens.append(tok)
                if len(tokens) == 1:
                    tm.time_to_first_token_ms = (time.perf_counter() - t0) * 1e3
                if tok in stops:
                    reason = 'eos'
                    break
                delta = stream.push(tok)
                if on_token is not None and on_token(delta, tok) is False:
                    reason = 'cancelled'
                    break
                if stream.stopped:
                    reason = 'stop_string'
                    break
            rest = stream.finish()
            if rest and on_token is not None:
                on_token(rest, -1)
            tm.decode_ms = (time.perf_counter() - t2) * 1e3
            tm.generated_tokens = len(tokens)
            # the first token comes from the prefill logits: rate over the decode steps
            steps = max(len(tokens) - 1, 0)
            tm.tokens_per_second = steps / max(tm.decode_ms, 1e-6) * 1e3 if steps else 0.0
            return GenerationResult(text=stream.emitted, tokens=tokens, stop_reason=reason,
                                    timings=tm)
