"""``xmctag.train``: the whole training run, top to bottom.

1. Settle the settings (``settings.resolve_settings``: every "auto"), check what ``--out`` holds
   (``run_dir.check_out_dir``), read and check the inputs (``TrainingData.read``) and load the encoder. Nothing is
   written to ``--out`` before this step is over: a bad input leaves nothing behind.
2. Image fusion (``Config.vision``, ``images.prepare_fusion``): embed the images not cached yet with the frozen vision
   model; products (and labels) then carry one projected token per usable image (``xmctag.models.fusion``).
3. The lexical model's features and label trees (``lexical.py``; their minutes come out of the time budget), then the
   dual-encoder stage (``dual_encoder.py``), then label vectors fitted on the frozen product embeddings of its best
   epoch (``label_vectors.py``), then the classifier stage (``classifier.py``, encoders): the encoder fine-tuned
   through a head started from those vectors, whose best epoch's head becomes the label vectors. Both stages run
   through ``stage.run_epochs``: dev evaluation after each epoch, the best epoch kept, a checkpoint for ``--resume``
   (``run_dir.save_checkpoint``). Their epochs are planned on the time budget when "auto" (``budget.py``).
4. Embed the training products for the neighbour votes (``xmctag.scoring``); fit the weights that fuse the lexical
   model's scores with the dense ones (on dev, ``lexical.py``); evaluate on dev with the final scoring (dense,
   lexical and fused rankings recorded), and write the run directory (``xmctag.run_dir``) with its model card
   (``model_card.py``).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from xmctag import run_dir
from xmctag.config import Config
from xmctag.errors import UserError
from xmctag.evaluation.evaluator import evaluate_scores
from xmctag.evaluation.metrics import evaluate_rankings
from xmctag.label_groups import exclusive_groups, group_ids, group_names
from xmctag.losses import make_loss
from xmctag.models.build import prepare_model
from xmctag.models.embedding import encode_ids
from xmctag.models.fusion import FusedEncoder
from xmctag.models.lora import has_lora
from xmctag.models.registry import load_pretrained
from xmctag.progress import Progress
from xmctag.scoring import LabelVectors, NeighbourLabels
from xmctag.summary import run_summary
from xmctag.training.classifier import ClassifierStage
from xmctag.training.data import TrainingData
from xmctag.training.dual_encoder import DualEncoderStage
from xmctag.training.images import image_cache_dir, prepare_fusion
from xmctag.training.label_vectors import fit_label_vectors
from xmctag.training.lexical import fit_lexical_fusion, train_lexical_stage
from xmctag.training.memory import check_memory, estimate_memory
from xmctag.training.model_card import write_model_card
from xmctag.training.resume import load_state, read_checkpoint
from xmctag.training.schedule import seed_everything
from xmctag.training.settings import check_lengths, resolve_settings
from xmctag.training.stage import StageProgress, run_epochs, short
from xmctag.vision.cache import check_cache_dir
from xmctag.vision.netguard import HostPolicy


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
          progress: bool = True, summary_json: str | Path | None = None,
          image_hosts: Sequence[str] = ()) -> TrainResult:
    """Trains a model and writes a self-contained run directory to ``out`` (``run_training``); ``summary_json``:
    where to write the run's summary, however it ends (``xmctag.summary.run_summary``).

    ``image_hosts``: hosts, addresses and CIDR networks that image URLs may reach although they are not public
    (``xmctag.vision.netguard``). A setting of this machine's network, not of the model: not saved with the run, so
    a resumed run needs it again.
    """
    with run_summary(summary_json, "train", run_dir=str(out), train=str(train), labels=str(labels),
                     dev=str(dev) if dev is not None else None) as report:
        result = run_training(train, labels, out, dev, config, resume, overwrite, device, progress, image_hosts)
        metrics = json.loads((result.run_dir / run_dir.METRICS).read_text())
        report.update({k: v for k, v in metrics.items() if k != "history"})
    return result


def run_training(train: str | Path, labels: str | Path, out: str | Path, dev: str | Path | None = None,
                 config: Config | None = None, resume: bool = False, overwrite: bool = False, device: str = "auto",
                 progress: bool = True, image_hosts: Sequence[str] = ()) -> TrainResult:
    """The training run, top to bottom (see the module docstring)."""
    config = config or Config()
    config.validate()
    HostPolicy(image_hosts)  # a bad entry fails now, not after the data is read
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
    _check_memory(config, data, backbone, device_, show)
    run_dir.start(out, config, replace, show.log)
    seed_everything(config.seed)
    data.report(show)
    groups = _exclusive_groups(data, config, show)

    # 2. Images, the encoder to train, token ids.
    config, fusion = prepare_fusion(config, data, out, device_, show, explicit=not auto_vision,
                                    image_hosts=image_hosts)
    tokenizer, encoder = prepare_model(tokenizer, backbone, config, device_,  # decoders: prompt tokenizer, LoRA
                                       vision_dim=fusion["dim"] if fusion else None)
    if isinstance(encoder, FusedEncoder):
        usable = data.train_images.features[data.train_images.mask > 0]  # (images, V): the features it projects
        encoder.init_projection(usable[:: max(1, len(usable) // 1024)])
    data.tokenize(tokenizer, config)

    # 3. The stages, each resumed from the checkpoint where it has one.
    encoder.freeze_bottom(config.freeze_layers)
    checkpoint = read_checkpoint(out, (DualEncoderStage, ClassifierStage)) if resume else None  # + torch RNG
    run = Run(out, config, data, tokenizer, device_, show, checkpoint)
    lexical = None
    if config.lexical != "none":  # first: its minutes come out of the time budget the stages plan on
        lexical, run.lexical_minutes = train_lexical_stage(data, config, out, show)
    dual = _dual_encoder_stage(run, encoder)
    started = time.perf_counter()
    encoder, vectors, label_embeddings, products = _label_vectors(run, dual, encoder)
    classifier = _classifier_stage(run, dual, encoder, vectors, products)
    if classifier is not None:  # its best epoch's head is the label vectors; embeddings again, with its encoder
        if classifier.progress.best.epoch != classifier.progress.epochs:
            encoder = run_dir.load_encoder(out).to(device_)  # the best epoch's, saved by the stage
        label_embeddings, products = run.embed_labels_and_products(encoder)
        vectors = classifier.best_head

    # 4. The final model: neighbours, dev metrics, the run directory.
    final: dict[str, Any] = {"stage": "label vectors", "seconds": round(time.perf_counter() - started, 1)}
    neighbours = (products, NeighbourLabels.from_lists(data.train.labels)) if config.knn_neighbours > 0 else None
    dev_products = (encode_ids(encoder, data.dev_ids, data.pad_id, device=device_, images=data.dev_images)
                    if data.dev is not None else None)
    dev_lexical = lexical.predict(data.dev.texts) if lexical is not None and data.dev is not None else None
    if lexical is not None:
        fit_lexical_fusion(lexical, data, config, out, vectors, products, dev_products, dev_lexical, neighbours,
                           show)
        final["lexical_seconds"] = round(60 * run.lexical_minutes, 1)
    dev_result = _final_dev_metrics(run, dev_products, vectors, neighbours, groups, final, lexical, dev_lexical)
    done = classifier.progress if classifier is not None else StageProgress()
    history = dual.progress.history + done.history + [final]
    run_dir.save_labels(out, data.labels, label_embeddings, vectors, data.train_label_counts())
    (out / run_dir.METRICS).write_text(json.dumps({
        "history": history, "dev": dev_result, "best_epoch": dual.progress.best.epoch or -1,
        "epochs": dual.progress.epochs, "classifier_epochs": done.done, "classifier_best_epoch": done.best.epoch,
        "n_train": len(data.train)}, indent=2) + "\n")
    if neighbours is not None:
        run_dir.save_neighbours(out, products, data.train.labels, data.train.ids)
    run_dir.save_sample_texts(out, data.train.texts, data.train_images)
    write_model_card(out, config, data.train, data.dev, dev_result, dual.progress.epochs, data.labels.exclusive,
                     classifier_epochs=done.done)
    run_dir.finish(out)
    return TrainResult(out, history, dev_result)


@dataclass
class Run:
    """What the stages of one training run share: where it writes, its settings and data, and how it evaluates."""

    out: Path
    config: Config
    data: TrainingData
    tokenizer: Any
    device: torch.device
    show: Progress
    checkpoint: dict | None  # what --resume continues from
    lexical_minutes: float = 0.0  # what the lexical stage took: it comes out of the fine-tuning budget

    @property
    def budget_minutes(self) -> float:
        """The fine-tuning stages' share of ``time_budget_minutes``: what the lexical stage left."""
        return self.config.time_budget_minutes - self.lexical_minutes

    @property
    def in_classifier(self) -> bool:
        """Resuming in the classifier stage: the dual encoder and the label vectors are behind the checkpoint."""
        return self.checkpoint is not None and self.checkpoint["stage"] == ClassifierStage.name

    def save_encoder(self, model) -> None:
        run_dir.save_encoder(self.out, model, self.tokenizer)

    def evaluate(self, stage) -> dict[str, float] | None:
        """Dev metrics of a stage after an epoch (its ``dev_vectors``, embedded first: the order it always had), on
        at most ``dev_eval_rows`` dev products (a fixed sample: the same each epoch); the final model gets all."""
        data, limit = self.data, self.config.dev_eval_rows
        vectors = stage.dev_vectors()
        ids, images, truth = data.dev_ids, data.dev_images, data.dev.labels
        if len(ids) > limit:
            rows = np.sort(np.random.default_rng(self.config.seed).choice(len(ids), limit, replace=False))
            ids, truth = [ids[i] for i in rows], [truth[i] for i in rows]
            images = images.take(rows) if images is not None else None
        products = encode_ids(stage.encoder, ids, data.pad_id, device=self.device, images=images)
        return evaluate_scores(products, vectors, truth, self.config, data.inv_p, device=self.device)

    def stage_evaluation(self):
        return self.evaluate if self.data.dev is not None else None

    def embed_labels_and_products(self, model):
        data = self.data
        with self.show.task("embedding labels and training products",
                            total=len(data.label_ids) + len(data.product_ids)) as update:
            return (encode_ids(model, data.label_ids, data.pad_id, device=self.device, progress=update,
                               images=data.label_images),
                    encode_ids(model, data.product_ids, data.pad_id, device=self.device, progress=update,
                               images=data.train_images))


def _dual_encoder_stage(run: Run, encoder) -> DualEncoderStage:
    """The dual-encoder stage: planned (or as the checkpoint planned it), resumed, run."""
    config, checkpoint = run.config, run.checkpoint
    dual = DualEncoderStage(encoder, run.data, config, run.device, make_loss(config), run.save_encoder)
    if config.epochs != "auto":
        epochs = config.epochs
    elif checkpoint is not None:
        epochs = checkpoint["dual_encoder"]["epochs"]  # the plan of the run
    else:
        # With classifier_epochs "auto" too, the dual-encoder epochs get dual_encoder_budget_share of the budget,
        # the classifier stage the rest (where the budget binds, its epochs gained more per minute: RESULTS.md).
        # Only when the classifier stage will run: otherwise the dual encoder gets the whole budget.
        shared = (config.classifier_epochs == "auto"
                  and ClassifierStage.skip_reason(config, encoder, len(run.data.labels)) is None)
        epochs = dual.plan(run.budget_minutes * (config.dual_encoder_budget_share if shared else 1.0),
                           run.show)
    if run.in_classifier and epochs != checkpoint["dual_encoder"]["epochs"]:
        raise UserError(f"--resume {run.out}: the run is in its classifier stage, after "
                        f"{checkpoint['dual_encoder']['epochs']} epoch(s); --epochs can no longer change")
    dual.start(epochs)
    if checkpoint is not None:
        dual.progress = StageProgress.from_dict({**checkpoint["dual_encoder"], "epochs": epochs})
        if not run.in_classifier:
            load_state(run.out, dual, checkpoint["state"])
            run.show.log(f"resuming after epoch {dual.progress.done} of {epochs}")
    run_epochs(dual, run.stage_evaluation(), lambda: run_dir.save_checkpoint(run.out, {
        "stage": dual.name, "dual_encoder": dual.progress.to_dict(), "state": dual.state()}), run.show)
    return dual


def _label_vectors(run: Run, dual: DualEncoderStage, encoder):
    """Label vectors fitted on frozen product embeddings of the dual encoder's kept epoch -> ``(encoder, vectors,
    label embeddings, product embeddings)``; when resuming in the classifier stage, its checkpointed head."""
    config, show = run.config, run.show
    if run.in_classifier:
        done = run.checkpoint["classifier"]
        show.log(f"resuming the classifier stage after epoch {done['done']} of {done['epochs']}")
        return encoder, run.checkpoint["state"]["head"], None, None  # the stage goes on from its head
    best = dual.progress.best.epoch
    if best == 0:
        run.save_encoder(encoder)  # zero epochs: the pretrained encoder as is
    elif best != dual.progress.epochs:
        show.log(f"keeping the encoder of epoch {best} (best on dev)")
        encoder = run_dir.load_encoder(run.out).to(run.device)
    if has_lora(encoder.backbone):
        # The saved encoder has the adapters merged into plain weights: faster to run than base + A + B, and what
        # export and tagging load, so the label and neighbour embeddings below come from the very weights the
        # bundle will run.
        encoder = run_dir.load_encoder(run.out).to(run.device)
    label_embeddings, products = run.embed_labels_and_products(encoder)
    with show.task("label vectors", total=config.label_vector_epochs, unit="epochs") as update:
        vectors = fit_label_vectors(products, run.data.train.labels, label_embeddings,
                                    scale=config.label_vector_scale, epochs=config.label_vector_epochs,
                                    lr=config.label_vector_lr, seed=config.seed, device=run.device, progress=update,
                                    shortlist_above=config.label_shortlist_above,
                                    shortlist_size=config.label_shortlist,
                                    random_negatives=config.label_random_negatives)
    return encoder, vectors, label_embeddings, products


def _classifier_stage(run: Run, dual: DualEncoderStage, encoder, vectors: LabelVectors,
                      products) -> ClassifierStage | None:
    """The classifier stage, started from ``vectors`` (fitted on the frozen embeddings ``products``; None when
    resuming it): planned on the budget left (or resumed), run; None when it does not apply or gets no epoch."""
    config, checkpoint = run.config, run.checkpoint
    if not run.in_classifier and not ClassifierStage.applies(config, encoder, len(vectors.bias), run.show):
        return None
    stage = ClassifierStage(encoder, run.data, vectors, config, run.device, run.save_encoder, products)
    if run.in_classifier:
        stage.start(checkpoint["classifier"]["epochs"])
        stage.progress = StageProgress.from_dict(checkpoint["classifier"])
        load_state(run.out, stage, checkpoint["state"])
    else:
        minutes_left = run.budget_minutes - sum(r["seconds"] for r in dual.progress.history) / 60
        epochs = stage.plan(minutes_left, run.show) if config.classifier_epochs == "auto" else config.classifier_epochs
        if not epochs:
            return None
        stage.start(epochs)
    run_epochs(stage, run.stage_evaluation(), lambda: run_dir.save_checkpoint(run.out, {
        "stage": stage.name, "dual_encoder": dual.progress.to_dict(), "classifier": stage.progress.to_dict(),
        "state": stage.state()}), run.show)
    run.show.log(f"classifier stage: keeping epoch {stage.progress.best.epoch} of {stage.progress.epochs}"
                 + (" (best on dev)" if run.data.dev is not None else ""))
    return stage


def _final_dev_metrics(run: Run, products, vectors: LabelVectors, neighbours, groups, final: dict, lexical=None,
                       dev_lexical=None):
    """Dev metrics of the final model (None without a dev set), recorded in ``final`` with those of the label
    vectors alone, of the dense and lexical rankings apart (with a lexical model; ``dev_lexical``: its predictions
    on dev) and, with exclusive groups, of what ``tag --exclusive-groups`` gives; all on one embedding."""
    data, config, show = run.data, run.config, run.show
    if data.dev is None:
        return None
    fused = None
    if lexical is not None:
        lex_top, lex_scores = dev_lexical
        fused = (lex_top, lex_scores, lexical.label_weights(data.train_label_counts()))
        final["dev_lexical"] = evaluate_rankings(lex_top[:, :max(config.eval_ks)], data.dev.labels,
                                                 tuple(config.eval_ks), data.inv_p)

    def metrics(neighbours=None, groups=None, lexical=None):
        return evaluate_scores(products, vectors, data.dev.labels, config, data.inv_p, neighbours, groups, lexical,
                               run.device)

    final["dev_label_vectors"] = metrics()
    final["dev_dense"] = metrics(neighbours)
    final["dev"] = metrics(neighbours, lexical=fused)
    if groups is not None:  # for the record: what `tag --exclusive-groups` would give
        final["dev_exclusive_groups"] = metrics(neighbours, groups, fused)
        show.log("with exclusive groups: dev " + short(final["dev_exclusive_groups"]))
    show.log("label vectors: dev " + short(final["dev_label_vectors"]))
    if neighbours is not None:
        show.log(f"label vectors + {config.knn_neighbours} neighbours: dev " + short(final["dev_dense"]))
    if fused is not None:
        show.log("lexical model alone: dev " + short(final["dev_lexical"]))
        show.log("fused (what tag reports): dev " + short(final["dev"]))
    return final["dev"]


def _check_memory(config: Config, data: TrainingData, backbone, device: torch.device, show: Progress) -> None:
    """``memory.check_memory`` of this run's sizes, before anything long starts."""
    texts = data.train.texts + data.labels.texts + (data.dev.texts if data.dev is not None else [])
    model = backbone.config
    n_seen = int((data.train_label_counts() > 0).sum())
    estimate = estimate_memory(
        config, len(data.train), len(data.dev) if data.dev is not None else 0, len(data.labels), n_seen,
        sum(map(len, texts)), getattr(model, "hidden_size", 768), sum(p.numel() for p in backbone.parameters()),
        getattr(model, "num_hidden_layers", 12), getattr(model, "num_attention_heads", 12),
        cuda=device.type == "cuda")
    check_memory(estimate, config, show, torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None)


def _exclusive_groups(data: TrainingData, config: Config, show: Progress):
    """Each label's exclusive group, set on the label table (saved with it), as ids for scoring; None: none."""
    data.labels.exclusive = exclusive_groups(group_names(data.labels, config), data.train.labels)
    groups = group_ids(data.labels.exclusive)
    if groups is not None:
        names = Counter(g for g in data.labels.exclusive if g is not None)
        show.log("exclusive label groups (tag --exclusive-groups keeps one label of each): "
                 + ", ".join(f"{g} ({n} labels)" for g, n in names.items()))
    return groups
