"""Decoder LLMs vs MiniLM as the dual encoder, and decoder training/encoding throughput.

    python bench/decoder.py                       # SmolLM2-135M vs MiniLM on an 8k-row EURLEX-57K subset, full dev
    python bench/decoder.py --epochs 3 --train-rows 8000 --set max_length=48
    python bench/decoder.py --epochs 1 --equal-time   # then MiniLM for as long as SmolLM2's epoch took
    python bench/decoder.py --models minilm --time-budget 4.69   # MiniLM for a fine-tuning time measured earlier
    python bench/decoder.py --throughput          # Qwen2.5-0.5B-shaped random model: pairs/s, items/s (CUDA bf16)

Quality mode: a fixed subset of the training split (``--train-rows`` rows sampled with ``--seed``, written to
``--work``), the whole dev split, title only, the same number of epochs for every model; each model goes through
the public API (``xmctag.train`` with ``dev=``), with xmctag's defaults for its kind (MiniLM: full fine-tuning at
``lr``; SmolLM2: LoRA at ``lora_lr``) plus any ``--set`` overrides. It prints the machine, then P@1, P@5 and PSP@5
on dev (after the label-vector stage, and of the dual encoder alone after its last epoch) and the wall time of each
run. SmolLM2 is ~6x MiniLM's parameters and reads ~4 more prompt tokens per item: on CPU expect hours, not minutes;
the comparison is meant for a GPU machine (training uses CUDA with bf16 autocast when torch sees one).

Throughput mode builds a randomly initialised model shaped like Qwen2.5-0.5B (hidden 896, 24 layers, 14 heads,
2 KV heads, intermediate 4864, vocab 151936) with xmctag's decoder setup (LoRA as configured: the defaults plus
any ``--set``; gradient checkpointing on CUDA) and measures training pairs/s (one pair = a product and its positive
label, as in ``xmctag.train``) and encoding items/s (``encode_ids``, inference) on random token ids with
EURLEX-like lengths. CUDA + bf16 autocast
when available; on CPU it runs a few small steps only (use ``--layers`` to shrink the model for a smoke run).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from common import markdown_table, parse_overrides, print_header, write_title_subsets

ROOT = Path(__file__).resolve().parent.parent
MODELS = {"minilm": "builtin:minilm-l6", "smollm2": "builtin:smollm2-135m"}
SHAPES = {  # random models for the throughput mode, shaped like the real ones
    "qwen2.5-0.5b": ("qwen2", dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                   intermediate_size=4864, vocab_size=151936, max_position_embeddings=32768,
                                   rope_theta=1e6, tie_word_embeddings=True)),
    "smollm2-135m": ("llama", dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                   intermediate_size=1536, vocab_size=49152, max_position_embeddings=8192,
                                   rope_theta=1e5, tie_word_embeddings=True)),
}


# -- quality ---------------------------------------------------------------------------------------------------------
def quality(args) -> int:
    import xmctag

    # pyarrow only (no polars): this mode also runs on a GPU box that has torch, transformers, peft and pyarrow.
    work = args.work
    subset_path, dev_path, n_rows = write_title_subsets(args.dataset, work, args.train_rows, args.dev_rows, args.seed)
    labels_path = args.dataset / "labels.parquet"
    overrides = parse_overrides(args.set)
    encoders = dict(MODELS, **dict(x.split("=", 1) for x in args.model_path))

    epochs_text = f"as many epochs as fit {args.time_budget} min" if args.time_budget else f"{args.epochs} epochs"
    print_header(f"decoder vs encoder on {args.dataset.name} (title only, {n_rows} train rows, dev "
                 f"{'all' if not args.dev_rows else args.dev_rows} rows, {epochs_text})")
    print(f"- settings: xmctag defaults per model kind{' + ' + ' '.join(args.set) if args.set else ''}")
    print()
    rows, summary = [], {}
    budget = args.time_budget  # --equal-time: the first model's fine-tuning minutes
    for name in args.models:
        epochs = dict(epochs=args.epochs)
        if budget is not None:  # as many epochs as fit the first model's fine-tuning time (xmctag's own planner)
            epochs = dict(epochs="auto", time_budget_minutes=budget, auto_max_epochs=1000)
        config = xmctag.Config(encoder=encoders[name], text_cols=["title"], seed=args.seed, **epochs, **overrides)
        started = time.perf_counter()
        result = xmctag.train(subset_path, labels_path, work / f"run-{name}", dev=dev_path, config=config,
                              overwrite=True, progress=not args.quiet)
        seconds = time.perf_counter() - started
        fine_tuning_minutes = sum(h["seconds"] for h in result.history if "epoch" in h) / 60
        if args.equal_time and budget is None:
            budget = fine_tuning_minutes
        encoder_only = [h["dev"] for h in result.history if "epoch" in h and "dev" in h]
        final = result.dev_metrics or {}
        summary[name] = {"encoder": config.encoder, "seconds": seconds, "fine_tuning_minutes": fine_tuning_minutes,
                         "dev": final,
                         "dev_encoder_only": encoder_only[-1] if encoder_only else None,
                         "history": result.history}
        n_epochs = sum(1 for h in result.history if "epoch" in h)
        for label, metrics in ((f"{name} ({config.encoder}), {n_epochs} epoch(s)", final),
                               (f"  {name}: dual encoder alone", encoder_only[-1] if encoder_only else {})):
            rows.append([label] + [f"{100 * metrics.get(k, float('nan')):.2f}" for k in ("P@1", "P@5", "PSP@5")]
                        + ([f"{fine_tuning_minutes:.1f}", f"{seconds / 60:.1f}"] if not label.startswith("  ")
                           else ["", ""]))
        # Written after every model: a run cut short by a time limit still leaves what it finished.
        (work / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        print(markdown_table(["model", "P@1", "P@5", "PSP@5", "fine-tuning min", "train min (all stages)"], rows),
              flush=True)
    return 0


# -- throughput ------------------------------------------------------------------------------------------------------
def throughput(args) -> int:
    import numpy as np
    import torch
    from transformers import AutoConfig, AutoModel

    from xmctag.config import Config
    from xmctag.losses import make_loss
    from xmctag.models.build import resolve_kind_defaults
    from xmctag.models.embedding import embed_with_grad, encode_ids
    from xmctag.models.encoder import TextEncoder
    from xmctag.models.lora import add_lora, merged_state_dict

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    model_type, shape = SHAPES[args.shape]
    shape = dict(shape, num_hidden_layers=args.layers or shape["num_hidden_layers"])
    batch = args.batch_size or (128 if cuda else 8)
    steps = args.steps or (10 if cuda else 2)
    n_items = args.items or (8192 if cuda else 32)
    torch.manual_seed(0)
    backbone = AutoModel.from_config(AutoConfig.for_model(model_type, **shape))
    config = resolve_kind_defaults(Config(**parse_overrides(args.set)), backbone.config)  # decoder: InfoNCE, centring
    encoder = TextEncoder(backbone, pooling=config.pooling, centering=config.centering == "ema",
                          center_momentum=config.center_momentum)
    if config.lora_rank > 0:
        add_lora(backbone, config)
    if config.gradient_checkpointing:  # as xmctag.models.build.prepare_model does, on every device
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    encoder.to(device)
    trainable = [p for p in encoder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lora_lr if config.lora_rank > 0 else config.lr)
    loss_fn = make_loss(config)
    rng = np.random.default_rng(0)

    def random_ids(n: int, low: int, high: int) -> list[list[int]]:
        return [rng.integers(10, shape["vocab_size"], rng.integers(low, high + 1)).tolist() for _ in range(n)]

    def step() -> None:
        products, labels = random_ids(batch, 24, 64), random_ids(batch, 8, 32)  # prompt + title / label text
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cuda):
            p = embed_with_grad(encoder, products, 0, device)
            q = embed_with_grad(encoder, labels, 0, device)
            loss = loss_fn(p.float() @ q.float().T, torch.arange(batch, device=device),
                           torch.eye(batch, dtype=torch.bool, device=device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    n_params = sum(p.numel() for p in encoder.parameters())
    print_header(f"decoder throughput ({args.shape}-shaped random model)")
    print(f"- device: {torch.cuda.get_device_name() if cuda else 'CPU'}{', bf16 autocast' if cuda else ', fp32'}; "
          f"{shape['num_hidden_layers']} layers, {n_params / 1e6:.0f}M parameters, "
          f"{sum(p.numel() for p in trainable) / 1e6:.2f}M trainable (LoRA rank {config.lora_rank}), "
          f"{config.loss} loss; "
          f"gradient checkpointing {'on' if config.gradient_checkpointing else 'off'}")
    print(f"- training: batches of {batch} products (24-64 tokens) + {batch} labels (8-32 tokens), {steps} timed steps "
          f"after 2 warm-up steps; encoding: {n_items} items of {args.encode_tokens} tokens, batches of "
          f"{args.encode_batch}")
    print()
    encoder.train()
    for _ in range(2):
        step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    train_seconds = time.perf_counter() - started
    train_peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    items = random_ids(n_items, args.encode_tokens, args.encode_tokens)

    def encode_rate() -> float:
        encode_ids(encoder, items[:args.encode_batch], 0, batch_size=args.encode_batch, device=device)  # warm-up
        sync()
        started = time.perf_counter()
        encode_ids(encoder, items, 0, batch_size=args.encode_batch, device=device)
        sync()
        return n_items / (time.perf_counter() - started)

    rows = [["training", f"{steps * batch / train_seconds:.1f} pairs/s", f"{train_peak:.1f}"],
            ["encoding (fp32 weights, bf16 autocast, LoRA unmerged: dev evaluation in training)" if cuda
             else "encoding (fp32, LoRA unmerged)", f"{encode_rate():.1f} items/s", ""]]
    # What a saved run loads: a plain backbone with the adapters merged into its weights (no LoRA layers left).
    plain = AutoModel.from_config(AutoConfig.for_model(model_type, **shape))
    plain.load_state_dict(merged_state_dict(backbone))
    encoder = TextEncoder(plain, pooling=config.pooling, centering=config.centering == "ema").to(device).eval()
    rows.append(["encoding (fp32 weights, bf16 autocast, LoRA merged)" if cuda else "encoding (fp32, LoRA merged)",
                 f"{encode_rate():.1f} items/s", ""])
    if cuda:  # weights cast to bf16 once: what an inference-only process can do
        encoder.to(torch.bfloat16)
        rows.append(["encoding (bf16 weights, LoRA merged)", f"{encode_rate():.1f} items/s", ""])
    if args.compile:  # torch.compile of the backbone (fixed shapes here: every item has --encode-tokens tokens)
        encoder.backbone = torch.compile(encoder.backbone, dynamic=False)
        rows.append([f"encoding ({'bf16' if cuda else 'fp32'} weights, LoRA merged, torch.compile)",
                     f"{encode_rate():.1f} items/s", ""])
    print(markdown_table(["phase", "throughput", "peak GPU GiB"], rows), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--throughput", action="store_true", help="measure decoder pairs/s and items/s instead")
    parser.add_argument("--dataset", type=Path, default=ROOT.parent / "shared" / "data" / "eurlex57k")
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "work" / "decoder")
    parser.add_argument("--models", nargs="+", default=["smollm2", "minilm"], choices=list(MODELS))
    parser.add_argument("--train-rows", type=int, default=8000, help="0 = the whole training split")
    parser.add_argument("--dev-rows", type=int, default=0, help="first N dev rows (default: all)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--equal-time", action="store_true",
                        help="the first model trains --epochs; the others as many epochs as fit its fine-tuning time")
    parser.add_argument("--time-budget", type=float, default=None, metavar="MIN",
                        help="equal time against a run made elsewhere: every model trains as many epochs as fit MIN "
                        "fine-tuning minutes (e.g. SmolLM2's 2 GPU epochs, 4.69)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="Config overrides (all models)")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--model-path", nargs="*", default=[], metavar="NAME=ENCODER",
                        help="quality: use this encoder for a model name (e.g. minilm=/models/minilm)")
    parser.add_argument("--shape", default="qwen2.5-0.5b", choices=list(SHAPES), help="throughput: model shape")
    parser.add_argument("--encode-tokens", type=int, default=41, help="throughput: tokens per encoded item")
    parser.add_argument("--encode-batch", type=int, default=512, help="throughput: items per encoding batch")
    parser.add_argument("--layers", type=int, default=0, help="throughput: fewer layers (smoke runs)")
    parser.add_argument("--batch-size", type=int, default=0, help="throughput: products per step")
    parser.add_argument("--steps", type=int, default=0, help="throughput: timed training steps")
    parser.add_argument("--compile", action="store_true", help="throughput: also encode through torch.compile")
    parser.add_argument("--items", type=int, default=0, help="throughput: items to encode")
    args = parser.parse_args(argv)
    return throughput(args) if args.throughput else quality(args)


if __name__ == "__main__":
    sys.exit(main())
