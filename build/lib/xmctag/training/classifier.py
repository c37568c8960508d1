"""Third stage: the encoder fine-tuned through a one-vs-all classifier head (NGAME's classifier stage).

The dual-encoder stage only ever compares a product with label *texts*; the label vectors (``label_vectors.py``) then
fit one vector per label on *frozen* product embeddings. Here the encoder itself learns from the labels' vectors:

    logit(q, l) = scale * (<encode(product), w_l> + b_l),   loss = one-vs-all binary cross-entropy over all labels,

with ``w, b`` initialised from the fitted label vectors and trained at their own learning rate, the encoder at
``classifier_lr``. The head then is the model's label vectors, and ``xmctag.train`` embeds the products (neighbour
votes) and label texts again with the new encoder. The bundle, its index and the scoring are unchanged. As in the
dual-encoder stage, ``xmctag.train`` evaluates each epoch on dev, keeps the best one (encoder and head) and
checkpoints ``ClassifierStage.state()`` after each epoch for ``--resume``.

Measured (bench/RESULTS.md, "Classifier stage"): on Myntra titles, two epochs from the pretrained MiniLM raised the
label vectors alone from 95.15 to 96.04 dev P@5 in 10.5 minutes on 2 CPU cores, where two dual-encoder epochs
(13.4 minutes) reached 95.73; on full EURLEX titles on an H100 (4-5 s per classifier epoch), 5 dual-encoder + 5
classifier epochs reached dev P@5 67.81 against 66.49 for 2 + 0. Encoder models only (a decoder's LoRA adapters are
merged by then); label sets up to ``classifier_max_labels`` (the head is a dense ``(labels, dim)`` matrix with its
optimiser state).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from xmctag.config import Config
from xmctag.models.fusion import ImageInputs
from xmctag.progress import Progress
from xmctag.training.label_vectors import LabelVectors

PROBE_STEPS = 3


def classifier_loss(encoder, head_w: torch.Tensor, head_b: torch.Tensor, scale: float, ids: list[list[int]],
                    targets: np.ndarray, pad_id: int, device, images: ImageInputs | None = None) -> torch.Tensor:
    """Mean over the batch of the summed one-vs-all BCE; ``targets`` ``(batch, head rows)`` bool."""
    from xmctag.training.trainer import _embed_with_grad

    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        products = _embed_with_grad(encoder, ids, pad_id, device, images)
    logits = scale * (products.float() @ head_w.T + head_b)
    return torch.nn.functional.binary_cross_entropy_with_logits(
        logits, torch.from_numpy(targets).float().to(device), reduction="sum") / len(ids)


class ClassifierStage:
    """Fine-tunes ``encoder`` in place through a head over all labels; ``head()`` is then the label vectors.

    ``product_ids``: token ids per training product; ``product_labels[i]``: label indices of product i;
    ``vectors``: label vectors fitted on the encoder's frozen embeddings (the head's start). Labels never seen in
    training start from their calibrated text score and only ever get negative feedback: fine-tuned through the
    head, the encoder's product embeddings drift away from the label-text embeddings, and left as they were,
    such labels took top-5 places from the head's own (sample catalog: dev P@5 94.35 with them kept out, 92.85
    with their text scores; 7 of the 2,000 dev label slots are labels unseen in training).
    """

    def __init__(self, encoder, product_ids: list[list[int]], product_labels: list[np.ndarray],
                 vectors: LabelVectors, pad_id: int, device, config: Config, images: ImageInputs | None = None):
        self.encoder, self.product_ids, self.product_labels = encoder, product_ids, product_labels
        self.pad_id, self.device, self.config, self.images = pad_id, device, config, images
        self.scale = vectors.scale
        self.head_w = torch.nn.Parameter(torch.from_numpy(vectors.vectors.copy()).float().to(device))
        self.head_b = torch.nn.Parameter(torch.from_numpy(vectors.bias.copy()).float().to(device))
        self.epoch = 0  # epochs done
        self.optimizer = self.scheduler = None  # made by run()

    def _targets(self, batch: np.ndarray) -> np.ndarray:
        targets = np.zeros((len(batch), len(self.head_b)), dtype=bool)
        for row, i in enumerate(batch):
            targets[row, self.product_labels[i]] = True
        return targets

    def _loss(self, batch: np.ndarray) -> torch.Tensor:
        images = self.images.take(batch) if self.images is not None else None
        return classifier_loss(self.encoder, self.head_w, self.head_b, self.scale,
                               [self.product_ids[i] for i in batch], self._targets(batch), self.pad_id, self.device,
                               images)

    def products_per_second(self) -> float:
        """Measured as ``trainer._plan_epochs`` measures pairs/s (``trainer.probe_rate``), on random batches."""
        from xmctag.training.trainer import probe_rate, probe_warmup

        rng = np.random.default_rng(self.config.seed)
        size = min(self.config.batch_size, len(self.product_ids))
        batches = [rng.choice(len(self.product_ids), size, replace=False)
                   for _ in range(probe_warmup(self.device) + PROBE_STEPS)]
        rate = probe_rate(self.encoder, batches, self.device, self._loss)
        self.head_w.grad = self.head_b.grad = None  # the probe's backward passes reached the head too
        return rate

    def run(self, epochs: int, show: Progress, after_epoch=None, resume: dict | None = None) -> list[dict]:
        """``epochs`` passes over the products in random batches -> the records of the epochs run.

        ``after_epoch(record)`` is called after each epoch with its record (``classifier_epoch``, ``loss``,
        ``seconds``), which it may extend, e.g. with dev metrics, and may checkpoint ``state()``; ``resume``: such a
        state, whose epochs are not run again.
        """
        from xmctag.training.trainer import _param_groups, _warmup_linear_decay

        # The encoder's weights at classifier_lr; an image projection keeps its own image_lr (it is what has to
        # carry the labels when titles are poor); the head at classifier_vector_lr.
        groups = _param_groups(self.encoder, self.config, self.config.classifier_lr)
        trainable = [p for group in groups for p in group["params"]]
        self.optimizer = torch.optim.AdamW(
            groups + [{"params": [self.head_w, self.head_b], "lr": self.config.classifier_vector_lr,
                       "weight_decay": 0.0}], weight_decay=self.config.weight_decay)
        steps_per_epoch = -(-len(self.product_ids) // self.config.batch_size)
        self.scheduler = _warmup_linear_decay(self.optimizer, min(self.config.warmup_steps, steps_per_epoch),
                                              steps_per_epoch * epochs)
        if resume is not None:
            self._load_state(resume)
        history = []
        for epoch in range(self.epoch, epochs):
            rng = np.random.default_rng(self.config.seed + 1000 + epoch)
            order = rng.permutation(len(self.product_ids))
            self.encoder.train()
            started, total = time.perf_counter(), 0.0
            with show.task(f"classifier epoch {epoch + 1}/{epochs}", total=len(order), unit="products") as update:
                for start in range(0, len(order), self.config.batch_size):
                    batch = order[start:start + self.config.batch_size]
                    loss = self._loss(batch)
                    self.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(trainable, self.config.grad_clip)
                    self.optimizer.step()
                    self.scheduler.step()
                    total += float(loss.detach()) * len(batch)
                    update(len(batch), loss=float(loss.detach()))
            self.encoder.eval()
            self.epoch = epoch + 1
            record = {"classifier_epoch": epoch + 1, "loss": total / len(order),
                      "seconds": round(time.perf_counter() - started, 1)}
            if after_epoch is not None:
                after_epoch(record)
            history.append(record)
        return history

    def state(self) -> dict:
        """What ``run(resume=...)`` goes on from: the epochs done, the encoder, the head and the optimiser."""
        return {"epoch": self.epoch, "encoder": self.encoder.state_dict(), "head": self.head(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def _load_state(self, state: dict) -> None:
        self.epoch = state["epoch"]
        self.encoder.load_state_dict(state["encoder"])
        with torch.no_grad():
            self.head_w.copy_(torch.from_numpy(state["head"].vectors))
            self.head_b.copy_(torch.from_numpy(state["head"].bias))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def head(self) -> LabelVectors:
        """The head as label vectors (the model's label vectors once the stage is over)."""
        return LabelVectors(self.head_w.detach().float().cpu().numpy().copy(),
                            self.head_b.detach().float().cpu().numpy().copy(), self.scale)


def plan_classifier_epochs(config: Config, stage: ClassifierStage, minutes_left: float, show: Progress) -> int:
    """``classifier_epochs = "auto"``: as many epochs (at most ``auto_max_epochs``) as fit ``minutes_left``."""
    if config.classifier_epochs != "auto":
        return int(config.classifier_epochs)
    from xmctag.training.trainer import epochs_that_fit

    rate = stage.products_per_second()
    epoch_minutes = len(stage.product_ids) / rate / 60
    epochs = epochs_that_fit(config, epoch_minutes, minutes_left)
    show.log(f"classifier epochs auto: ~{rate:.0f} products/s, ~{epoch_minutes:.1f} min per epoch, "
             f"{max(minutes_left, 0.0):.1f} min of the budget left -> {epochs} epoch(s)")
    return epochs
