"""BlueLM-V generation engine on ONNX Runtime (numpy + onnxruntime + tokenizers + OpenCV).

No torch at run time. The engine runs a bundle written by :mod:`bluelm_ros.tools.vlm.export`:

* **Image path** (:meth:`VLMEngine.encode_image`): dynamic-resolution tiling ->
  tiles encoded in batches of ``tile_batch_size`` by the vision graph -> image embeddings,
  kept in a small LRU keyed by the caller's key (e.g. the frame stamp) or a hash of the
  pixels. This is the paper's *decoupled image encoding*: encode when the frame arrives,
  answer when the question arrives. ``release_vision=True`` frees the vision session after
  each encoding to cut peak memory (it is reloaded on the next image).
* **Text path** (:meth:`VLMEngine.generate`): chat template -> token embeddings (numpy
  lookup in the memory-mapped table) with the image embeddings spliced in -> chunked
  prefill (``prefill_chunk`` tokens per decoder call) -> decode one token per call with
  the KV cache -> greedy or temperature / top-k / top-p sampling, stop tokens and stop
  strings, ``max_new_tokens``, streaming callback, cancellation between tokens.
* **Prefix reuse**: the KV buffers remember which tokens (and which image) they hold;
  a new prompt only prefills from its first difference, so several questions about the
  same frame pay the image + system prefix once. :meth:`VLMEngine.prepare` prefills that
  prefix before the question exists.

KV cache: one buffer per layer and K/V, ``[1, kv_heads, capacity, head_dim]``, owned by
the engine; the decoder graph reads it in place and returns only the new tokens' K/V,
which are written into their slots (see the export module for the graph contract).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass, field
import gc
import hashlib
import logging
import threading
import time
from typing import Callable, Optional, Sequence, Union

import numpy as np

from bluelm_ros.runtime.vlm.bundle import Bundle, BundleError
from bluelm_ros.runtime.vlm.dynamic_resolution import DynamicResolution, tile_batches
from bluelm_ros.runtime.vlm.tokenizer import VLMTokenizer

log = logging.getLogger(__name__)

StreamCallback = Callable[[str, int], Optional[bool]]


def trim_heap() -> None:
    """Return freed heap memory to the OS (glibc ``malloc_trim``; no-op elsewhere).

    A released session's buffers go back to malloc, which keeps them mapped: measured on
    the 3B bundle, RSS stayed 250 MB higher after freeing the INT8 ViT until trimmed, and
    that sat under the LLM's load-time peak.
    """
    global _libc
    if _libc is None:
        try:
            import ctypes
            _libc = ctypes.CDLL('libc.so.6')
            _libc.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        gc.collect()
        _libc.malloc_trim(0)


_libc = None
_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def limit_heap_retention(threshold: int = 1 << 20) -> bool:
    """Serve allocations above ``threshold`` bytes with mmap, returned to the OS on free.

    glibc otherwise raises its mmap threshold to the largest block freed (up to 32 MB), so
    the per-layer attention buffers of a prefill end up on a heap that only grows. Measured
    on the 3B INT4 decoder (1024-token prefill): peak RSS 2.31 GB -> 1.87 GB, prefill ~15%
    slower (page faults). Process-wide (same as ``MALLOC_MMAP_THRESHOLD_``); glibc only.
    """
    trim_heap()
    if not _libc:
        return False
    return bool(_libc.mallopt(_M_MMAP_THRESHOLD, int(threshold)))


class ContextOverflowError(ValueError):
    """The prompt does not fit in the context window; the message says by how much."""


@dataclass
class ImageEmbedding:
    """Encoded image: ``embeds`` ``[num_tokens, hidden]`` float32 in LLM space."""

    key: str
    embeds: np.ndarray
    grid: tuple
    num_tiles: int
    image_size: tuple
    encode_ms: float

    @property
    def num_tokens(self) -> int:
        """Image tokens in the prompt."""
        return int(self.embeds.shape[0])


@dataclass
class Timings:
    """Where the time of one :meth:`VLMEngine.generate` call went."""

    image_encode_ms: float = 0.0
    image_cached: bool = False
    image_tiles: int = 0
    image_tokens: int = 0
    prompt_tokens: int = 0
    reused_prefix_tokens: int = 0
    prefill_ms: float = 0.0
    prefill_tokens_per_second: float = 0.0
    time_to_first_token_ms: float = 0.0
    decode_ms: float = 0.0
    generated_tokens: int = 0
    tokens_per_second: float = 0.0

    def as_dict(self) -> dict:
        """Return a plain dict (for JSON and ROS messages)."""
        return asdict(self)


@dataclass
class GenerationResult:
    """Output of :meth:`VLMEngine.generate`.

    ``stop_reason``: ``eos``, ``stop_string``, ``max_new_tokens``, ``cancelled`` or
    ``context_full``. ``tokens`` are the generated ids (a stop token included).
    """

    text: str
    tokens: list
    stop_reason: str
    timings: Timings = field(default_factory=Timings)


# ---------------------------------------------------------------------------
# sampling


def sample_token(logits: np.ndarray, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, rng: Optional[np.random.Generator] = None) -> int:
    """Pick the next token from ``[vocab]`` logits.

    ``temperature <= 0`` is greedy (argmax). Otherwise logits are divided by the
    temperature, restricted to the ``top_k`` best (0 = all) and then to the smallest set
    whose probability reaches ``top_p``, and sampled with ``rng``.
    """
    logits = np.asarray(logits, dtype=np.float64).reshape(-1)
    if temperature <= 0:
        return int(np.argmax(logits))
    rng = rng or np.random.default_rng()
    z = logits / temperature
    if 0 < top_k < z.size:
        idx = np.argpartition(-z, top_k - 1)[:top_k]
    else:
        idx = np.arange(z.size)
    z = z[idx]
    order = np.argsort(-z, kind='stable')
    idx, z = idx[order], z[order]
    p = np.exp(z - z[0])
    p /= p.sum()
    if top_p < 1.0:
        # keep tokens until the cumulative probability reaches top_p (at least one)
        keep = int(np.searchsorted(np.cumsum(p), top_p) + 1)
        idx, p = idx[:keep], p[:keep] / p[:keep].sum()
    return int(idx[rng.choice(idx.size, p=p)])


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that starts some stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


class _TextStream:
    """Turn generated ids into text deltas whose concatenation is the final text.

    Text that may still change is held back: a trailing U+FFFD (an incomplete UTF-8
    character) and any suffix that could be the start of a stop string.
    """

    def __init__(self, tokenizer: VLMTokenizer, stop_strings: Sequence[str]):
        self.tokenizer = tokenizer
        self.stops = [s for s in stop_strings if s]
        self.ids = []
        self.emitted = ''
        self.stopped = False

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids)

    def push(self, token_id: int) -> str:
        """Add a generated id; return the new final text (may be empty)."""
        self.ids.append(int(token_id))
        text = self._text()
        cut = [text.find(s) for s in self.stops]
        cut = [c for c in cut if c >= 0 and c >= len(self.emitted)]
        if cut:
            self.stopped = True
            return self._emit(text[:min(cut)])
        stable = text.rstrip('\ufffd')
        return self._emit(stable[:len(stable) - _held_back(stable, self.stops)])

    def finish(self) -> str:
        """Flush what was held back (not after a stop string)."""
        return '' if self.stopped else self._emit(self._text())

    def _emit(self, upto: str) -> str:
        if not upto.startswith(self.emitted) or len(upto) <= len(self.emitted):
            return ''
        new, self.emitted = upto[len(self.emitted):], upto
        return new


# ---------------------------------------------------------------------------
# engine


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
        release_vision: free the vision session after each encoding.
        kv_block: KV buffers grow in steps of this many tokens (attention reads the whole
            buffer, so it should stay close to the used length).
        verify: bundle verification, ``sha256`` / ``size`` / ``none``.
        spinning / arena: ONNX Runtime thread spinning and memory arena (both off by default:
            the node shares the cores, and variable chunk shapes inflate an arena).
        low_memory: call :func:`limit_heap_retention` (lowest peak RSS, slower prefill).
    """

    def __init__(self, bundle: Union[str, Bundle], vision_precision: str = 'int8',
                 decoder_precision: str = 'int4', threads: int = 0, prefill_chunk: int = 128,
                 max_context: Optional[int] = None, tile_batch_size: Optional[int] = None,
                 pad_tile_batches: bool = False, image_cache_size: int = 4,
                 release_vision: bool = False, kv_block: int = 256, verify: str = 'sha256',
                 providers: Optional[list] = None, spinning: bool = False,
                 arena: bool = False, low_memory: bool = False):
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle(bundle, verify=verify)
        self.config = cfg = self.bundle.config
        if prefill_chunk < 1:
            raise ValueError('prefill_chunk must be >= 1')
        self.vision_precision = vision_precision
        self.decoder_precision = decoder_precision
        self.prefill_chunk = int(prefill_chunk)
        self.max_context = int(max_context or cfg.text.max_position_embeddings)
        self.kv_block = max(1, int(kv_block))
        self.tile_batch_size = int(tile_batch_size or cfg.image.tile_batch_size)
        self.pad_tile_batches = pad_tile_batches
        self.release_vision = release_vision
        self.image_cache_size = max(1, int(image_cache_size))
        self._session_opts = dict(threads=threads, spinning=spinning, arena=arena)
        if low_memory:
            limit_heap_retention()
        self._providers = providers
        # fail now, not at the first question, if the bundle lacks or corrupts a part
        self.bundle.component_files('decoder', decoder_precision)
        if 'vision' in self.bundle.components:
            self.bundle.component_files('vision', vision_precision)
        self.tokenizer = VLMTokenizer(self.bundle.component_files('tokenizer')[0], cfg)
        self.tiler = DynamicResolution.from_config(cfg)
        self.embed_table = np.load(self.bundle.component_files('embeddings')[0], mmap_mode='r')
        if self.embed_table.shape != (cfg.text.vocab_size, cfg.text.hidden_size):
            raise BundleError(f'{self.bundle.file("embed_tokens.npy")}: shape '
                              f'{self.embed_table.shape} does not match the config. '
                              f'Re-export the bundle.')
        self._vision = None
        self._decoder = None
        self._images = OrderedDict()
        self._lock = threading.RLock()
        self._kv = {}        # past input name -> [1, heads, capacity, d] view of the store
        self._kv_store = {}  # past input name -> flat array of max_context slots
        self._mask = np.zeros((1, 0), np.int64)
        self._cached = []  # identity of the token in each filled KV slot

    # -- sessions ------------------------------------------------------------------

    def _session(self, component: str, precision: str):
        from bluelm_ros.runtime.ort_session import create_session
        path = self.bundle.component_files(component, precision)[0]
        sess, _ = create_session(
            path, self._providers, fix_hint='Re-export the bundle with '
            '`bluelm-ros vlm-export`.', **self._session_opts)
        return sess

    def load(self, vision: bool = True) -> 'VLMEngine':
        """Create the sessions now (they are otherwise created on first use)."""
        if vision:
            self._vision_session()
        self._decoder_session()
        return self

    def _vision_session(self):
        if self._vision is None:
            self._vision = self._session('vision', self.vision_precision)
        return self._vision

    def _decoder_session(self):
        if self._decoder is None:
            sess = self._session('decoder', self.decoder_precision)
            self._past_names = [i.name for i in sess.get_inputs()
                                if i.name.startswith('past_key_values.')]
            self._present_names = [n.replace('past_key_values.', 'present.', 1)
                                   for n in self._past_names]
            self._kv_specs = {}
            for i in sess.get_inputs():
                if i.name in self._past_names:
                    dtype = {'tensor(float16)': np.float16,
                             'tensor(int8)': np.int8}.get(i.type, np.float32)
                    self._kv_specs[i.name] = (i.shape[1], i.shape[3], dtype)
            self._decoder = sess
            self.reset()
            trim_heap()  # weight prepacking leaves freed staging buffers behind
        return self._decoder

    def release_vision_session(self) -> None:
        """Free the vision session (reloaded on the next :meth:`encode_image`)."""
        self._vision = None
        trim_heap()

    def close(self) -> None:
        """Free both sessions, the KV cache and the image cache."""
        with self._lock:
            self._vision = None
            self._decoder = None
            self._kv = {}
            self._kv_store = {}
            self._mask = np.zeros((1, 0), np.int64)
            self._cached = []
            self._images.clear()
        trim_heap()

    # -- images ----------------------------------------------------------------------

    @staticmethod
    def image_key(image: np.ndarray) -> str:
        """Content key of an image (hash of shape + pixels)."""
        h = hashlib.blake2b(digest_size=16)
        h.update(repr((image.shape, image.dtype.str)).encode())
        h.update(np.ascontiguousarray(image).data)
        return h.hexdigest()

    def cached_image(self, key: str) -> Optional[ImageEmbedding]:
        """Return an encoded image by key, or None if never encoded or evicted."""
        with self._lock:
            emb = self._images.get(key)
            if emb is not None:
                self._images.move_to_end(key)
            return emb

    def encode_image(self, image: np.ndarray, key: Optional[str] = None,
                     bgr: bool = False) -> ImageEmbedding:
        """Tile and encode an ``H x W x 3`` uint8 image, or return the cached encoding.

        ``key`` identifies the frame (e.g. its ROS stamp); default: a hash of the pixels.
        """
        key = key if key is not None else self.image_key(np.asarray(image))
        hit = self.cached_image(key)
        if hit is not None:
            return hit
        with self._lock:
            t0 = time.perf_counter()
            tiled = self.tiler(image, bgr=bgr)
            sess = self._vision_session()
            outs = []
            for batch, n in tile_batches(tiled.tiles, self.tile_batch_size,
                                         self.pad_tile_batches):
                outs.append(sess.run(None, {'pixel_values': batch})[0][:n])
            embeds = np.concatenate(outs).reshape(-1, self.config.text.hidden_size)
            if self.release_vision:
                self._vision = None
                trim_heap()
            emb = ImageEmbedding(key=key, embeds=embeds, grid=tiled.grid,
                                 num_tiles=tiled.num_tiles, image_size=tiled.image_size,
                                 encode_ms=(time.perf_counter() - t0) * 1e3)
            self._images[key] = emb
            while len(self._images) > self.image_cache_size:
                self._images.popitem(last=False)
            return emb

    def _resolve_image(self, image, image_key, bgr) -> tuple:
        """Return ``(ImageEmbedding or None, was_cached)``."""
        if isinstance(image, ImageEmbedding):
            return image, True
        if image is None:
            if image_key is None:
                return None, False
            emb = self.cached_image(image_key)
            if emb is None:
                raise KeyError(f'image {image_key!r} is not encoded (or was evicted from the '
                               f'cache of {self.image_cache_size}); call encode_image first '
                               f'or pass the image')
            return emb, True
        key = image_key if image_key is not None else self.image_key(np.asarray(image))
        hit = self.cached_image(key)
        if hit is not None:
            return hit, True
        return self.encode_image(image, key=key, bgr=bgr), False

    # -- prompt --------------------------------------------------------------------------

    def build_prompt(self, question: str, image: Optional[ImageEmbedding] = None,
                     system: Optional[str] = None) -> list:
        """Chat-template token ids with one placeholder per image token."""
        return self.tokenizer.build_prompt(question, image.num_tokens if image else 0, system)

    def _identities(self, ids: Sequence[int], image: Optional[ImageEmbedding]) -> list:
        # image placeholders are equal ids; what makes two prompts share a prefix is the
        # same image, so those slots are identified by (image key, index)
        img, out, j = self.config.image_token_id, [], 0
        for t in ids:
            if t == img and image is not None:
                out.append((image.key, j))
                j += 1
            else:
                out.append(int(t))
        return out

    def _embed(self, ids: Sequence[int], image: Optional[ImageEmbedding]) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        out = self.embed_table[ids].astype(np.float32)
        slots = np.flatnonzero(ids == self.config.image_token_id)
        n_img = 0 if image is None else image.num_tokens
        if len(slots) != n_img:
            raise ValueError(f'{len(slots)} image placeholder tokens but {n_img} image '
                             f'embeddings')
        if n_img:
            out[slots] = image.embeds
        return out

    # -- KV cache ----------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the KV cache (the next prompt is prefilled from scratch)."""
        with self._lock:
            self._cached = []
            self._mask = np.zeros((1, 0), np.int64)  # views are re-cut on the next step

    @property
    def cached_tokens(self) -> int:
        """Tokens currently held in the KV cache."""
        return len(self._cached)

    def _ensure_capacity(self, n: int) -> None:
        """Make the KV buffers hold at least ``n`` slots (rounded up to ``kv_block``).

        The graph attends over the whole buffer it is given, so the buffer handed to it
        should be just above the filled length. Each K/V lives in one flat allocation of
        ``max_context`` slots (untouched pages cost no RSS); the ``[1, heads, cap, d]``
        view fed to ONNX Runtime is contiguous, and growing it moves each head's filled
        slots to its new offset in place: no second buffer, no copy of the whole cache.
        """
        cap = self._mask.shape[1]
        if n <= cap:
            return
        new = min(self.max_context, -(-n // self.kv_block) * self.kv_block)
        used = len(self._cached)
        for name, (hkv, d, dtype) in self._kv_specs.items():
            store = self._kv_store.get(name)
            if store is None:
                store = self._kv_store[name] = np.zeros(hkv * self.max_context * d, dtype)
            if used:
                old = store[:hkv * cap * d].reshape(hkv, cap * d)
                # last head first: a head's new slots only overlap heads already moved
                for h in range(hkv - 1, 0, -1):
                    store[h * new * d:h * new * d + used * d] = old[h, :used * d]
            self._kv[name] = store[:hkv * new * d].reshape(1, hkv, new, d)
        mask = np.zeros((1, new), np.int64)
        mask[:, :used] = 1
        self._mask = mask

    def _forward(self, embeds: np.ndarray, identities: list) -> np.ndarray:
        """Run new tokens through the decoder at the end of the cache; return last logits."""
        start, t = len(self._cached), embeds.shape[0]
        self._ensure_capacity(start + t)
        feed = {'inputs_embeds': embeds[None],
                'position_ids': np.arange(start, start + t, dtype=np.int64)[None],
                'attention_mask': self._mask}
        feed.update(self._kv)
        outs = self._decoder.run(['logits'] + self._present_names, feed)
        for name, new in zip(self._past_names, outs[1:]):
            self._kv[name][:, :, start:start + t] = new
        self._mask[:, start:start + t] = 1
        self._cached.extend(identities)
        return outs[0][0, -1]

    def _prefill(self, embeds: np.ndarray, identities: list, chunk: int,
                 need_logits: bool = True) -> tuple:
        """Prefill after reusing the longest cached prefix; return ``(logits, reused)``."""
        n = len(identities)
        reused = 0
        # the last prompt token must run again when its logits are needed
        limit = min(len(self._cached), n - 1 if need_logits else n)
        while reused < limit and self._cached[reused] == identities[reused]:
            reused += 1
        del self._cached[reused:]
        self._mask[:, reused:] = 0
        logits = None
        for i in range(reused, n, chunk):
            logits = self._forward(embeds[i:i + chunk], identities[i:i + chunk])
        return logits, reused

    def teacher_forced_logits(self, prompt_ids: Sequence[int], continuation: Sequence[int],
                              image: Optional[ImageEmbedding] = None,
                              prefill_chunk: Optional[int] = None) -> np.ndarray:
        """Logits after the prompt and after each continuation token, ``[n + 1, vocab]``.

        For parity checks: feeds a reference continuation instead of sampling, so every
        step is compared on the same context. The KV cache is reset first.
        """
        with self._lock:
            self._decoder_session()
            self.reset()
            ids = list(prompt_ids)
            self._check_fits(len(ids) + len(continuation), image)
            logits, _ = self._prefill(self._embed(ids, image), self._identities(ids, image),
                                      int(prefill_chunk or self.prefill_chunk))
            out = [logits]
            for tok in continuation:
                out.append(self._forward(self._embed([tok], None), [int(tok)]))
            return np.stack(out)

    # -- generation ------------------------------------------------------------------------------

    def prepare(self, image=None, image_key: Optional[str] = None,
                system: Optional[str] = None, bgr: bool = False) -> int:
        """Encode the image and prefill the prompt up to its end, before the question.

        The next :meth:`generate` with the same image and system prompt reuses that KV
        prefix and only prefills the question. Returns the number of cached tokens.
        """
        with self._lock:
            emb, _ = self._resolve_image(image, image_key, bgr)
            self._decoder_session()
            ids = self.build_prompt('', emb, system)
            # the prefix ends at the last image token: text after it merges with the
            # question when tokenized, so it is not final yet
            img = self.config.image_token_id
            last = max((i for i, t in enumerate(ids) if t == img), default=-1)
            ids = ids[:last + 1] if emb is not None else ids[:1]
            self._check_fits(len(ids), emb)
            self._prefill(self._embed(ids, emb), self._identities(ids, emb),
                          self.prefill_chunk, need_logits=False)
            return len(self._cached)

    def _check_fits(self, n_prompt: int, image: Optional[ImageEmbedding]) -> None:
        if n_prompt >= self.max_context:
            what = (f' ({image.num_tokens} of them image tokens from {image.num_tiles} tiles; '
                    f'lower image.max_tiles or pick smaller grids)') if image else ''
            raise ContextOverflowError(
                f'prompt of {n_prompt} tokens{what} does not fit the context of '
                f'{self.max_context} tokens (at least one token must be left to generate); '
                f'shorten the question/system prompt or raise max_context')

    def generate(self, question: str, image=None, image_key: Optional[str] = None,
                 system: Optional[str] = None, bgr: bool = False,
                 **kwargs) -> GenerationResult:
        """Answer ``question`` about an image.

        ``image``: ``H x W x 3`` uint8 array (encoded unless cached), an
        :class:`ImageEmbedding`, or None with ``image_key`` of a frame already passed to
        :meth:`encode_image` (decoupled encoding). Other keyword arguments are those of
        :meth:`generate_ids`.
        """
        t0 = time.perf_counter()
        with self._lock:
            emb, cached = self._resolve_image(image, image_key, bgr)
            ids = self.build_prompt(question, emb, system)
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
            self._decoder_session()
            ids = list(prompt_ids)
            if not ids:
                raise ValueError('empty prompt')
            self._check_fits(len(ids), image)
            if not reuse_prefix:
                self.reset()
            tm = Timings(prompt_tokens=len(ids))
            embeds = self._embed(ids, image)
            t1 = time.perf_counter()
            logits, tm.reused_prefix_tokens = self._prefill(
                embeds, self._identities(ids, image), chunk)
            tm.prefill_ms = (time.perf_counter() - t1) * 1e3
            computed = len(ids) - tm.reused_prefix_tokens
            tm.prefill_tokens_per_second = computed / max(tm.prefill_ms, 1e-6) * 1e3

            stream = _TextStream(self.tokenizer, stop_strings)
            tokens, reason = [], 'max_new_tokens'
            t2 = time.perf_counter()
            while len(tokens) < max_new_tokens:
                if cancelled():
                    reason = 'cancelled'
                    break
                if tokens:
                    if len(self._cached) >= self.max_context:
                        reason = 'context_full'
                        break
                    logits = self._forward(self._embed([tokens[-1]], None), [tokens[-1]])
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
