"""Batched inference with the PyTorch encoder: texts in, ``(n, dim)`` float32 unit-norm embeddings out."""

from __future__ import annotations

import numpy as np
import torch

from xmctag.models.encoder import TextEncoder
from xmctag.models.fusion import ImageInputs
from xmctag.models.tokens import pad, pad_id_of, token_ids


@torch.inference_mode()
def encode_ids(encoder: TextEncoder, ids: list[list[int]], pad_id: int, batch_size: int = 256,
               device: str | torch.device = "cpu", progress=None, images: ImageInputs | None = None) -> np.ndarray:
    """Embeds pre-tokenised sequences. Batches are formed in length order (less padding); output in input order.

    ``images``: the items' image inputs (a ``FusedEncoder``), aligned with ``ids``; None: text only.
    """
    was_training = encoder.training
    encoder.eval()
    out = np.zeros((len(ids), encoder.dim), dtype=np.float32)
    order = np.argsort([len(x) for x in ids], kind="stable")
    for start in range(0, len(ids), batch_size):
        rows = order[start:start + batch_size]
        input_ids, mask = pad([ids[i] for i in rows], pad_id)
        extra = images.take(rows).tensors(device) if images is not None else {}
        with _autocast(device):
            emb = encoder(torch.from_numpy(input_ids).to(device), torch.from_numpy(mask).to(device),
                          **extra)["embedding"]
        out[rows] = emb.float().cpu().numpy()
        if progress is not None:
            progress(len(rows))
    encoder.train(was_training)
    return out


def encode_texts(encoder: TextEncoder, tokenizer, texts: list[str], max_length: int, batch_size: int = 256,
                 device: str | torch.device = "cpu", progress=None, images: ImageInputs | None = None) -> np.ndarray:
    has_image = images.has_image if images is not None else None
    return encode_ids(encoder, token_ids(tokenizer, texts, max_length, has_image), pad_id_of(tokenizer), batch_size,
                      device, progress, images)


def _autocast(device) -> torch.autocast:
    device_type = torch.device(device).type
    # bf16 autocast on GPU; on CPU fp32 (these CPUs have no fast bf16, and parity checks need fp32).
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=device_type == "cuda")
