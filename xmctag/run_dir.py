"""Layout of a training run directory (what ``xmctag train --out runs/NAME`` writes and ``xmctag export`` reads).

    config.json            the Config the model was trained with
    model/                 encoder weights (safetensors) and tokenizer, Hugging Face format
    labels.parquet         label, text, encoder_text (what the encoder read), exclusive_group, train_count
    label_embeddings.npy   (L, d) float32, encoder embedding of each label's text
    label_vectors.npy      (L, d + 1) float32 rows [w_l, b_l]: the vectors searched at tagging time
    train_embeddings.npy   (n, d) float32 embeddings of the training products (kNN votes; absent if knn_neighbours=0)
    train_labels.npz       their label indices, CSR (``scoring.NeighbourLabels``)
    train_ids.parquet      their product ids (one String column ``id``, row j = row j of the two above), for
                           ``tag --evidence`` (absent in runs from before 2026-12-03)
    metrics.json           per-epoch history, final dev metrics, number of training rows
    README.md              model card
    sample_texts.json      a few training product texts (real rows for the export parity check)
    lexical/               the lexical model and its fusion weights (``xmctag.lexical``; absent with lexical "none")
    fusion.json            image fusion only: vision model (name, id, dim), image column, max_images, cache dir
    image_projection.safetensors  image fusion only: the trained projection (weight, bias)
    sample_images.npz      image fusion only: image features + mask of the sample_texts rows (parity check)
    image_cache/           image fusion only: the image-embedding cache, unless --cache-dir puts it elsewhere
    checkpoint.safetensors only while training (for --resume): the state after the last finished epoch, tensors and
                           JSON, no pickle (format: ``xmctag.training.checkpoint``)
    checkpoint.tmp         a checkpoint being written: renamed to checkpoint.safetensors once complete
    checkpoint.pt          the pickled checkpoint of an older xmctag: never loaded (unpickling runs code); such a run
                           is refused by --resume, and recognised as a run (--overwrite replaces it)

A directory holding anything else is not (only) a run: ``is_run_dir`` says no, and ``--overwrite`` leaves it alone.

This module owns a run's lifecycle: what ``--out`` may hold before training (``check_out_dir``: new, replaced,
resumed or refused), the settings of a resumed run (``check_resumed_config``), checkpoints, and reading and writing
the files above. The encoder saves and loads itself (``xmctag.models``); the model card is the training's
(``xmctag.training.model_card``).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from xmctag.config import Config
from xmctag.errors import UserError, first_line
from xmctag.io.datasets import LabelTable
from xmctag.models.files import MODEL_DIR as MODEL
from xmctag.models.files import POOLING_CENTER
from xmctag.models.files import PROJECTION_FILE as PROJECTION
from xmctag.overwrite import check_replaceable
from xmctag.scoring import LabelVectors, NeighbourLabels

CONFIG = "config.json"
LABELS = "labels.parquet"
LABEL_EMBEDDINGS = "label_embeddings.npy"
LABEL_VECTORS = "label_vectors.npy"
METRICS = "metrics.json"
CARD = "README.md"
CHECKPOINT = "checkpoint.safetensors"
LEGACY_CHECKPOINT = "checkpoint.pt"  # pickle, written by older versions: never loaded
SAMPLE_TEXTS = "sample_texts.json"
TRAIN_EMBEDDINGS = "train_embeddings.npy"
TRAIN_LABELS = "train_labels.npz"
TRAIN_IDS = "train_ids.parquet"
FUSION = "fusion.json"
LEXICAL = "lexical"
SAMPLE_IMAGES = "sample_images.npz"
IMAGE_CACHE = "image_cache"  # the default image-embedding cache (training.images.image_cache_dir)
CHECKPOINT_TMP = "checkpoint.tmp"  # a checkpoint being written (save_checkpoint)
SAMPLE_ROWS = 96
# Every name a run writes at its top level.
RUN_ENTRIES = frozenset({CONFIG, MODEL, LABELS, LABEL_EMBEDDINGS, LABEL_VECTORS, METRICS, CARD, CHECKPOINT,
                         LEGACY_CHECKPOINT, CHECKPOINT_TMP, SAMPLE_TEXTS, TRAIN_EMBEDDINGS, TRAIN_LABELS, TRAIN_IDS,
                         FUSION, PROJECTION, POOLING_CENTER, SAMPLE_IMAGES, IMAGE_CACHE, LEXICAL})


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
    if _has_checkpoint(path):
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
    """The encoder (``TextEncoder.save``: backbone, centre, projection) and its tokenizer, into the run."""
    encoder.save(out, tokenizer)


def load_encoder(out: Path):
    """The run's encoder: a ``TextEncoder``, or a ``FusedEncoder`` with its trained projection."""
    from xmctag.models.build import load_encoder as load

    return load(out, pooling=Config.load(out / CONFIG).pooling)


def save_fusion(out: Path, fusion: dict) -> None:
    (out / FUSION).write_text(json.dumps(fusion, indent=2) + "\n")


def load_fusion(out: Path) -> dict | None:
    """What ``save_fusion`` wrote (``xmctag.training.images.prepare_images``), or None for a text-only run."""
    path = out / FUSION
    return json.loads(path.read_text()) if path.exists() else None


def save_labels(out: Path, labels: LabelTable, label_embeddings: np.ndarray, vectors: LabelVectors,
                train_counts: np.ndarray) -> None:
    table = labels.to_arrow().append_column("train_count", pa.array(train_counts.astype(np.int64)))
    pq.write_table(table, out / LABELS)
    np.save(out / LABEL_EMBEDDINGS, label_embeddings.astype(np.float32))
    np.save(out / LABEL_VECTORS, vectors.index_matrix())


def save_neighbours(out: Path, embeddings: np.ndarray, labels: list[np.ndarray], ids: list[str]) -> None:
    """The training products' embeddings, labels and ids (row j of each is product j)."""
    np.save(out / TRAIN_EMBEDDINGS, embeddings.astype(np.float32))
    NeighbourLabels.from_lists(labels).save(out / TRAIN_LABELS)
    pq.write_table(pa.table({"id": pa.array(ids, pa.string())}), out / TRAIN_IDS)


def load_neighbours(out: Path) -> tuple[np.ndarray, NeighbourLabels] | None:
    """Training product embeddings (memory-mapped) and labels, or None when the run has none."""
    if not (out / TRAIN_EMBEDDINGS).exists():
        return None
    return np.load(out / TRAIN_EMBEDDINGS, mmap_mode="r", allow_pickle=False), NeighbourLabels.load(out / TRAIN_LABELS)


def save_sample_texts(out: Path, texts: list[str], images=None) -> None:
    """A spread of training rows for the export parity check; ``images`` (``ImageInputs``): their image inputs."""
    rows = np.arange(0, len(texts), max(1, len(texts) // SAMPLE_ROWS))[:SAMPLE_ROWS]
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
    with np.load(path, allow_pickle=False) as data:
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
        hint = " (training did not finish; rerun with --resume)" if _has_checkpoint(path) else ""
        raise UserError(f"{path}: not a finished xmctag run, missing {', '.join(missing)}{hint}")
    config = Config.load(path / CONFIG)
    table = pq.read_table(path / LABELS)
    # Memory-mapped: at a million labels each array is 1.5 GB, and export only streams them (xmctag.backend.index).
    index = np.load(path / LABEL_VECTORS, mmap_mode="r", allow_pickle=False)
    vectors = LabelVectors(index[:, :-1], index[:, -1], config.label_vector_scale)
    n_train = json.loads((path / METRICS).read_text())["n_train"]
    return TrainedRun(path, config, LabelTable.from_arrow(table), table.column("train_count").to_numpy(),
                      np.load(path / LABEL_EMBEDDINGS, mmap_mode="r", allow_pickle=False), vectors, n_train)


# -- lifecycle: what --out holds before training, resumed settings, checkpoints ---------------------------------------
def check_out_dir(out: Path, resume: bool, overwrite: bool, inputs: dict) -> str | None:
    """Checks what ``--out`` holds before anything is read or written; returns why its contents are to be replaced
    (a line for the log), or None to keep them.

    Empty or absent: a new run. ``--overwrite``: replaces a run directory, nothing else (``xmctag.overwrite``).
    ``--resume`` (which wins over ``--overwrite``): continues an interrupted run; a finished one is an error. A run
    that stopped before its first checkpoint has nothing to resume: it is replaced, with or without ``--resume``.
    ``inputs``: flag -> path read.
    """
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    if not out.exists() or not any(out.iterdir()):
        return None
    state = run_state(out)
    if (overwrite and not resume) or state == "started":
        check_replaceable(out, is_run_dir, "an xmctag run directory", inputs)
        return (f"replacing the run in {out}" if overwrite else
                f"replacing the run in {out}: it stopped before its first checkpoint, nothing to resume")
    if state is None:
        raise UserError(f"--out {out}: directory is not empty and not an xmctag run directory")
    if state == "finished":
        done = json.loads((out / METRICS).read_text())
        stages = f"{done.get('epochs')} epoch(s) + {done.get('classifier_epochs', 0)} classifier epoch(s)"
        if resume:
            raise UserError(f"--resume {out}: run already finished ({stages}); --resume only continues an "
                            "interrupted run (--overwrite trains it again)")
        raise UserError(f"--out {out}: directory is not empty: it holds a finished run ({stages}); use --overwrite "
                        "to replace it")
    if not resume:
        raise UserError(f"--out {out}: directory is not empty: it holds an interrupted run (use --resume to continue "
                        "it or --overwrite)")
    _check_not_legacy(out)
    return None


def check_resumed_config(out: Path, config: Config, resume: bool, auto_vision: bool = False) -> Config:
    """A resumed run must keep its settings; only ``epochs`` may change (an interrupted run may train longer).
    Returns ``config``, text only if the run being resumed fell back to it (``vision`` "auto" without a usable
    image, see ``xmctag.training.images.prepare_images``)."""
    if not (resume and (out / CONFIG).exists()):
        return config
    saved = Config.load(out / CONFIG).to_dict()
    if auto_vision and saved["vision"] == "none":
        config = dataclasses.replace(config, vision="none")
    changed = [f"{k} {saved[k]!r} -> {v!r}" for k, v in config.to_dict().items() if k != "epochs" and saved[k] != v]
    if changed:
        raise UserError(f"--resume {out}: settings differ from the run being resumed: {'; '.join(changed)}")
    return config


def start(out: Path, config: Config, replace: str | None, log) -> None:
    """Makes ``out`` a run directory of ``config`` (after ``check_out_dir``; ``replace``: its reason, logged)."""
    if replace:
        log(replace)
        clear_run(out)
    out.mkdir(parents=True, exist_ok=True)
    config.save(out / CONFIG)


def _has_checkpoint(path: Path) -> bool:
    return (path / CHECKPOINT).exists() or (path / LEGACY_CHECKPOINT).exists()


def _check_not_legacy(out: Path) -> None:
    """An older xmctag's pickled checkpoint is refused, never unpickled: loading a pickle runs whatever code it
    holds, and a file in a run directory is not to be trusted that far."""
    if (out / LEGACY_CHECKPOINT).exists() and not (out / CHECKPOINT).exists():
        raise UserError(f"--resume {out}: its checkpoint is {LEGACY_CHECKPOINT}, the pickle format of an older "
                        "xmctag, which is never loaded (unpickling can run code); train it again with --overwrite "
                        "instead of --resume")


@contextmanager
def checkpoint_errors(out: Path):
    """Turns the errors of reading the checkpoint, or of loading it into the model and optimiser (missing keys,
    wrong shapes), into a one-line ``UserError`` naming the file."""
    from xmctag.training.checkpoint import CheckpointError

    try:
        yield
    except (CheckpointError, KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        if type(e) is KeyError:
            why = f"missing {e}"
        elif len(lines) > 1 and lines[0].endswith(":"):  # "Error(s) in loading state_dict for ...:" + the first
            why = f"{lines[0]} {lines[1]}"
        else:
            why = first_line(e)
        raise UserError(f"--resume {out / CHECKPOINT}: not a usable checkpoint of this run: {why}; train it again "
                        "with --overwrite instead of --resume") from None


def save_checkpoint(out: Path, state: dict) -> None:
    """Writes the state after an epoch (either stage's: see ``xmctag.training.trainer``), with the torch RNG, for
    ``--resume`` (``xmctag.training.checkpoint``: no pickle). A crash while saving never leaves a truncated
    checkpoint (written aside, flushed, then renamed)."""
    import torch

    from xmctag.training import checkpoint

    checkpoint.save(out / CHECKPOINT, {**state, "torch_rng": torch.get_rng_state()}, out / CHECKPOINT_TMP)


def load_checkpoint(out: Path) -> dict | None:
    """What ``save_checkpoint`` wrote, the torch RNG restored; None when the run has no checkpoint. An older
    ``checkpoint.pt`` (pickle) is refused, never loaded; an unreadable checkpoint is a ``UserError``."""
    import torch

    from xmctag.training import checkpoint

    _check_not_legacy(out)
    path = out / CHECKPOINT
    if not path.exists():
        return None
    with checkpoint_errors(out):
        state = checkpoint.load(path)
        if not isinstance(state, dict):
            raise checkpoint.CheckpointError("its state is not a dict")
        rng = state["torch_rng"]
        if not (isinstance(rng, torch.Tensor) and rng.dtype == torch.uint8):
            raise checkpoint.CheckpointError("torch_rng is not a uint8 tensor")
        torch.set_rng_state(rng)
    return state


def finish(out: Path) -> None:
    """The run is complete: its checkpoint goes (and an older version's, if any)."""
    (out / CHECKPOINT).unlink(missing_ok=True)
    (out / LEGACY_CHECKPOINT).unlink(missing_ok=True)
