"""Layout of a training run directory (what ``xmctag train --out runs/NAME`` writes and ``xmctag export`` reads).

    config.json            the Config the model was trained with
    model/                 encoder weights (safetensors) and tokenizer, Hugging Face format
    labels.parquet         label, text, encoder_text (what the encoder read), exclusive_group, train_count
    label_embeddings.npy   (L, d) float32, encoder embedding of each label's text
    label_vectors.npy      (L, d + 1) float32 rows [w_l, b_l]: the vectors searched at tagging time
    train_embeddings.npy   (n, d) float32 embeddings of the training products (kNN votes; absent if knn_neighbours=0)
    train_labels.npz       their label indices, CSR (``scoring.NeighbourLabels``)
    metrics.json           per-epoch history, final dev metrics, number of training rows
    README.md              model card
    sample_texts.json      a few training product texts (real rows for the export parity check)
    fusion.json            image fusion only: vision model (name, id, dim), image column, max_images, cache dir
    image_projection.safetensors  image fusion only: the trained projection (weight, bias)
    sample_images.npz      image fusion only: image features + mask of the sample_texts rows (parity check)
    image_cache/           image fusion only: the image-embedding cache, unless --cache-dir puts it elsewhere
    checkpoint.pt          only while training (for --resume): the state after the last finished epoch

A directory holding anything else is not (only) a run: ``is_run_dir`` says no, and ``--overwrite`` leaves it alone.
"""

from __future__ import annotations

import datetime
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from xmctag.config import Config
from xmctag.data import LabelledSet, LabelTable
from xmctag.errors import UserError
from xmctag.evaluation.metrics import inverse_propensity
from xmctag.scoring import NeighbourLabels
from xmctag.training.label_vectors import LabelVectors

CONFIG = "config.json"
MODEL = "model"
LABELS = "labels.parquet"
LABEL_EMBEDDINGS = "label_embeddings.npy"
LABEL_VECTORS = "label_vectors.npy"
METRICS = "metrics.json"
CARD = "README.md"
CHECKPOINT = "checkpoint.pt"
SAMPLE_TEXTS = "sample_texts.json"
TRAIN_EMBEDDINGS = "train_embeddings.npy"
TRAIN_LABELS = "train_labels.npz"
FUSION = "fusion.json"
PROJECTION = "image_projection.safetensors"
POOLING_CENTER = "pooling_center.npy"  # centering = "ema": the mean subtracted before the L2 norm (TextEncoder)
SAMPLE_IMAGES = "sample_images.npz"
IMAGE_CACHE = "image_cache"  # the default image-embedding cache (training.images.image_cache_dir)
CHECKPOINT_TMP = "checkpoint.tmp"  # a checkpoint being written (trainer._save_checkpoint)
SAMPLE_ROWS = 96
# Every name a run writes at its top level.
RUN_ENTRIES = frozenset({CONFIG, MODEL, LABELS, LABEL_EMBEDDINGS, LABEL_VECTORS, METRICS, CARD, CHECKPOINT,
                         CHECKPOINT_TMP, SAMPLE_TEXTS, TRAIN_EMBEDDINGS, TRAIN_LABELS, FUSION, PROJECTION,
                         POOLING_CENTER, SAMPLE_IMAGES, IMAGE_CACHE})


def is_run_dir(path: Path) -> bool:
    """Whether the directory ``path`` holds an xmctag run (finished or not) and nothing else: a ``config.json`` of
    xmctag settings, and only names that a run writes (``RUN_ENTRIES``)."""
    names = {entry.name for entry in path.iterdir()}
    return CONFIG in names and names <= RUN_ENTRIES and _is_xmctag_config(path / CONFIG)


def _is_xmctag_config(path: Path) -> bool:
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(values, dict) and "encoder" in values and set(values) <= Config.field_names()


def run_state(path: Path) -> str | None:
    """What the directory ``path`` holds: ``"finished"`` (a complete run), ``"interrupted"`` (a checkpoint to
    resume from), ``"started"`` (a run that stopped before its first checkpoint: nothing to resume) or None (empty,
    or not only a run)."""
    if not is_run_dir(path):
        return None
    if (path / CHECKPOINT).exists():
        return "interrupted"
    return "finished" if (path / METRICS).exists() else "started"


def clear_run(path: Path) -> None:
    """Deletes what a run wrote in ``path``, except its image cache: keyed by image content and vision model, it
    is valid for any run, and a rerun need not embed every picture again."""
    for entry in path.iterdir():
        if entry.name == IMAGE_CACHE:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def save_encoder(out: Path, encoder, tokenizer) -> None:
    from xmctag.models.decoder import save_backbone
    from xmctag.models.fusion import FusedEncoder, save_projection

    save_backbone(encoder.backbone, out / MODEL)  # LoRA adapters (decoders) merged: a plain HF model
    tokenizer.save_pretrained(out / MODEL)
    if isinstance(encoder, FusedEncoder):
        save_projection(encoder, out / PROJECTION)
    if encoder.center is not None:
        np.save(out / POOLING_CENTER, encoder.center.detach().float().cpu().numpy())


def load_encoder(out: Path):
    """The run's encoder: a ``TextEncoder``, or a ``FusedEncoder`` with its trained projection (``fusion.json``)."""
    import torch
    from transformers import AutoModel

    from xmctag.models.fusion import load_projection, make_encoder

    backbone = AutoModel.from_pretrained(out / MODEL, local_files_only=True)
    fusion = load_fusion(out)
    encoder = make_encoder(backbone, fusion["dim"] if fusion else None, pooling=Config.load(out / CONFIG).pooling,
                           centering=(out / POOLING_CENTER).exists())
    if fusion is not None:
        load_projection(encoder, out / PROJECTION)
    if encoder.center is not None:
        encoder.center.copy_(torch.from_numpy(np.load(out / POOLING_CENTER)))
        encoder.center_updates.fill_(1)
    return encoder


def save_fusion(out: Path, fusion: dict) -> None:
    (out / FUSION).write_text(json.dumps(fusion, indent=2) + "\n")


def load_fusion(out: Path) -> dict | None:
    """What ``xmctag.training.images.Fusion.to_dict`` wrote, or None for a text-only run."""
    path = out / FUSION
    return json.loads(path.read_text()) if path.exists() else None


def save_labels(out: Path, labels: LabelTable, label_embeddings: np.ndarray, vectors: LabelVectors,
                train_counts: np.ndarray, n_train: int) -> None:
    table = labels.to_arrow().append_column("train_count", pa.array(train_counts.astype(np.int64)))
    pq.write_table(table, out / LABELS)
    np.save(out / LABEL_EMBEDDINGS, label_embeddings.astype(np.float32))
    np.save(out / LABEL_VECTORS, vectors.index_matrix())


def save_neighbours(out: Path, embeddings: np.ndarray, labels: list[np.ndarray]) -> None:
    np.save(out / TRAIN_EMBEDDINGS, embeddings.astype(np.float32))
    NeighbourLabels.from_lists(labels).save(out / TRAIN_LABELS)


def load_neighbours(out: Path) -> tuple[np.ndarray, NeighbourLabels] | None:
    """Training product embeddings (memory-mapped) and labels, or None when the run has none."""
    if not (out / TRAIN_EMBEDDINGS).exists():
        return None
    return np.load(out / TRAIN_EMBEDDINGS, mmap_mode="r"), NeighbourLabels.load(out / TRAIN_LABELS)


def _sample_rows(n_rows: int, n: int = SAMPLE_ROWS) -> np.ndarray:
    return np.arange(0, n_rows, max(1, n_rows // n))[:n]


def save_sample_texts(out: Path, texts: list[str], images=None) -> None:
    """A spread of training rows for the export parity check; ``images`` (``ImageInputs``): their image inputs."""
    rows = _sample_rows(len(texts))
    (out / SAMPLE_TEXTS).write_text(json.dumps([texts[i] for i in rows], ensure_ascii=False, indent=0) + "\n")
    if images is not None:
        np.savez(out / SAMPLE_IMAGES, features=images.features[rows], mask=images.mask[rows])


def load_sample_texts(out: Path) -> list[str]:
    path = out / SAMPLE_TEXTS
    return json.loads(path.read_text()) if path.exists() else []


def load_sample_images(out: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """``(features (n, M, V), mask (n, M))`` of the sample rows, or None (text-only run)."""
    path = out / SAMPLE_IMAGES
    if not path.exists():
        return None
    with np.load(path) as data:
        return data["features"], data["mask"]


@dataclass
class TrainedRun:
    """Everything a finished run directory holds, loaded."""

    path: Path
    config: Config
    labels: LabelTable
    train_counts: np.ndarray
    label_embeddings: np.ndarray
    vectors: LabelVectors
    n_train: int

    def encoder_and_tokenizer(self):
        """The encoder and its tokenizer; for a decoder, the ``PromptTokenizer`` that builds its prompt ids."""
        from transformers import AutoTokenizer

        from xmctag.models.prompt import prompt_tokenizer

        encoder = load_encoder(self.path)
        tokenizer = AutoTokenizer.from_pretrained(self.path / MODEL, local_files_only=True)
        if encoder.is_decoder:
            tokenizer = prompt_tokenizer(tokenizer, encoder.config, self.config)
        return encoder, tokenizer


def load_run(path: str | Path) -> TrainedRun:
    path = Path(path)
    missing = [name for name in (CONFIG, MODEL, LABELS, LABEL_EMBEDDINGS, LABEL_VECTORS, METRICS)
               if not (path / name).exists()]
    if missing:
        hint = " (training did not finish; rerun with --resume)" if (path / CHECKPOINT).exists() else ""
        raise UserError(f"{path}: not a finished xmctag run, missing {', '.join(missing)}{hint}")
    config = Config.load(path / CONFIG)
    table = pq.read_table(path / LABELS)
    index = np.load(path / LABEL_VECTORS)
    vectors = LabelVectors(index[:, :-1], index[:, -1], config.label_vector_scale)
    n_train = json.loads((path / METRICS).read_text())["n_train"]
    return TrainedRun(path, config, LabelTable.from_arrow(table), table.column("train_count").to_numpy(),
                      np.load(path / LABEL_EMBEDDINGS), vectors, n_train)


def inverse_propensities(train_counts: np.ndarray, n_train: int, config: Config) -> np.ndarray:
    return inverse_propensity(train_counts, n_train, config.psp_a, config.psp_b)


def write_model_card(out: Path, config: Config, train_set: LabelledSet, dev_set: LabelledSet | None,
                     dev_metrics: dict[str, float] | None, epochs: int,
                     exclusive_groups: list[str | None] | None = None, classifier_epochs: int = 0) -> None:
    centred = ", minus the running mean of training (pooling_center.npy)" if (out / POOLING_CENTER).exists() else ""
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
    fusion = load_fusion(out)
    if fusion is not None:
        lines += [f"- Image fusion: `{fusion['vision']}` features ({fusion['dim']}-d, frozen, cached) projected to one "
                  f"token per image (up to {fusion['max_images']}, column `{fusion['image_col']}`), placed "
                  f"{'after the text, before the EOS' if _is_decoder(out) else 'before the text'}; projection "
                  f"learning rate {config.image_lr}"]
    if dev_set is not None and dev_metrics:
        table = " | ".join(f"{k} {100 * v:.2f}" for k, v in dev_metrics.items())
        lines += [f"- Dev set ({len(dev_set)} rows): {table}"]
    lines += ["", "All settings: `config.json`. Per-epoch history: `metrics.json`.", ""]
    (out / CARD).write_text("\n".join(lines))


def _is_decoder(out: Path) -> bool:
    from transformers import AutoConfig

    from xmctag.models.decoder import is_decoder_config

    return is_decoder_config(AutoConfig.from_pretrained(out / MODEL, local_files_only=True))


def _decoder_card_lines(out: Path, config: Config) -> list[str]:
    """For a decoder backbone: how it was trained (LoRA adapters at ``lora_lr``, merged) and its prompt."""
    if not _is_decoder(out):
        return []
    training = (f"LoRA rank {config.lora_rank} (alpha {config.lora_alpha}) on {', '.join(config.lora_target_modules)}"
                f", learning rate {config.lora_lr}, merged into the saved weights" if config.lora_rank > 0
                else f"all weights, learning rate {config.lr}")
    return [f"- Decoder backbone: {training}; {config.pooling} pooling over the prompt \"{config.prompt_prefix} "
            f"<title> <eos>\""]
