"""The model card of a run (``README.md`` in the run directory, copied into its bundle): how the model was trained,
on what, and how it scored on dev. Written by ``xmctag.train`` once the run is complete."""

from __future__ import annotations

import datetime
from pathlib import Path

from xmctag import run_dir
from xmctag.config import Config
from xmctag.io.datasets import LabelledSet
from xmctag.models.backbone import is_decoder_config


def write_model_card(out: Path, config: Config, train_set: LabelledSet, dev_set: LabelledSet | None,
                     dev_metrics: dict[str, float] | None, epochs: int,
                     exclusive_groups: list[str | None] | None = None, classifier_epochs: int = 0) -> None:
    centred = (", minus the running mean of training (pooling_center.npy)"
               if (out / run_dir.POOLING_CENTER).exists() else "")
    loss = ("a triplet loss over hard in-batch negatives" if config.loss == "triplet"
            else f"a softmax (InfoNCE) loss over the in-batch labels, temperature {config.temperature}")
    lines = [
        f"# xmctag model `{out.name}`",
        "",
        f"Trained {datetime.date.today().isoformat()} with xmctag: a Siamese dual encoder (`{config.encoder}`, "
        f"{config.pooling} pooling{centred}, L2 norm) trained with {loss}, plus per-label vectors fitted "
        "on frozen product embeddings. Score = (1 − w) · sigmoid(scale × (⟨product, w_label⟩ + b_label)) + w · vote "
        f"of the {config.knn_neighbours} most similar training products (w = {config.knn_weight}).",
        "",
        f"- Training rows: {len(train_set)}; labels seen in training: {int((train_set.label_counts(1) > 0).sum())}",
        f"- Input text: columns {', '.join(config.text_cols)} (max {config.max_length} tokens)",
        f"- Epochs: {epochs} (setting: {config.epochs}), batch size {config.batch_size}, learning rate {config.lr}",
        f"- Classifier stage: {classifier_epochs} epoch(s) (setting: {config.classifier_epochs}); "
        + ("the encoder was fine-tuned through a one-vs-all head that became the label vectors, learning rate "
           f"{config.classifier_lr}" if classifier_epochs else "off"),
    ]
    lines += _decoder_card_lines(out, config)
    groups = sorted({g for g in exclusive_groups or [] if g is not None})
    if groups:
        lines += ["- Exclusive facets (`tag --exclusive-groups` keeps the best label of each): " + ", ".join(groups)]
    fusion = run_dir.load_fusion(out)
    if fusion is not None:
        lines += [f"- Image fusion: `{fusion['vision']}` features ({fusion['dim']}-d, frozen, cached) projected to one "
                  f"token per image (up to {fusion['max_images']}, column `{fusion['image_col']}`), placed "
                  f"{'after the text, before the EOS' if _is_decoder(out) else 'before the text'}; projection "
                  f"learning rate {config.image_lr}"]
    if dev_set is not None and dev_metrics:
        table = " | ".join(f"{k} {100 * v:.2f}" for k, v in dev_metrics.items())
        lines += [f"- Dev set ({len(dev_set)} rows): {table}"]
    lines += ["", "All settings: `config.json`. Per-epoch history: `metrics.json`.", ""]
    (out / run_dir.CARD).write_text("\n".join(lines))


def _is_decoder(out: Path) -> bool:
    from transformers import AutoConfig

    return is_decoder_config(AutoConfig.from_pretrained(out / run_dir.MODEL, local_files_only=True))


def _decoder_card_lines(out: Path, config: Config) -> list[str]:
    """For a decoder backbone: how it was trained (LoRA adapters at ``lora_lr``, merged) and its prompt."""
    if not _is_decoder(out):
        return []
    training = (f"LoRA rank {config.lora_rank} (alpha {config.lora_alpha}) on {', '.join(config.lora_target_modules)}"
                f", learning rate {config.lora_lr}, merged into the saved weights" if config.lora_rank > 0
                else f"all weights, learning rate {config.lr}")
    return [f"- Decoder backbone: {training}; {config.pooling} pooling over the prompt \"{config.prompt_prefix} "
            f"<title> <eos>\""]
