"""The Siamese dual-encoder stage (ViXML / NGAME): products and label texts through one encoder, in-batch negatives.

Each step takes a batch of products, samples one positive label for each, embeds the products and the batch's
labels with the same encoder, and applies the loss (``xmctag.losses``: encoders the triplet loss with the hardest
in-batch negatives; decoders InfoNCE over the batch's labels). From ``cluster_start_epoch`` on, batches are made of
clusters of similar products (clustered on the embeddings seen during the previous epoch,
``xmctag.training.batching``), so that in-batch negatives are hard. After an epoch, dev evaluation scores products
against the label-text embeddings (``dev_vectors``). A ``Stage`` (``xmctag.training.stage``).
"""

from __future__ import annotations

import time
from typing import ClassVar

import numpy as np
import torch

from xmctag.config import Config
from xmctag.models.embedding import autocast, embed_with_grad, encode_ids
from xmctag.progress import Progress
from xmctag.scoring import LabelVectors
from xmctag.training.batching import balanced_clusters, batches_from_clusters, random_batches
from xmctag.training.budget import PROBE_STEPS, plan_epochs, probe_rate, probe_warmup
from xmctag.training.data import TrainingData
from xmctag.training.schedule import warmup_linear_decay
from xmctag.training.stage import StageProgress


class DualEncoderStage:
    name, label, dev_key = "dual encoder", "epoch", "dev"
    state_types: ClassVar[dict] = {"encoder": dict, "optimizer": dict, "scheduler": dict,  # state()
                                   "seen_embeddings": np.ndarray}

    def __init__(self, encoder, data: TrainingData, config: Config, device: torch.device, loss_fn, save_encoder):
        """``save_encoder(encoder)``: saves it as it is now into the run (the best epoch's)."""
        self.encoder, self.data, self.config, self.device, self.loss_fn = encoder, data, config, device, loss_fn
        self.save_encoder = save_encoder
        self.progress = StageProgress()
        self.seen_embeddings = np.zeros((len(data.train), encoder.dim), dtype=np.float32)  # for clustering
        self.optimizer = self.scheduler = None

    def plan(self, budget: float, show: Progress) -> int:
        """``epochs = "auto"``: as many epochs as fit ``budget`` minutes, from a measured pairs/s (the probe's
        forward+backward passes touch no weight)."""
        rng = np.random.default_rng(self.config.seed)
        batches = random_batches(len(self.data.train), self.config.batch_size, rng)
        batches = batches[:probe_warmup(self.device) + PROBE_STEPS]
        rate = probe_rate(self.encoder, batches, self.device, lambda batch: self.batch_loss(batch, rng)[0])
        epochs = plan_epochs(self.config, rate, len(self.data.train), budget, show, "epochs", "pairs")
        if not epochs:
            show.log("the pretrained encoder is kept as is")
        return epochs

    def start(self, epochs: int) -> None:
        """The optimiser and schedule for ``epochs`` epochs."""
        self.progress.epochs = epochs
        self.optimizer = self.encoder.configure_optimizers(self.config)
        steps_per_epoch = -(-len(self.data.train) // self.config.batch_size)
        self.scheduler = warmup_linear_decay(self.optimizer, self.config.warmup_steps,
                                             max(1, steps_per_epoch * epochs))

    def batch_loss(self, batch: np.ndarray, rng: np.random.Generator):
        """Loss of the products ``batch`` (one sampled positive each, in-batch labels as negatives), and their
        embeddings."""
        data, device = self.data, self.device
        positives = np.array([rng.choice(data.train.labels[i]) for i in batch])
        batch_labels, positive_col = np.unique(positives, return_inverse=True)
        is_relevant = np.array([np.isin(batch_labels, data.train.labels[i]) for i in batch])
        with autocast(device):
            products = embed_with_grad(self.encoder, [data.product_ids[i] for i in batch], data.pad_id, device,
                                       data.train_images.take(batch) if data.train_images is not None else None)
            labels = embed_with_grad(self.encoder, [data.label_ids[i] for i in batch_labels], data.pad_id, device,
                                     data.label_images.take(batch_labels) if data.label_images is not None else None)
            scores = products.float() @ labels.float().T
            loss = self.loss_fn(scores, torch.from_numpy(positive_col).to(device),
                                torch.from_numpy(is_relevant).to(device))
        return loss, products

    def train_step(self, batch: np.ndarray, rng: np.random.Generator) -> tuple[float, np.ndarray]:
        """One optimisation step on the products ``batch``; returns (loss, their embeddings as numpy)."""
        loss, products = self.batch_loss(batch, rng)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in self.encoder.parameters() if p.requires_grad],
                                       self.config.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        return float(loss.detach()), products.detach().float().cpu().numpy()

    def train_epoch(self, epoch: int, show: Progress) -> dict:
        config, n = self.config, len(self.data.train)
        rng = np.random.default_rng(config.seed + epoch)
        if epoch >= config.cluster_start_epoch:
            clusters = balanced_clusters(self.seen_embeddings, config.cluster_size, rng)
            batches = batches_from_clusters(clusters, config.batch_size, rng)
        else:
            batches = random_batches(n, config.batch_size, rng)
        self.encoder.train()
        started, total_loss = time.perf_counter(), 0.0
        with show.task(f"epoch {epoch + 1}/{self.progress.epochs}", total=n, unit="pairs") as update:
            for batch in batches:
                loss, embeddings = self.train_step(batch, rng)
                self.seen_embeddings[batch] = embeddings
                total_loss += loss * len(batch)
                update(len(batch), loss=loss)
        return {"epoch": epoch + 1, "loss": total_loss / n, "seconds": round(time.perf_counter() - started, 1)}

    def dev_vectors(self) -> LabelVectors:
        """The dual encoder alone: products against the label-text embeddings."""
        data = self.data
        embeddings = encode_ids(self.encoder, data.label_ids, data.pad_id, device=self.device,
                                images=data.label_images)
        return LabelVectors.from_text_embeddings(embeddings, self.config.label_vector_scale)

    def keep(self) -> None:
        self.save_encoder(self.encoder)

    def state(self) -> dict:
        return {"encoder": self.encoder.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "seen_embeddings": self.seen_embeddings}

    def load_state(self, state: dict) -> None:
        if state["seen_embeddings"].shape != self.seen_embeddings.shape:
            raise ValueError(f"seen_embeddings of shape {state['seen_embeddings'].shape} for "
                             f"{self.seen_embeddings.shape}")
        self.encoder.load_state_dict(state["encoder"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.seen_embeddings[:] = state["seen_embeddings"]
