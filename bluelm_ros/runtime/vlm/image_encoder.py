"""The image path of the engine: preprocessing, the vision graph, the encoded-image cache.

The bundle's image processor (BlueLM-V's dynamic-resolution tiling, or a converted
checkpoint's own: :mod:`~bluelm_ros.runtime.vlm.processors`) -> tiles encoded in batches
of ``tile_batch_size`` by the vision graph -> image embeddings in LLM space, kept in a
small LRU keyed by the caller's key (e.g. a frame id) or a hash of the pixels. This is
the paper's *decoupled image encoding*: encode when the frame arrives, answer when the
question arrives.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
import hashlib
import time
from typing import Callable, Optional

import numpy as np

from bluelm_ros.runtime.memory import trim_heap
from bluelm_ros.runtime.ort_session import create_session
from bluelm_ros.runtime.vlm.bundle import Bundle, EXPORT_COMMAND
from bluelm_ros.runtime.vlm.dynamic_resolution import tile_batches
from bluelm_ros.runtime.vlm.processors import build_image_processor
from bluelm_ros.runtime.vlm.results import Interrupted


@dataclass
class ImageEmbedding:
    """Encoded image: ``embeds`` ``[num_tokens, hidden]`` float32 in LLM space."""

    key: str
    embeds: np.ndarray
    grid: tuple
    num_tiles: int
    image_size: tuple
    encode_ms: float
    has_thumbnail: bool = False  # the last tile is a global view (its prompt text differs)

    @property
    def num_tokens(self) -> int:
        """Image tokens in the prompt."""
        return int(self.embeds.shape[0])


def image_key(image: np.ndarray) -> str:
    """Content key of an image (hash of shape + pixels)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((image.shape, image.dtype.str)).encode())
    h.update(np.ascontiguousarray(image).data)
    return h.hexdigest()


class ImageEncoder:
    """The vision graph of a bundle, with an LRU of encoded images.

    ``release_vision``: free the vision session after each encoding (reloaded on the
    next image) to cut peak memory. ``lock``: the engine's, so an encoding and a
    generation never run at the same time.
    """

    def __init__(self, bundle: Bundle, precision: str, lock, tile_batch_size: int,
                 pad_tile_batches: bool = False, cache_size: int = 4,
                 release_vision: bool = False, providers=None, **session_options):
        self.bundle, self.precision = bundle, precision
        self.tiler = build_image_processor(bundle.config)
        self.tile_batch_size = int(tile_batch_size)
        self.pad_tile_batches = pad_tile_batches
        self.cache_size = max(1, int(cache_size))
        self.release_vision = release_vision
        self._providers, self._session_options = providers, session_options
        self._lock = lock
        self._session = None
        self._cache = OrderedDict()

    @property
    def loaded(self) -> bool:
        """Whether the vision session is open now."""
        return self._session is not None

    def load(self):
        """Create the vision session now (it is otherwise created on first use)."""
        if self._session is None:
            path = self.bundle.component_files('vision', self.precision)[0]
            self._session, _ = create_session(
                path, self._providers, fix_hint=f'Re-export the bundle with '
                f'`{EXPORT_COMMAND}`.', **self._session_options)
            self._io = self.bundle.vision_io(self.precision)
        return self._session

    def release(self) -> None:
        """Free the vision session (reloaded on the next :meth:`encode`)."""
        self._session = None
        trim_heap()

    def clear(self) -> None:
        """Forget every encoded image."""
        with self._lock:
            self._cache.clear()

    def cached(self, key: str) -> Optional[ImageEmbedding]:
        """Return an encoded image by key, or None if never encoded or evicted."""
        with self._lock:
            emb = self._cache.get(key)
            if emb is not None:
                self._cache.move_to_end(key)
            return emb

    def encode(self, image: np.ndarray, key: Optional[str] = None,
               bgr: bool = False, cancel: Optional[Callable[[], bool]] = None
               ) -> ImageEmbedding:
        """Tile and encode an ``H x W x 3`` uint8 image, or return the cached encoding.

        ``key`` identifies the frame; default: a hash of the pixels. ``cancel`` is checked
        between tile batches: :class:`Interrupted` when it returns True (nothing cached).
        """
        key = key if key is not None else image_key(np.asarray(image))
        hit = self.cached(key)
        if hit is not None:
            return hit
        with self._lock:
            t0 = time.perf_counter()
            tiled = self.tiler(image, bgr=bgr)
            session = self.load()
            outs = []
            for batch, n in tile_batches(tiled.tiles, self.tile_batch_size,
                                         self.pad_tile_batches):
                if cancel is not None and cancel():
                    raise Interrupted('image encoding gave way to a request')
                outs.append(session.run([self._io.image_embeds],
                                        {self._io.pixel_values: batch})[0][:n])
            hidden = self.bundle.config.text.hidden_size
            embeds = np.concatenate(outs).reshape(-1, hidden)
            if self.release_vision:
                self.release()
            emb = ImageEmbedding(key=key, embeds=embeds, grid=tiled.grid,
                                 num_tiles=tiled.num_tiles, image_size=tiled.image_size,
                                 encode_ms=(time.perf_counter() - t0) * 1e3,
                                 has_thumbnail=tiled.has_thumbnail)
            self._cache[key] = emb
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            return emb
