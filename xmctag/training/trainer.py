"""``xmctag.train``: the whole training run, top to bottom.

0. Check what ``--out`` holds (``_check_out_dir``). Nothing is written to it before the inputs of step 1 are read
   and the encoder is loaded: a bad input leaves nothing behind.
1. Read the label table, the training catalog and (optionally) a dev catalog; tokenise everything once. With image
   fusion (``Config.vision``, ``xmctag.training.images``), embed their images not cached yet with the frozen vision
   model; products (and labels) then carry one projected token per usable image (``xmctag.models.fusion``), the
   projection trained jointly with the encoder at its own learning rate ``image_lr``.
2. Siamese dual-encoder training: each step takes a batch of products, samples one positive label for each,
   embeds products and the batch's labels with the same encoder, and applies the loss (encoders: the triplet
   loss with the hardest in-batch negatives; decoders: InfoNCE over the batch's labels, see ``resolve_kind_defaults``
   in ``xmctag.models.decoder``). From ``cluster_start_epoch`` on, batches are made of clusters of similar products
   (clustered on the embeddings seen during the previous epoch), so that in-batch negatives are hard.
3. After each epoch: dev evaluation (when a dev set is given), best model kept, checkpoint for ``--resume``.
4. Second stage: embed all training products with the best encoder, fit per-label vectors on them
   (``label_vectors.py``).
5. Third stage (encoders, ``classifier_epochs``): fine-tune the encoder through a one-vs-all head started from
   those label vectors (``classifier.py``); after each epoch, as in step 3: dev evaluation of its head, best epoch
   kept, checkpoint (the same ``checkpoint.pt``: ``--resume`` goes on with the next classifier epoch). The kept
   head becomes the label vectors and the products are embedded again. Keep the product embeddings for the
   neighbour votes (``xmctag.scoring``), evaluate on dev with the final scoring, and write the run directory (see
   ``xmctag.run_dir``).
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from xmctag import run_dir as layout
from xmctag.config import Config
from xmctag.data import LabelledSet, LabelTable, load_labelled_set
from xmctag.errors import UserError
from xmctag.evaluation.evaluator import evaluate_scores
from xmctag.label_groups import exclusive_groups, group_ids, group_names
from xmctag.losses import make_loss
from xmctag.models.decoder import has_lora, is_decoder_config, learning_rate, prepare_model, resolve_kind_defaults
from xmctag.models.embedding import encode_ids
from xmctag.models.fusion import FusedEncoder, ImageInputs
from xmctag.models.prompt import prompt_tokenizer
from xmctag.models.registry import load_pretrained
from xmctag.models.tokens import pad, pad_id_of, token_ids
from xmctag.overwrite import check_replaceable
from xmctag.progress import Progress
from xmctag.scoring import NeighbourLabels
from xmctag.training.batching import balanced_clusters, batches_from_clusters, random_batches
from xmctag.training.classifier import ClassifierStage, plan_classifier_epochs
from xmctag.training.images import image_cache_dir, prepare_images, resolve_vision
from xmctag.training.label_vectors import LabelVectors, fit_label_vectors
from xmctag.vision.cache import check_cache_dir

CPU_CHUNK = 32  # sequences per forward pass when training on CPU (see _embed_with_grad)
PROBE_STEPS = 3  # timed forward+backward passes that plan the number of epochs under epochs="auto"


@dataclass
class TrainResult:
    run_dir: Path
    history: list[dict]  # one entry per epoch (loss, seconds, dev metrics) plus the final label-vector entry
    dev_metrics: dict[str, float] | None  # final metrics of the saved model on the dev set


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available to PyTorch")
    return torch.device(device)


def train(
    train: str | Path,
    labels: str | Path,
    out: str | Path,
    dev: str | Path | None = None,
    config: Config | None = None,
    resume: bool = False,
    overwrite: bool = False,
    device: str = "auto",
    progress: bool = True,
) -> TrainResult:
    """Trains a model and writes a self-contained run directory to ``out``."""
    config = config or Config()
    config.validate()
    auto_vision = config.vision == "auto"
    config = resolve_vision(config, train)  # "auto" -> a vision model or "none", saved as such
    config = resolve_kind_defaults(config)  # loss / centering "auto" -> the encoder kind's, saved as such
    out = Path(out)
    show = Progress(progress)
    dev_ = resolve_device(device)
    replace = _check_out_dir(out, resume, overwrite, {"--train": train, "--labels": labels, "--dev": dev})
    config = _check_resumed_config(out, config, resume and not replace, auto_vision)
    if config.vision != "none" and config.image_cache_dir:
        check_cache_dir(image_cache_dir(config, out))

    # Inputs are read and the encoder loaded before anything is written to --out: a bad file or model name
    # leaves the directory as it was, and the corrected command runs as is.
    label_table = LabelTable.load(labels, config)
    train_set = load_labelled_set(train, config, label_table)
    dev_set = load_labelled_set(dev, config, label_table) if dev is not None else None
    _check_label_count(labels, label_table, train, train_set)
    tokenizer, backbone = load_pretrained(config.encoder)
    _check_lengths(config, tokenizer, backbone, label_images=label_table.images is not None)
    if replace:
        show.log(replace)
        layout.clear_run(out)
    out.mkdir(parents=True, exist_ok=True)
    config.save(out / layout.CONFIG)
    _seed_everything(config.seed)

    _report_data(show, "train", train, train_set)
    if dev_set is not None:
        _report_data(show, "dev", dev, dev_set)
    label_table.exclusive = exclusive_groups(group_names(label_table, config), train_set.labels)
    groups = group_ids(label_table.exclusive)
    if groups is not None:
        names = Counter(g for g in label_table.exclusive if g is not None)
        show.log("exclusive label groups (tag --exclusive-groups keeps one label of each): "
                 + ", ".join(f"{g} ({n} labels)" for g, n in names.items()))
    inv_p = layout.inverse_propensities(train_set.label_counts(len(label_table)), len(train_set), config)
    fusion, train_images, dev_images, label_images = None, None, None, None
    if config.vision != "none":
        fusion, images = prepare_images(config, out, {
            "train": (Path(train), train_set.images), "dev": (Path(dev or train), dev_set.images if dev_set else None),
            "labels": (Path(labels), label_table.images)}, dev_, show, explicit=not auto_vision)
    if fusion is None and config.vision != "none":  # vision "auto", and no training product has a usable image
        config = dataclasses.replace(config, vision="none")
        config.save(out / layout.CONFIG)  # text only, as export and tagging will read it
    elif fusion is not None:
        train_images, dev_images, label_images = images["train"], images["dev"], images["labels"]
        layout.save_fusion(out, fusion)  # before any save_encoder: load_encoder reads it

    tokenizer, encoder = prepare_model(tokenizer, backbone, config, dev_,  # decoders: prompt tokenizer, LoRA
                                       vision_dim=fusion["dim"] if fusion else None)
    if isinstance(encoder, FusedEncoder):
        usable = train_images.features[train_images.mask > 0]  # (images, V): the features it will project
        encoder.init_projection(usable[:: max(1, len(usable) // 1024)])
    pad_id = pad_id_of(tokenizer)
    product_ids = _token_ids(tokenizer, train_set.texts, config.max_length, train_images)
    label_ids = _token_ids(tokenizer, label_table.texts, config.label_max_length, label_images)
    dev_ids = _token_ids(tokenizer, dev_set.texts, config.max_length, dev_images) if dev_set else None

    def dev_metrics(vectors: LabelVectors | None = None) -> dict[str, float]:
        """Dev products scored against ``vectors``; by default the dual encoder alone: the label-text embeddings."""
        if vectors is None:
            vectors = LabelVectors.from_text_embeddings(encode_ids(encoder, label_ids, pad_id, device=dev_,
                                                                   images=label_images), config.label_vector_scale)
        return evaluate_scores(encode_ids(encoder, dev_ids, pad_id, device=dev_, images=dev_images), vectors,
                               dev_set.labels, config, inv_p)

    loss_fn = make_loss(config)
    encoder.freeze_bottom(config.freeze_layers)
    checkpoint = out / layout.CHECKPOINT
    resumed = _load_checkpoint(checkpoint) if resume and checkpoint.exists() else None
    if config.epochs != "auto":
        epochs = config.epochs
    elif resumed is not None:
        epochs = resumed["epochs"]  # the plan of the run
    else:
        # With classifier_epochs "auto" too, the dual-encoder epochs get dual_encoder_budget_share of the budget,
        # the classifier stage the rest (where the budget binds, its epochs gained more per minute: RESULTS.md).
        shared = config.classifier_epochs == "auto" and not encoder.is_decoder
        share = config.dual_encoder_budget_share if shared else 1.0
        epochs = _plan_epochs(config, encoder, loss_fn, train_set, product_ids, label_ids, pad_id, dev_, show,
                              (train_images, label_images), budget=config.time_budget_minutes * share)
    # A checkpoint of the classifier stage: the dual-encoder stage and the label vectors are behind it.
    classifier = resumed["classifier"] if resumed is not None and resumed.get("stage") == "classifier" else None
    if classifier is not None and epochs != resumed["epochs"]:
        raise UserError(f"--resume {out}: the run is in its classifier stage, after {resumed['epochs']} epoch(s); "
                        "--epochs can no longer change")
    optimizer = torch.optim.AdamW(_param_groups(encoder, config), lr=learning_rate(encoder, config),
                                  weight_decay=config.weight_decay)
    steps_per_epoch = -(-len(train_set) // config.batch_size)
    scheduler = _warmup_linear_decay(optimizer, config.warmup_steps, max(1, steps_per_epoch * epochs))
    seen_embeddings = np.zeros((len(train_set), encoder.dim), dtype=np.float32)  # for clustering
    history: list[dict] = []
    best = {"score": -1.0, "epoch": -1}
    start_epoch = 0
    if resumed is not None:
        start_epoch, history, best = resumed["epoch"], resumed["history"], resumed["best"]
        if classifier is None:
            encoder.load_state_dict(resumed["encoder"])
            optimizer.load_state_dict(resumed["optimizer"])
            scheduler.load_state_dict(resumed["scheduler"])
            seen_embeddings[:] = resumed["seen_embeddings"]
            show.log(f"resuming after epoch {start_epoch} of {epochs}")

    for epoch in range(start_epoch, epochs):
        rng = np.random.default_rng(config.seed + epoch)
        if epoch >= config.cluster_start_epoch:
            clusters = balanced_clusters(seen_embeddings, config.cluster_size, rng)
            batches = batches_from_clusters(clusters, config.batch_size, rng)
        else:
            batches = random_batches(len(train_set), config.batch_size, rng)
        encoder.train()
        started, total_loss = time.perf_counter(), 0.0
        with show.task(f"epoch {epoch + 1}/{epochs}", total=len(train_set), unit="pairs") as update:
            for batch in batches:
                loss, embeddings = _train_step(encoder, loss_fn, optimizer, scheduler, config, train_set, batch,
                                               product_ids, label_ids, pad_id, rng, dev_, (train_images, label_images))
                seen_embeddings[batch] = embeddings
                total_loss += loss * len(batch)
                update(len(batch), loss=loss)
        record = {"epoch": epoch + 1, "loss": total_loss / len(train_set),
                  "seconds": round(time.perf_counter() - started, 1)}
        if dev_set is not None:
            record["dev"] = dev_metrics()
            score = _dev_score(record["dev"])
            show.log(f"epoch {epoch + 1}: loss {record['loss']:.4f}, dev " + _short(record["dev"]))
        else:
            score = epoch  # without a dev set the last epoch is the best
            show.log(f"epoch {epoch + 1}: loss {record['loss']:.4f}")
        history.append(record)
        if score > best["score"]:
            best = {"score": score, "epoch": epoch + 1}
            layout.save_encoder(out, encoder, tokenizer)
        _save_checkpoint(checkpoint, {"stage": "dual encoder", "epoch": epoch + 1, "epochs": epochs,
                                      "history": history, "best": best, "encoder": encoder.state_dict(),
                                      "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                      "seen_embeddings": seen_embeddings})

    # Second stage: label vectors on frozen product embeddings of the kept encoder.
    def embed_labels_and_products():
        with show.task("embedding labels and training products", total=len(label_ids) + len(product_ids)) as update:
            return (encode_ids(encoder, label_ids, pad_id, device=dev_, progress=update, images=label_images),
                    encode_ids(encoder, product_ids, pad_id, device=dev_, progress=update, images=train_images))

    started = time.perf_counter()
    if classifier is None:
        if epochs == 0 or best["epoch"] < 0:
            layout.save_encoder(out, encoder, tokenizer)  # zero epochs: the pretrained encoder as is
        elif best["epoch"] != epochs:
            show.log(f"keeping the encoder of epoch {best['epoch']} (best on dev)")
            encoder = layout.load_encoder(out).to(dev_)
        if has_lora(encoder.backbone):
            # The saved encoder has the adapters merged into plain weights: about 1.5x faster to run than base + A
            # + B (SmolLM2 on CPU), and what export and tagging load, so the label and neighbour embeddings saved
            # below come from the very weights the bundle will run.
            encoder = layout.load_encoder(out).to(dev_)
        label_embeddings, products = embed_labels_and_products()
        with show.task("label vectors", total=config.label_vector_epochs, unit="epochs") as update:
            vectors = fit_label_vectors(products, train_set.labels, label_embeddings,
                                        scale=config.label_vector_scale, epochs=config.label_vector_epochs,
                                        lr=config.label_vector_lr, seed=config.seed, device=dev_, progress=update)
    else:
        show.log(f"resuming the classifier stage after epoch {classifier['epoch']} of {classifier['epochs']}")
        vectors = classifier["head"]  # the head as checkpointed: the stage goes on from there
    # Third stage: the encoder fine-tuned through a classifier head started from those label vectors; the head of
    # the epoch kept becomes the label vectors, and the products (neighbour votes) and label texts are embedded
    # again.
    dual_encoder_minutes = sum(r["seconds"] for r in history if "epoch" in r) / 60

    def save_classifier_checkpoint(state: dict) -> None:
        _save_checkpoint(checkpoint, {"stage": "classifier", "epoch": epochs, "epochs": epochs, "history": history,
                                      "best": best, "classifier": state})

    classifier_history, head, classifier_best = _classifier_stage(
        config, encoder, product_ids, train_set, vectors, pad_id, dev_, train_images,
        config.time_budget_minutes - dual_encoder_minutes, show, dev_metrics if dev_set is not None else None,
        lambda: layout.save_encoder(out, encoder, tokenizer), save_classifier_checkpoint, classifier)
    if head is not None:
        history.extend(classifier_history)
        if classifier_best != len(classifier_history):
            encoder = layout.load_encoder(out).to(dev_)  # the best epoch's, saved by the stage
        label_embeddings, products = embed_labels_and_products()
        vectors = head
    final = {"stage": "label vectors", "seconds": round(time.perf_counter() - started, 1)}
    neighbours = (products, NeighbourLabels.from_lists(train_set.labels)) if config.knn_neighbours > 0 else None
    dev_result = None
    if dev_set is not None:
        # Both, on one embedding of the dev set: the label vectors alone (for the record) and the final scoring.
        dev_products = encode_ids(encoder, dev_ids, pad_id, device=dev_, images=dev_images)
        final["dev_label_vectors"] = evaluate_scores(dev_products, vectors, dev_set.labels, config, inv_p)
        dev_result = final["dev"] = evaluate_scores(dev_products, vectors, dev_set.labels, config, inv_p, neighbours)
        if groups is not None:  # for the record: what `tag --exclusive-groups` would give
            final["dev_exclusive_groups"] = evaluate_scores(dev_products, vectors, dev_set.labels, config, inv_p,
                                                            neighbours, groups)
            show.log("with exclusive groups: dev " + _short(final["dev_exclusive_groups"]))
        show.log("label vectors: dev " + _short(final["dev_label_vectors"]))
        if neighbours is not None:
            show.log(f"label vectors + {config.knn_neighbours} neighbours: dev " + _short(dev_result))
    history.append(final)

    layout.save_labels(out, label_table, label_embeddings, vectors, train_set.label_counts(len(label_table)),
                       len(train_set))
    (out / layout.METRICS).write_text(json.dumps({"history": history, "dev": dev_result, "best_epoch": best["epoch"],
                                                  "epochs": epochs, "classifier_epochs": len(classifier_history),
                                                  "classifier_best_epoch": classifier_best,
                                                  "n_train": len(train_set)}, indent=2) + "\n")
    if neighbours is not None:
        layout.save_neighbours(out, products, train_set.labels)
    layout.save_sample_texts(out, train_set.texts, train_images)
    layout.write_model_card(out, config, train_set, dev_set, dev_result, epochs, label_table.exclusive,
                            classifier_epochs=len(classifier_history))
    checkpoint.unlink(missing_ok=True)
    return TrainResult(out, history, dev_result)


def _classifier_stage(config: Config, encoder, product_ids, train_set: LabelledSet, vectors: LabelVectors, pad_id,
                      device, train_images, minutes_left: float, show: Progress, dev_metrics, keep, save_checkpoint,
                      resumed: dict | None) -> tuple[list[dict], LabelVectors | None, int]:
    """Runs the classifier stage when it applies (``xmctag.training.classifier``) -> its history, the head of the
    epoch kept (None: no stage) and that epoch.

    After each epoch: ``dev_metrics(head)`` (None: no dev set) scores its head; the best epoch is kept (ties, and
    without a dev set: the later), ``keep()`` saving its encoder; ``save_checkpoint(state)`` saves the stage's state,
    which ``resumed`` (None: a new stage) continues from.
    """
    if resumed is None:
        if config.classifier_epochs == 0:
            return [], None, 0
        if encoder.is_decoder:
            show.log("classifier stage: skipped (encoder models only)")
            return [], None, 0
        if len(vectors.vectors) > config.classifier_max_labels:
            show.log(f"classifier stage: skipped ({len(vectors.vectors):,} labels > classifier_max_labels "
                     f"{config.classifier_max_labels:,})")
            return [], None, 0
    stage = ClassifierStage(encoder, product_ids, train_set.labels, vectors, pad_id, device, config, train_images)
    epochs = plan_classifier_epochs(config, stage, minutes_left, show) if resumed is None else resumed["epochs"]
    if epochs == 0:
        return [], None, 0
    history = list(resumed["history"]) if resumed else []
    best = dict(resumed["best"]) if resumed else {"score": -1.0, "epoch": 0, "head": None}

    def after_epoch(record: dict) -> None:
        epoch, head = record["classifier_epoch"], stage.head()
        if dev_metrics is not None:
            record["dev_head"] = dev_metrics(head)
            score = _dev_score(record["dev_head"])
            show.log(f"classifier epoch {epoch}: dev (its head) " + _short(record["dev_head"]))
        else:
            score = epoch
        history.append(record)
        if score >= best["score"]:
            best.update(score=score, epoch=epoch, head=head)
            keep()
        save_checkpoint({**stage.state(), "epochs": epochs, "history": history, "best": best})

    stage.run(epochs, show, after_epoch, resume=resumed)
    show.log(f"classifier stage: keeping epoch {best['epoch']} of {epochs}"
             + (" (best on dev)" if dev_metrics is not None else ""))
    return history, best["head"], best["epoch"]


def _dev_score(metrics: dict[str, float]) -> float:
    """What picks the best epoch of either stage on dev."""
    return metrics["P@1"] + metrics["P@5"]


def _token_ids(tokenizer, texts: list[str], max_length: int, images: ImageInputs | None) -> list[list[int]]:
    """Token ids; a decoder's prompt gets the image prefix on the rows that have a usable image."""
    return token_ids(tokenizer, texts, max_length, images.has_image if images is not None else None)


def _param_groups(encoder, config: Config, lr: float | None = None) -> list[dict]:
    """AdamW groups: the encoder's trainable weights at ``lr`` (default: its training rate); the image projection
    at ``image_lr``."""
    projection = list(encoder.image_projection.parameters()) if isinstance(encoder, FusedEncoder) else []
    skip = {id(p) for p in projection}
    groups = [{"params": [p for p in encoder.parameters() if p.requires_grad and id(p) not in skip],
               "lr": learning_rate(encoder, config) if lr is None else lr}]
    if projection:
        groups.append({"params": projection, "lr": config.image_lr})
    return groups


def _train_step(encoder, loss_fn, optimizer, scheduler, config, train_set: LabelledSet, batch, product_ids, label_ids,
                pad_id, rng, device, images=(None, None)):
    """One optimisation step on the products ``batch``; returns (loss, their embeddings as numpy)."""
    loss, products = _batch_loss(encoder, loss_fn, train_set, batch, product_ids, label_ids, pad_id, rng, device,
                                 images)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in encoder.parameters() if p.requires_grad], config.grad_clip)
    optimizer.step()
    scheduler.step()
    return float(loss.detach()), products.detach().float().cpu().numpy()


def _batch_loss(encoder, loss_fn, train_set: LabelledSet, batch, product_ids, label_ids, pad_id, rng, device,
                images=(None, None)):
    """Triplet loss of the products ``batch`` (one sampled positive each, in-batch labels as negatives).

    ``images``: ``(product ImageInputs, label ImageInputs)``, either None (text only).
    """
    product_images, label_images = images
    positives = np.array([rng.choice(train_set.labels[i]) for i in batch])
    batch_labels, positive_col = np.unique(positives, return_inverse=True)
    is_relevant = np.array([np.isin(batch_labels, train_set.labels[i]) for i in batch])
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        products = _embed_with_grad(encoder, [product_ids[i] for i in batch], pad_id, device,
                                    product_images.take(batch) if product_images is not None else None)
        labels = _embed_with_grad(encoder, [label_ids[i] for i in batch_labels], pad_id, device,
                                  label_images.take(batch_labels) if label_images is not None else None)
        scores = products.float() @ labels.float().T
        loss = loss_fn(scores, torch.from_numpy(positive_col).to(device), torch.from_numpy(is_relevant).to(device))
    return loss, products


def _plan_epochs(config: Config, encoder, loss_fn, train_set: LabelledSet, product_ids, label_ids, pad_id, device,
                 show: Progress, images=(None, None), budget: float | None = None) -> int:
    """``epochs = "auto"``: as many epochs (at most ``auto_max_epochs``) as fit in ``time_budget_minutes``.

    The time of an epoch is projected from a few forward+backward passes on random batches (no optimiser step, so
    the weights are untouched): the median pass after warm-up passes, each timed to the end of its GPU work. (The
    first passes on a GPU are several times slower than the rest: with one warm-up pass and a plain mean, an H100
    measured MiniLM at 299 pairs/s and trained at 1,770.) An epoch that would not fit is not started: on 2 CPU
    cores a 45k-row catalog of long titles gets 0 epochs (the pretrained encoder plus label vectors and neighbour
    votes), a short-title catalog gets several, a GPU gets the maximum.
    """
    rng = np.random.default_rng(config.seed)
    batches = random_batches(len(train_set), config.batch_size, rng)[:probe_warmup(device) + PROBE_STEPS]
    pairs_per_second = probe_rate(encoder, batches, device, lambda batch: _batch_loss(
        encoder, loss_fn, train_set, batch, product_ids, label_ids, pad_id, rng, device, images)[0])
    epoch_minutes = len(train_set) / pairs_per_second / 60
    budget = config.time_budget_minutes if budget is None else budget
    epochs = epochs_that_fit(config, epoch_minutes, budget)
    show.log(f"epochs auto: ~{pairs_per_second:.0f} pairs/s, ~{epoch_minutes:.1f} min per epoch, budget "
             f"{budget:g} min -> {epochs} epoch(s)" + ("; the pretrained encoder is kept as is" if not epochs else ""))
    return epochs


def probe_warmup(device) -> int:
    """Untimed passes before the timed ones: allocations, kernel selection for new shapes (GPU passes are cheap,
    CPU ones not)."""
    return 3 if device.type == "cuda" else 1


def probe_rate(encoder, batches: list[np.ndarray], device, loss_of) -> float:
    """Items per second of forward+backward passes ``loss_of(batch).backward()`` over ``batches`` (no optimiser
    step: the weights are untouched): the median pass after the first ``probe_warmup`` ones, each timed to the end
    of its GPU work."""
    warmup = probe_warmup(device)
    encoder.train()
    rates = []
    for step, batch in enumerate(batches):
        started = time.perf_counter()
        loss_of(batch).backward()
        encoder.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            rates.append(len(batch) / max(time.perf_counter() - started, 1e-9))
    return float(np.median(rates)) if rates else float("inf")


def epochs_that_fit(config: Config, epoch_minutes: float, budget: float) -> int:
    """Whole epochs of ``epoch_minutes`` within ``budget`` minutes, at most ``auto_max_epochs`` (all of them when
    ``time_budget_minutes`` is 0, no limit)."""
    if config.time_budget_minutes <= 0:
        return config.auto_max_epochs
    return min(config.auto_max_epochs, int(max(budget, 0.0) // epoch_minutes))


def _embed_with_grad(encoder, ids: list[list[int]], pad_id: int, device,
                     images: ImageInputs | None = None) -> torch.Tensor:
    """Embeddings of ``ids`` in input order, keeping the graph for backward.

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


def _warmup_linear_decay(optimizer, warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _check_out_dir(out: Path, resume: bool, overwrite: bool, inputs: dict) -> str | None:
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
    state = layout.run_state(out)
    if (overwrite and not resume) or state == "started":
        check_replaceable(out, layout.is_run_dir, "an xmctag run directory", inputs)
        return (f"replacing the run in {out}" if overwrite else
                f"replacing the run in {out}: it stopped before its first checkpoint, nothing to resume")
    if state is None:
        raise UserError(f"--out {out}: directory is not empty and not an xmctag run directory")
    if state == "finished":
        done = json.loads((out / layout.METRICS).read_text())
        stages = f"{done.get('epochs')} epoch(s) + {done.get('classifier_epochs', 0)} classifier epoch(s)"
        if resume:
            raise UserError(f"--resume {out}: run already finished ({stages}); --resume only continues an "
                            "interrupted run (--overwrite trains it again)")
        raise UserError(f"--out {out}: directory is not empty: it holds a finished run ({stages}); use --overwrite "
                        "to replace it")
    if not resume:
        raise UserError(f"--out {out}: directory is not empty: it holds an interrupted run (use --resume to continue "
                        "it or --overwrite)")
    return None


def _check_resumed_config(out: Path, config: Config, resume: bool, auto_vision: bool = False) -> Config:
    """A resumed run must keep its settings; only ``epochs`` may change (an interrupted run may train longer).
    Returns ``config``, text only if the run being resumed fell back to it (``vision`` "auto" without a usable
    image, see ``prepare_images``)."""
    if not (resume and (out / layout.CONFIG).exists()):
        return config
    saved = Config.load(out / layout.CONFIG).to_dict()
    if auto_vision and saved["vision"] == "none":
        config = dataclasses.replace(config, vision="none")
    changed = [f"{k} {saved[k]!r} -> {v!r}" for k, v in config.to_dict().items() if k != "epochs" and saved[k] != v]
    if changed:
        raise UserError(f"--resume {out}: settings differ from the run being resumed: {'; '.join(changed)}")
    return config


def _check_label_count(labels_path, label_table: LabelTable, train_path, train_set: LabelledSet) -> None:
    """A ranking needs two labels: with one, every in-batch negative is the positive itself, the loss is 0 and
    nothing is learnt."""
    if len(label_table) < 2:
        raise UserError(f"{labels_path}: the label table has {len(label_table)} label; a ranking needs at least 2")
    used = np.unique(np.concatenate(train_set.labels))
    if len(used) < 2:
        raise UserError(f"{train_path}: every training row carries the one label {label_table.ids[used[0]]!r}; "
                        "a ranking needs at least 2 distinct labels in training")


def _check_lengths(config: Config, tokenizer, backbone, label_images: bool) -> None:
    """``max_length`` and ``label_max_length`` against the backbone, before anything is written.

    A sequence longer than the model's position embeddings trains as long as no text reaches that length, then
    crashes tagging in ONNX Runtime. Encoders read ``max_images`` image tokens on top of the text; a decoder's prompt
    holds them and its fixed parts within the length (``xmctag.models.prompt``), which must leave room for text.
    """
    images = config.vision != "none"
    lengths = [("max_length", config.max_length, images),
               ("label_max_length", config.label_max_length, images and label_images)]
    decoder = is_decoder_config(backbone.config)
    if decoder:
        template = prompt_tokenizer(tokenizer, backbone.config, config).template
        for name, value, has_image in lengths:
            template.title_budget(value, has_image, setting=name)
    limit = getattr(backbone.config, "max_position_embeddings", None)
    if not isinstance(limit, int):
        return
    # RoBERTa-style embeddings number positions from padding_idx + 1: that many fewer are usable.
    padding_idx = getattr(getattr(backbone, "embeddings", None), "padding_idx", None)
    usable = limit - (padding_idx + 1 if isinstance(padding_idx, int) else 0)
    for name, value, has_image in lengths:
        slots = config.max_images if has_image and not decoder else 0
        if value + slots > usable:
            plus = f" + {slots} image token(s)" if slots else ""
            raise UserError(f"{name} {value}{plus} is more than the {usable} positions of {config.encoder} "
                            f"(max_position_embeddings {limit}); set {name} to at most {usable - slots}")


def _save_checkpoint(path: Path, state: dict) -> None:
    """Writes the state after an epoch (either stage's: see ``train``), with the torch RNG, for ``--resume``."""
    tmp = path.with_name(layout.CHECKPOINT_TMP)
    torch.save({**state, "torch_rng": torch.get_rng_state()}, tmp)
    tmp.replace(path)  # a crash while saving never leaves a truncated checkpoint


def _load_checkpoint(path: Path) -> dict:
    """What ``_save_checkpoint`` wrote; the torch RNG is restored."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    torch.set_rng_state(state["torch_rng"])
    return state


def _report_data(show: Progress, name: str, path, data: LabelledSet) -> None:
    skipped = ", ".join(f"{n} {reason}" for reason, n in data.skipped.items())
    show.log(f"{name}: {len(data)} rows from {path}" + (f" (skipped: {skipped})" if skipped else "")
             + (f"; {data.unknown_labels} label mention(s) not in the label table ignored"
                if data.unknown_labels else ""))


def _short(metrics: dict[str, float]) -> str:
    keys = [k for k in ("P@1", "P@5", "nDCG@5", "PSP@5", "R@5") if k in metrics]
    return " ".join(f"{k} {100 * metrics[k]:.2f}" for k in keys)
