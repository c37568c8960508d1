"""``ImageInputs``: the image side of a set of items, as plain numpy data (no model, no torch at import).

``features`` ``(N, M, V)`` float32: the frozen vision encoder's pooled features (from the cache); ``mask`` ``(N, M)``
float32 0/1 (0: empty slot, missing, broken or never-embedded image). ``M`` is ``max_images``. Training builds them
(``xmctag.training.images``) and hands them to a ``FusedEncoder`` (``xmctag.models.fusion``) as ``tensors()``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class ImageInputs:
    """``features`` ``(N, M, V)`` float32 and ``mask`` ``(N, M)`` float32 0/1 of N items (see the module docstring)."""

    features: np.ndarray
    mask: np.ndarray

    def __len__(self) -> int:
        return len(self.mask)

    @property
    def has_image(self) -> np.ndarray:
        """``(N,)`` bool: the item has at least one usable image (decoders: its prompt has the image prefix)."""
        return self.mask.sum(axis=1) > 0

    def take(self, rows) -> "ImageInputs":
        rows = np.asarray(rows)
        return ImageInputs(self.features[rows], self.mask[rows])

    def tensors(self, device) -> dict:
        """The keyword arguments of ``FusedEncoder.forward`` (torch tensors on ``device``)."""
        import torch

        return {"image_embedding": torch.from_numpy(np.ascontiguousarray(self.features)).to(device),
                "image_mask": torch.from_numpy(np.ascontiguousarray(self.mask)).to(device)}
