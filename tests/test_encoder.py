"""The encoder: pooling, batch/padding invariance, the extra-token seam, and chunked training embeddings."""

import numpy as np
import pytest
import torch

from xmctag import UserError
from xmctag.models.embedding import embed_with_grad
from xmctag.models.encoder import TextEncoder, mean_pool
from xmctag.models.registry import load_pretrained
from xmctag.models.tokens import pad, pad_id_of, token_ids

TEXTS = ["red shirt", "a rather long title of blue jeans for men with many words in it", "cap", "green bag"]


@pytest.fixture(scope="module")
def model(tiny_encoder_dir):
    tokenizer, backbone = load_pretrained(tiny_encoder_dir)
    return TextEncoder(backbone).eval(), tokenizer


def embed(encoder, tokenizer, texts, **extra):
    ids, mask = pad(token_ids(tokenizer, texts, 32), pad_id_of(tokenizer))
    with torch.no_grad():
        return encoder(torch.from_numpy(ids), torch.from_numpy(mask), **extra)["embedding"].numpy()


def test_mean_pool_ignores_padding():
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 4.0], [100.0, 100.0]]])
    pooled = mean_pool(hidden, torch.tensor([[1, 1, 0]]))
    np.testing.assert_allclose(pooled.numpy(), [[2.0, 2.0]], atol=1e-6)


def test_embedding_does_not_depend_on_batch_neighbours(model):
    encoder, tokenizer = model
    together = embed(encoder, tokenizer, TEXTS)
    alone = np.vstack([embed(encoder, tokenizer, [t]) for t in TEXTS])
    np.testing.assert_allclose(together, alone, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-6)


def test_masked_extra_token_changes_nothing_and_unmasked_one_does(model):
    encoder, tokenizer = model
    extra = torch.randn(len(TEXTS), 1, encoder.dim)
    text_only = embed(encoder, tokenizer, TEXTS)
    masked = embed(encoder, tokenizer, TEXTS, extra_embeds=extra, extra_mask=torch.zeros(len(TEXTS), 1))
    np.testing.assert_allclose(masked, text_only, atol=1e-5)
    fused = embed(encoder, tokenizer, TEXTS, extra_embeds=extra, extra_mask=torch.ones(len(TEXTS), 1))
    assert np.abs(fused - text_only).max() > 1e-3


def test_chunked_training_embeddings_equal_whole_batch(model):
    encoder, tokenizer = model
    ids = token_ids(tokenizer, TEXTS * 20, 32)
    chunked = embed_with_grad(encoder, ids, pad_id_of(tokenizer), torch.device("cpu"))
    assert chunked.requires_grad
    np.testing.assert_allclose(chunked.detach().numpy(), embed(encoder, tokenizer, TEXTS * 20), atol=1e-5)


def test_freeze_bottom_layers(tiny_encoder_dir):
    _, backbone = load_pretrained(tiny_encoder_dir)
    encoder = TextEncoder(backbone)
    encoder.freeze_bottom(1)
    blocks = encoder.transformer_blocks()
    assert len(blocks) == 2
    assert not any(p.requires_grad for p in blocks[0].parameters())
    assert all(p.requires_grad for p in blocks[1].parameters())
    assert not encoder.backbone.get_input_embeddings().weight.requires_grad


def test_text_model_names_that_cannot_load_are_user_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="unknown builtin model 'builtin:bert-9000'; known: builtin:minilm-l6"):
        load_pretrained("builtin:bert-9000")
    with pytest.raises(UserError, match=f"model directory {tmp_path}/typo does not exist"):
        load_pretrained(str(tmp_path / "typo"))  # not advice to download a path from the hub
    with pytest.raises(UserError, match="neither a local directory nor in the Hugging Face cache.*huggingface-cli "
                                        "download xmctag-test/no-such-model"):
        load_pretrained("xmctag-test/no-such-model")
    (tmp_path / "not-a-model").mkdir()
    (tmp_path / "not-a-model/config.json").write_text('{"model_type": "no-such-architecture"}')
    with pytest.raises(UserError, match=r"cannot load model from .*not-a-model: [^\n]*$"):
        load_pretrained(str(tmp_path / "not-a-model"))
