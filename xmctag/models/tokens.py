"""Tokenisation shared by training, PyTorch inference and ONNX tagging, so that all three see the same ids.

Texts are cut to a character budget before tokenising (``clip_text``): a tokenizer builds every token of its input
before truncating to ``max_length``, so one 50 MB title would cost gigabytes and minutes for 128 tokens kept.
"""

from __future__ import annotations

import numpy as np

# A token covers at most this many characters of text: WordPiece turns a longer word into one [UNK], byte-level BPE
# merges are far shorter. max_length tokens never need more than max_length * (this + 1) characters.
MAX_CHARS_PER_TOKEN = 100


def clip_text(text: str, max_length: int) -> str:
    """``text`` cut to what ``max_length`` tokens can cover, at a whitespace when the cut falls inside a word of up
    to ``MAX_CHARS_PER_TOKEN`` characters, so that the tokens kept are the same as from the whole text."""
    budget = max_length * (MAX_CHARS_PER_TOKEN + 1)
    if len(text) <= budget:
        return text
    cut = text[:budget]
    space = max(cut.rfind(" "), cut.rfind("\n"), cut.rfind("\t"))
    return cut[:space] if space >= budget - MAX_CHARS_PER_TOKEN - 1 else cut


def token_ids(tokenizer, texts: list[str], max_length: int, has_image=None) -> list[list[int]]:
    """Unpadded ids (with the model's special tokens), truncated to ``max_length``.

    A decoder's ``PromptTokenizer`` (``xmctag.models.prompt``) builds its prompt template's ids instead; there
    ``has_image`` (per text, optional) adds the image prefix to the rows that have an image. Encoders ignore it.
    """
    texts = [clip_text(t, max_length) for t in texts]
    if hasattr(tokenizer, "prompt_ids"):
        return tokenizer.prompt_ids(texts, max_length, None if has_image is None else [bool(x) for x in has_image])
    return tokenizer(texts, max_length=max_length, truncation=True)["input_ids"]


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
