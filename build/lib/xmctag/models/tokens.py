"""Tokenisation shared by training, PyTorch inference and ONNX tagging, so that all three see the same ids."""

from __future__ import annotations

import numpy as np


def token_ids(tokenizer, texts: list[str], max_length: int, has_image=None) -> list[list[int]]:
    """Unpadded ids (with the model's special tokens), truncated to ``max_length``.

    A decoder's ``PromptTokenizer`` (``xmctag.models.prompt``) builds its prompt template's ids instead; there
    ``has_image`` (per text, optional) adds the image prefix to the rows that have an image. Encoders ignore it.
    """
    if hasattr(tokenizer, "prompt_ids"):
        return tokenizer.prompt_ids(texts, max_length, None if has_image is None else [bool(x) for x in has_image])
    return tokenizer(list(texts), max_length=max_length, truncation=True)["input_ids"]


def pad(ids: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ``input_ids`` and ``attention_mask``, ``(B, longest)`` int64 each."""
    longest = max(len(x) for x in ids)
    input_ids = np.full((len(ids), longest), pad_id, dtype=np.int64)
    mask = np.zeros((len(ids), longest), dtype=np.int64)
    for row, x in enumerate(ids):
        input_ids[row, : len(x)] = x
        mask[row, : len(x)] = 1
    return input_ids, mask


def pad_id_of(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
