"""Third stage: the encoder fine-tuned through a one-vs-all classifier head (NGAME's classifier stage).

The dual-encoder stage only ever compares a product with label *texts*; the label vectors (``label_vectors.py``) then
fit one vector per label on *frozen* product embeddings. Here the encoder itself learns from the labels' vectors:

    logit(q, l) = scale * (<encode(product), w_l> + b_l),   loss = one-vs-all binary cross-entropy over all labels,

with ``w, b`` initialised from the fitted label vectors and trained at their own learning rate
(``classifier_vector_lr``), the encoder at ``classifier_lr`` (an image projection keeps its ``image_lr``: it is what
has to carry the labels when titles are poor). The head then is the model's label vectors, and ``xmctag.train``
embeds the products (neighbour votes) and label texts again with the new encoder. The bundle, its index and the
scoring are unchanged. A ``Stage`` (``xmctag.training.stage``): dev evaluation scores its head, the best epoch's
encoder and head are kept.

Labels never seen in training start from their calibrated text score and only ever get negative feedback: fine-tuned
through the head, the encoder's product embeddings drift away from the label-text embeddings, and left as they were,
such labels took top-5 places from the head's own (bench/RESULTS.md, "Classifier stage"). Encoder models only (a
decoder's LoRA adapters are merged by then); label sets up to ``classifier_max_labels`` when set (the head is a
dense ``(labels, dim)`` matrix with its optimiser state, counted in train's memory estimate). Above
``label_shortlist_above`` labels each batch is scored against a shortlist (``xmctag.training.shortlist``: its
positives, hard negatives found once with the head it starts from on the frozen product embeddings, random
negatives) instead of all labels; the shortlist is part of the checkpoint, so ``--resume`` goes on with it.
"""

from __future__ import annotations

import time
from typing import ClassVar

import numpy as np
import torch

from xmctag.config import Config
from xmctag.models.embedding import autocast, embed_with_grad
from xmctag.models.image_inputs import ImageInputs
from xmctag.progress import Progress
from xmctag.scoring import LabelVectors
from xmctag.training.budget import PROBE_STEPS, plan_epochs, probe_rate, probe_warmup
from xmctag.training.data import TrainingData
from xmctag.training.schedule import warmup_linear_decay
from xmctag.training.shortlist import LabelLists, Shortlist, batch_targets, sampled_bce
from xmctag.training.stage import StageProgress


def classifier_loss(encoder, head_w: torch.Tensor, head_b: torch.Tensor, scale: float, ids: list[list[int]],
                    rows: torch.Tensor, labels: LabelLists, pad_id: int, device, images: ImageInputs | None = None,
                    shortlist: Shortlist | None = None) -> torch.Tensor:
    """Mean over the batch of the summed one-vs-all BCE of the products ``rows`` (their token ``ids``): over all
    head rows, or estimated from ``shortlist``'s candidates."""
    with autocast(device):
        products = embed_with_grad(encoder, ids, pad_id, device, images).float()
    if shortlist is None:
        logits = scale * (products @ head_w.T + head_b)
        return torch.nn.functional.binary_cross_entropy_with_logits(
            logits, batch_targets(labels, rows, len(head_b)), reduction="sum") / len(ids)
    batch = shortlist.candidates(rows)
    columns = batch.columns.clamp(min=0)
    logits = scale * ((torch.nn.functional.embedding(columns, head_w) * products[:, None, :]).sum(-1)
                      + head_b[columns])
    random_logits = scale * (products @ head_w[batch.random].T + head_b[batch.random])
    return sampled_bce(logits, random_logits, batch)


class ClassifierStage:
    """Fine-tunes ``encoder`` in place through a head over all labels started from ``vectors`` (label vectors
    fitted on its frozen embeddings); ``head()`` is then the label vectors."""

    name, label, dev_key = "classifier", "classifier epoch", "dev_head"
    state_types: ClassVar[dict] = {"encoder": dict, "head": LabelVectors,  # state()
                                   "best_head": (LabelVectors, type(None)), "optimizer": dict, "scheduler": dict,
                                   "shortlist": (np.ndarray, type(None))}

    def __init__(self, encoder, data: TrainingData, vectors: LabelVectors, config: Config, device, save_encoder,
                 products: np.ndarray | None = None):
        """``save_encoder(encoder)``: saves it as it is now into the run (the best epoch's). ``products``: the
        training products' frozen embeddings that ``vectors`` were fitted on, for the shortlist of a large label
        set (None when resuming: the checkpoint holds it)."""
        self.encoder, self.data, self.config, self.device = encoder, data, config, device
        self.save_encoder = save_encoder
        self.scale = vectors.scale
        self.head_w = torch.nn.Parameter(torch.from_numpy(vectors.vectors.copy()).float().to(device))
        self.head_b = torch.nn.Parameter(torch.from_numpy(vectors.bias.copy()).float().to(device))
        self.labels = LabelLists.build(data.train.labels, np.arange(len(data.labels)), device)
        self.shortlist = None
        if len(vectors.bias) > config.label_shortlist_above and products is not None:
            self.shortlist = Shortlist.build(products, vectors.index_matrix(), self.labels, config.label_shortlist,
                                             config.label_random_negatives, config.seed, device)
        self.progress = StageProgress()
        self.best_head: LabelVectors | None = None
        self.optimizer = self.scheduler = None
        self.trainable: list[torch.nn.Parameter] = []

    @staticmethod
    def skip_reason(config: Config, encoder, n_labels: int) -> str | None:
        """Why the stage does not run ("off" when classifier_epochs is 0), or None when it does."""
        if config.classifier_epochs == 0:
            return "off"
        if encoder.is_decoder:
            return "encoder models only"
        if config.classifier_max_labels and n_labels > config.classifier_max_labels:
            return f"{n_labels:,} labels > classifier_max_labels {config.classifier_max_labels:,}"
        return None

    @staticmethod
    def applies(config: Config, encoder, n_labels: int, show: Progress) -> bool:
        """Whether the stage runs: not when off, for a decoder, or above ``classifier_max_labels`` (logged)."""
        reason = ClassifierStage.skip_reason(config, encoder, n_labels)
        if reason is not None and reason != "off":
            show.log(f"classifier stage: skipped ({reason})")
        return reason is None

    def loss(self, batch: np.ndarray) -> torch.Tensor:
        """The loss of the products ``batch`` (row indices of the training set), with its graph."""
        data = self.data
        images = data.train_images.take(batch) if data.train_images is not None else None
        rows = torch.from_numpy(np.asarray(batch, dtype=np.int64)).to(self.device)
        return classifier_loss(self.encoder, self.head_w, self.head_b, self.scale,
                               [data.product_ids[i] for i in batch], rows, self.labels, data.pad_id, self.device,
                               images, self.shortlist)

    def plan(self, minutes_left: float, show: Progress) -> int:
        """``classifier_epochs = "auto"``: as many epochs as fit ``minutes_left``, from a measured products/s on
        random batches (the probe's backward passes reach the head's gradients, which are reset)."""
        n = len(self.data.product_ids)
        rng = np.random.default_rng(self.config.seed)
        size = min(self.config.batch_size, n)
        batches = [rng.choice(n, size, replace=False) for _ in range(probe_warmup(self.device) + PROBE_STEPS)]
        rate = probe_rate(self.encoder, batches, self.device, self.loss)
        self.head_w.grad = self.head_b.grad = None
        return plan_epochs(self.config, rate, n, minutes_left, show, "classifier epochs", "products")

    def start(self, epochs: int) -> None:
        """The optimiser and schedule for ``epochs`` epochs: the encoder's weights at ``classifier_lr``, an image
        projection at ``image_lr``, the head at ``classifier_vector_lr``."""
        config = self.config
        self.progress.epochs = epochs
        groups = self.encoder.param_groups(config, config.classifier_lr)
        self.trainable = [p for group in groups for p in group["params"]]
        self.optimizer = self.encoder.configure_optimizers(config, config.classifier_lr, extra_groups=[
            {"params": [self.head_w, self.head_b], "lr": config.classifier_vector_lr, "weight_decay": 0.0}])
        steps_per_epoch = -(-len(self.data.product_ids) // config.batch_size)
        self.scheduler = warmup_linear_decay(self.optimizer, min(config.warmup_steps, steps_per_epoch),
                                             steps_per_epoch * epochs)

    def train_epoch(self, epoch: int, show: Progress) -> dict:
        config = self.config
        rng = np.random.default_rng(config.seed + 1000 + epoch)
        order = rng.permutation(len(self.data.product_ids))
        self.encoder.train()
        started, total = time.perf_counter(), 0.0
        with show.task(f"classifier epoch {epoch + 1}/{self.progress.epochs}", total=len(order),
                       unit="products") as update:
            for start in range(0, len(order), config.batch_size):
                batch = order[start:start + config.batch_size]
                loss = self.loss(batch)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.trainable, config.grad_clip)
                self.optimizer.step()
                self.scheduler.step()
                total += float(loss.detach()) * len(batch)
                update(len(batch), loss=float(loss.detach()))
        self.encoder.eval()
        return {"classifier_epoch": epoch + 1, "loss": total / len(order),
                "seconds": round(time.perf_counter() - started, 1)}

    def head(self) -> LabelVectors:
        """The head as label vectors (the model's label vectors once the stage is over)."""
        return LabelVectors(self.head_w.detach().float().cpu().numpy().copy(),
                            self.head_b.detach().float().cpu().numpy().copy(), self.scale)

    def dev_vectors(self) -> LabelVectors:
        return self.head()

    def keep(self) -> None:
        self.best_head = self.head()
        self.save_encoder(self.encoder)

    def state(self) -> dict:
        """What ``load_state`` goes on from: the encoder, the head (and the best epoch's), the optimiser."""
        return {"encoder": self.encoder.state_dict(), "head": self.head(), "best_head": self.best_head,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "shortlist": self.shortlist.hard.cpu().numpy() if self.shortlist is not None else None}

    def load_state(self, state: dict) -> None:
        shape = (len(self.data.label_ids), self.encoder.dim)  # the head's rows: one per label
        for key in ("head", "best_head"):
            if state[key] is not None and state[key].vectors.shape != shape:
                raise ValueError(f"{key} of shape {state[key].vectors.shape} for {shape}")
        self.encoder.load_state_dict(state["encoder"])
        with torch.no_grad():
            self.head_w.copy_(torch.from_numpy(state["head"].vectors))
            self.head_b.copy_(torch.from_numpy(state["head"].bias))
        self.best_head = state["best_head"]
        hard = state.get("shortlist")  # checkpoints from before 2026-12-03 have none: all labels
        if hard is not None:
            if hard.ndim != 2 or len(hard) != len(self.data.product_ids) or (hard >= shape[0]).any():
                raise ValueError(f"shortlist of shape {hard.shape} for {len(self.data.product_ids)} products")
            self.shortlist = Shortlist(torch.from_numpy(hard.astype(np.int64)).to(self.device), self.labels,
                                       shape[0], self.config.label_random_negatives, self.config.seed)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
