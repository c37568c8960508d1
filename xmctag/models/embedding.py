"""The PyTorch encoder over token ids: batched inference (``encode_ids``, ``encode_texts``) and the training-time
forward pass that keeps the graph for backward (``embed_with_grad``). Both pad sequences in length order and return
rows in input order; both run under the same ``autocast`` (bf16 on a GPU, fp32 on a CPU)."""

from __future__ import annotations

import numpy as np
import torch

from xmctag.models.encoder import TextEncoder
from xmctag.models.image_inputs import ImageInputs
from xmctag.models.tokens import pad, pad_id_of, token_ids

CPU_CHUNK = 32  # sequences per forward pass when training on CPU (see embed_with_grad)


def autocast(device) -> torch.autocast:
    """bf16 autocast on a GPU; on a CPU fp32 (these CPUs have no fast bf16, and parity checks need fp32)."""
    device_type = torch.device(device).type
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=device_type == "cuda")


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
        with autocast(device):
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


def embed_with_grad(encoder: TextEncoder, ids: list[list[int]], pad_id: int, device,
                    images: ImageInputs | None = None) -> torch.Tensor:
    """Embeddings of ``ids`` in input order, keeping the graph for backward (the caller sets ``autocast``).

    On CPU the sequences go through in length-sorted chunks of ``CPU_CHUNK``: each chunk is padded only to its own
    longest sequence, which saves much of the work on short label texts and mixed-length titles. A GPU takes the
    whole batch at once (padding is cheap there, kernel launches are not).
    """
    chunk = len(ids) if device.type == "cuda" else CPU_CHUNK
    order = np.argsort([len(x) for x in ids], kind="stable")
    parts = []
    for start in range(0, len(ids), chunk):
        rows = order[start:start + chunk]
        input_ids, mask = pad([ids[i] for i in rows], pad_id)
        extra = images.take(rows).tensors(device) if images is not None else {}
        parts.append(encoder(torch.from_numpy(input_ids).to(device), torch.from_numpy(mask).to(device),
                             **extra)["embedding"])
    return torch.cat(parts)[torch.from_numpy(np.argsort(order)).to(device)]
