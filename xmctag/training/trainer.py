"""``xmctag.train``: the whole training run, top to bottom.

1. Settle the settings (``settings.resolve_settings``: every "auto"), check what ``--out`` holds
   (``run_dir.check_out_dir``), read and check the inputs (``TrainingData.read``) and load the encoder. Nothing is
   written to ``--out`` before this step is over: a bad input leaves nothing behind.
2. Image fusion (``Config.vision``, ``images.prepare_fusion``): embed the images not cached yet with the frozen vision
   model; products (and labels) then carry one projected token per usable image (``xmctag.models.fusion``).
3. Dual-encoder stage (``dual_encoder.py``), then label vectors fitted on the frozen product embeddings of its best
   epoch (``label_vectors.py``), then the classifier stage (``classifier.py``, encoders): the encoder fine-tuned
   through a head started from those vectors, whose best epoch's head becomes the label vectors. Both stages run
   through ``stage.run_epochs``: dev evaluation after each epoch, the best epoch kept, a checkpoint for ``--resume``
   (``run_dir.save_checkpoint``). Their epochs are planned on the time budget when "auto" (``budget.py``).
4. Embed the training products for the neighbour votes (``xmctag.scoring``), evaluate on dev with the final scoring,
   and write the run directory (``xmctag.run_dir``) with its model card (``model_card.py``).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from xmctag import run_dir
from xmctag.config import Config
from xmctag.errors import UserError
from xmctag.evaluation.evaluator import evaluate_scores
from xmctag.label_groups import exclusive_groups, group_ids, group_names
from xmctag.losses import make_loss
from xmctag.models.build import prepare_model
from xmctag.models.embedding import encode_ids
from xmctag.models.fusion import FusedEncoder
from xmctag.models.lora import has_lora
from xmctag.models.registry import load_pretrained
from xmctag.progress import Progress
from xmctag.scoring import LabelVectors, NeighbourLabels
from xmctag.training.classifier import ClassifierStage
from xmctag.training.data import TrainingData
from xmctag.training.dual_encoder import DualEncoderStage
from xmctag.training.images import image_cache_dir, prepare_fusion
from xmctag.training.label_vectors import fit_label_vectors
from xmctag.training.model_card import write_model_card
from xmctag.training.schedule import seed_everything
from xmctag.training.settings import check_lengths, resolve_settings
from xmctag.training.stage import StageProgress, run_epochs, short
from xmctag.vision.cache import check_cache_dir


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


def train(train: str | Path, labels: str | Path, out: str | Path, dev: str | Path | None = None,
          config: Config | None = None, resume: bool = False, overwrite: bool = False, device: str = "auto",
          progress: bool = True) -> TrainResult:
    """Trains a model and writes a self-contained run directory to ``out``."""
    config = config or Config()
    config.validate()
    auto_vision = config.vision == "auto"
    config = resolve_settings(config, train)
    out, show, device_ = Path(out), Progress(progress), resolve_device(device)

    # 1. Nothing is written to --out before the inputs are read and the encoder loaded: a bad file or model name
    # leaves the directory as it was, and the corrected command runs as is.
    replace = run_dir.check_out_dir(out, resume, overwrite, {"--train": train, "--labels": labels, "--dev": dev})
    config = run_dir.check_resumed_config(out, config, resume and not replace, auto_vision)
    if config.vision != "none" and config.image_cache_dir:
        check_cache_dir(image_cache_dir(config, out))
    data = TrainingData.read(train, labels, dev, config)
    tokenizer, backbone = load_pretrained(config.encoder)
    check_lengths(config, tokenizer, backbone, label_images=data.labels.images is not None)
    run_dir.start(out, config, replace, show.log)
    seed_everything(config.seed)
    data.report(show)
    groups = _exclusive_groups(data, config, show)

    # 2. Images, the encoder to train, token ids.
    config, fusion = prepare_fusion(config, data, out, device_, show, explicit=not auto_vision)
    tokenizer, encoder = prepare_model(tokenizer, backbone, config, device_,  # decoders: prompt tokenizer, LoRA
                                       vision_dim=fusion["dim"] if fusion else None)
    if isinstance(encoder, FusedEncoder):
        usable = data.train_images.features[data.train_images.mask > 0]  # (images, V): the features it projects
        encoder.init_projection(usable[:: max(1, len(usable) // 1024)])
    data.tokenize(tokenizer, config)

    def save_encoder(model) -> None:
        run_dir.save_encoder(out, model, tokenizer)

    def dev_metrics(model, vectors: LabelVectors, neighbours=None, exclusive=None) -> dict[str, float]:
        products = encode_ids(model, data.dev_ids, data.pad_id, device=device_, images=data.dev_images)
        return evaluate_scores(products, vectors, data.dev.labels, config, data.inv_p, neighbours, exclusive)

    def evaluate(stage) -> dict[str, float]:
        vectors = stage.dev_vectors()  # before the dev products: the order the evaluation has always had
        return dev_metrics(stage.encoder, vectors)

    def embed_labels_and_products(model):
        with show.task("embedding labels and training products",
                       total=len(data.label_ids) + len(data.product_ids)) as update:
            return (encode_ids(model, data.label_ids, data.pad_id, device=device_, progress=update,
                               images=data.label_images),
                    encode_ids(model, data.product_ids, data.pad_id, device=device_, progress=update,
                               images=data.train_images))

    # 3a. The dual-encoder stage (or what a checkpoint says of it).
    loss_fn = make_loss(config)
    encoder.freeze_bottom(config.freeze_layers)
    checkpoint = run_dir.load_checkpoint(out) if resume else None  # restores the torch RNG
    in_classifier = checkpoint is not None and checkpoint["stage"] == ClassifierStage.name
    dual = DualEncoderStage(encoder, data, config, device_, loss_fn, save_encoder)
    if config.epochs != "auto":
        epochs = config.epochs
    elif checkpoint is not None:
        epochs = checkpoint["dual_encoder"]["epochs"]  # the plan of the run
    else:
        # With classifier_epochs "auto" too, the dual-encoder epochs get dual_encoder_budget_share of the budget,
        # the classifier stage the rest (where the budget binds, its epochs gained more per minute: RESULTS.md).
        shared = config.classifier_epochs == "auto" and not encoder.is_decoder
        epochs = dual.plan(config.time_budget_minutes * (config.dual_encoder_budget_share if shared else 1.0), show)
    if in_classifier and epochs != checkpoint["dual_encoder"]["epochs"]:
        raise UserError(f"--resume {out}: the run is in its classifier stage, after "
                        f"{checkpoint['dual_encoder']['epochs']} epoch(s); --epochs can no longer change")
    dual.start(epochs)
    if checkpoint is not None:
        dual.progress = StageProgress.from_dict({**checkpoint["dual_encoder"], "epochs": epochs})
        if not in_classifier:
            dual.load_state(checkpoint["state"])
            show.log(f"resuming after epoch {dual.progress.done} of {epochs}")
    run_epochs(dual, evaluate if data.dev is not None else None, lambda: run_dir.save_checkpoint(out, {
        "stage": dual.name, "dual_encoder": dual.progress.to_dict(), "state": dual.state()}), show)

    # 3b. Label vectors on frozen product embeddings of the kept encoder.
    started = time.perf_counter()
    if in_classifier:
        show.log(f"resuming the classifier stage after epoch {checkpoint['classifier']['done']} of "
                 f"{checkpoint['classifier']['epochs']}")
        vectors = checkpoint["state"]["head"]  # the head as checkpointed: the stage goes on from there
    else:
        best = dual.progress.best.epoch
        if best == 0:
            save_encoder(encoder)  # zero epochs: the pretrained encoder as is
        elif best != epochs:
            show.log(f"keeping the encoder of epoch {best} (best on dev)")
            encoder = run_dir.load_encoder(out).to(device_)
        if has_lora(encoder.backbone):
            # The saved encoder has the adapters merged into plain weights: about 1.5x faster to run than base + A
            # + B (SmolLM2 on CPU), and what export and tagging load, so the label and neighbour embeddings saved
            # below come from the very weights the bundle will run.
            encoder = run_dir.load_encoder(out).to(device_)
        label_embeddings, products = embed_labels_and_products(encoder)
        with show.task("label vectors", total=config.label_vector_epochs, unit="epochs") as update:
            vectors = fit_label_vectors(products, data.train.labels, label_embeddings,
                                        scale=config.label_vector_scale, epochs=config.label_vector_epochs,
                                        lr=config.label_vector_lr, seed=config.seed, device=device_, progress=update)

    # 3c. The classifier stage; the head of its best epoch becomes the label vectors, and the products (neighbour
    # votes) and label texts are embedded again with that epoch's encoder.
    classifier = None
    if in_classifier:
        classifier = ClassifierStage(encoder, data, vectors, config, device_, save_encoder)
        classifier.start(checkpoint["classifier"]["epochs"])
        classifier.progress = StageProgress.from_dict(checkpoint["classifier"])
        classifier.load_state(checkpoint["state"])
    elif _classifier_applies(config, encoder, len(vectors.bias), show):
        classifier = ClassifierStage(encoder, data, vectors, config, device_, save_encoder)
        minutes_left = config.time_budget_minutes - sum(r["seconds"] for r in dual.progress.history) / 60
        planned = (classifier.plan(minutes_left, show) if config.classifier_epochs == "auto"
                   else config.classifier_epochs)
        if planned:
            classifier.start(planned)
        else:
            classifier = None
    if classifier is not None:
        run_epochs(classifier, evaluate if data.dev is not None else None, lambda: run_dir.save_checkpoint(out, {
            "stage": classifier.name, "dual_encoder": dual.progress.to_dict(),
            "classifier": classifier.progress.to_dict(), "state": classifier.state()}), show)
        kept = classifier.progress.best.epoch
        show.log(f"classifier stage: keeping epoch {kept} of {classifier.progress.epochs}"
                 + (" (best on dev)" if data.dev is not None else ""))
        if kept != classifier.progress.epochs:
            encoder = run_dir.load_encoder(out).to(device_)  # the best epoch's, saved by the stage
        label_embeddings, products = embed_labels_and_products(encoder)
        vectors = classifier.best_head

    # 4. The final model: neighbours, dev metrics, the run directory.
    final = {"stage": "label vectors", "seconds": round(time.perf_counter() - started, 1)}
    neighbours = (products, NeighbourLabels.from_lists(data.train.labels)) if config.knn_neighbours > 0 else None
    dev_result = None
    if data.dev is not None:
        # Both, on one embedding of the dev set: the label vectors alone (for the record) and the final scoring.
        dev_products = encode_ids(encoder, data.dev_ids, data.pad_id, device=device_, images=data.dev_images)
        final["dev_label_vectors"] = evaluate_scores(dev_products, vectors, data.dev.labels, config, data.inv_p)
        dev_result = final["dev"] = evaluate_scores(dev_products, vectors, data.dev.labels, config, data.inv_p,
                                                    neighbours)
        if groups is not None:  # for the record: what `tag --exclusive-groups` would give
            final["dev_exclusive_groups"] = evaluate_scores(dev_products, vectors, data.dev.labels, config,
                                                            data.inv_p, neighbours, groups)
            show.log("with exclusive groups: dev " + short(final["dev_exclusive_groups"]))
        show.log("label vectors: dev " + short(final["dev_label_vectors"]))
        if neighbours is not None:
            show.log(f"label vectors + {config.knn_neighbours} neighbours: dev " + short(dev_result))
    classifier_progress = classifier.progress if classifier is not None else StageProgress()
    history = dual.progress.history + classifier_progress.history + [final]
    run_dir.save_labels(out, data.labels, label_embeddings, vectors, data.train_label_counts())
    (out / run_dir.METRICS).write_text(json.dumps({
        "history": history, "dev": dev_result, "best_epoch": dual.progress.best.epoch or -1, "epochs": epochs,
        "classifier_epochs": classifier_progress.done, "classifier_best_epoch": classifier_progress.best.epoch,
        "n_train": len(data.train)}, indent=2) + "\n")
    if neighbours is not None:
        run_dir.save_neighbours(out, products, data.train.labels)
    run_dir.save_sample_texts(out, data.train.texts, data.train_images)
    write_model_card(out, config, data.train, data.dev, dev_result, epochs, data.labels.exclusive,
                     classifier_epochs=classifier_progress.done)
    run_dir.finish(out)
    return TrainResult(out, history, dev_result)


def _exclusive_groups(data: TrainingData, config: Config, show: Progress):
    """Each label's exclusive group, set on the label table (saved with it), as ids for scoring; None: none."""
    data.labels.exclusive = exclusive_groups(group_names(data.labels, config), data.train.labels)
    groups = group_ids(data.labels.exclusive)
    if groups is not None:
        names = Counter(g for g in data.labels.exclusive if g is not None)
        show.log("exclusive label groups (tag --exclusive-groups keeps one label of each): "
                 + ", ".join(f"{g} ({n} labels)" for g, n in names.items()))
    return groups


def _classifier_applies(config: Config, encoder, n_labels: int, show: Progress) -> bool:
    """Whether the classifier stage runs: not when off, for a decoder, or above ``classifier_max_labels``."""
    if config.classifier_epochs == 0:
        return False
    if encoder.is_decoder:
        show.log("classifier stage: skipped (encoder models only)")
        return False
    if n_labels > config.classifier_max_labels:
        show.log(f"classifier stage: skipped ({n_labels:,} labels > classifier_max_labels "
                 f"{config.classifier_max_labels:,})")
        return False
    return True
