"""Prompt ids -> what the decoder takes: token embeddings with the image spliced in.

Token embeddings are rows of the bundle's ``embed_tokens.npy`` (memory-mapped: only the
rows used become resident); the image placeholders get the image's embeddings. Each token
also gets an *identity* for the decoder's prefix reuse: its id, or ``(image key, index)``
for an image token, since every placeholder has the same id.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from bluelm_ros.runtime.vlm.bundle import Bundle, BundleError, EMBED_NAME
from bluelm_ros.runtime.vlm.image_encoder import ImageEmbedding


class PromptEmbedder:
    """The token embedding table of a bundle, and the image token id of its config."""

    def __init__(self, bundle: Bundle):
        text = bundle.config.text
        self.image_token_id = bundle.config.image_token_id
        self.table = np.load(bundle.component_files('embeddings')[0], mmap_mode='r')
        if self.table.shape != (text.vocab_size, text.hidden_size):
            raise BundleError(f'{bundle.file(EMBED_NAME)}: shape {self.table.shape} does '
                              f'not match the config. Re-export the bundle.')

    def identities(self, ids: Sequence[int], image: Optional[ImageEmbedding]) -> list:
        """Return per token what makes two prompts share a prefix (id, or image key + index)."""
        out, j = [], 0
        for t in ids:
            if t == self.image_token_id and image is not None:
                out.append((image.key, j))
                j += 1
            else:
                out.append(int(t))
        return out

    def embed(self, ids: Sequence[int], image: Optional[ImageEmbedding]) -> np.ndarray:
        """``[len(ids), hidden]`` float32: token embeddings, image embeddings spliced in."""
        ids = np.asarray(ids, dtype=np.int64)
        out = self.table[ids].astype(np.float32)
        slots = np.flatnonzero(ids == self.image_token_id)
        n_img = 0 if image is None else image.num_tokens
        if len(slots) != n_img:
            raise ValueError(f'{len(slots)} image placeholder tokens but {n_img} image '
                             f'embeddings')
        if n_img:
            out[slots] = image.embeds
        return out
