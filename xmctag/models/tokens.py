"""Tokenisation shared by training, PyTorch inference and ONNX tagging, so that all three see the same ids."""

from __future__ import annotations

import numpy as np


def token_ids(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """Unpadded ids (with the model's special tokens), truncated to ``max_length``.

    A decoder's ``PromptTokenizer`` (``xmctag.models.prompt``) builds its prompt template's ids instead.
    """
    if hasattr(tokenizer, "prompt_ids"):
        return tokenizer.prompt_ids(texts, max_length)
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
