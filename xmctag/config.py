"""The one configuration object of xmctag.

A ``Config`` holds everything that defines a model: which backbone, how inputs are read and tokenised, and how
it was trained. ``xmctag train`` writes it as ``config.json`` into the run directory, ``xmctag export`` copies it
into the bundle, and ``xmctag tag`` reads it back, so a model always carries the settings it was built with.

Values come, lowest priority first, from the defaults below, an optional TOML file (``--config file.toml``, flat
keys or the same keys under a ``[xmctag]`` table) and explicit keyword overrides (the CLI flags). ``validate`` checks
every value against its field's type first (a TOML or JSON value of the wrong type is named, never used), then the
values themselves; unknown keys are an error.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xmctag.errors import UserError


@dataclass
class Config:
    # --- model -------------------------------------------------------------------------------------------------
    encoder: str = "builtin:minilm-l6"  # builtin:NAME, a Hugging Face id or a local directory
    max_length: int = 128  # product-side tokens (EURLEX titles: median 45, p95 73; Myntra: ~12)
    label_max_length: int = 64  # label-side tokens (label text plus synonyms)
    # --- data columns ------------------------------------------------------------------------------------------
    id_col: str = "id"
    text_cols: list[str] = field(default_factory=lambda: ["title"])  # joined with " ; " in this order
    labels_col: str = "labels"
    label_id_col: str = "label"
    label_text_col: str = "text"
    label_extra_cols: list[str] = field(default_factory=lambda: ["alt_texts", "synonyms"])  # used when present
    label_group_col: str = "group"  # a label's facet (colour, size, ...); used when present (see label_groups)
    # Where label facets come from, for the exclusive ones (no training product has two of their labels) that
    # `tag --exclusive-groups` keeps one label of: "auto" (label_group_col if present, else the "facet:" prefix
    # when every label id has one), "column", "prefix" or "none" (xmctag/label_groups.py).
    label_groups: str = "auto"
    # --- image fusion (ViXML: frozen vision features, projected into one extra token per image) -----------------
    image_col: str = "image"  # products' (and labels') image column: bytes, paths, file:// or http(s) URLs, lists
    # "auto": builtin:efficientnet-lite0+colour (its features and a colour histogram, xmctag/vision/colour.py) if the
    # training catalog has image_col; "none"; a vision model name (+colour: with the histogram)
    vision: str = "auto"
    max_images: int = 1  # images per product, one token each (list columns: the first ones that are not null)
    image_lr: float = 5e-4  # learning rate of the image projection (its own AdamW group)
    image_cache_dir: str | None = None  # image-embedding cache; None: <run dir>/image_cache
    # --- pooling and decoder LLMs (Qwen2, Llama, ...; see xmctag/models/build.py and prompt.py) -----------------
    pooling: str = "mean"  # "mean" over real tokens, or "last" real token (decoders: the EOS closing the prompt)
    centering: str = "auto"  # "ema": pooled minus a running mean, then L2 norm; "auto": decoders ema, encoders none
    center_momentum: float = 0.9  # of the running mean, per forward pass in training (0.99 lagged: collapsed)
    prompt_prefix: str = "This product text"  # prompt: prefix ⊕ title ⊕ [image prefix ⊕ image] ⊕ EOS (labels too)
    image_prompt_prefix: str = "and its image"  # only for items that have an image
    # LoRA defaults: rank 16 on q/k/v/o at 1e-4 collapsed on EURLEX; these train (bench/RESULTS.md, decoder sweep)
    lora_rank: int = 64  # LoRA adapters on the decoder (only they train); 0 = fine-tune all weights with `lr`
    lora_alpha: float = 64.0
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])  # Llama/Qwen/Mistral names
    use_rslora: bool = True  # rank-stabilised scaling alpha / sqrt(rank) instead of alpha / rank
    lora_lr: float = 2e-4  # learning rate of LoRA training (`lr` applies to full fine-tuning)
    gradient_checkpointing: bool = True  # decoders: recompute activations in backward (less memory, more time)
    # --- dual-encoder training ---------------------------------------------------------------------------------
    epochs: int | str = "auto"  # "auto": as many as fit time_budget_minutes (measured), at most auto_max_epochs
    time_budget_minutes: float = 20.0  # fine-tuning budget of epochs/classifier_epochs="auto" (0 = no limit)
    auto_max_epochs: int = 5
    batch_size: int = 128
    lr: float = 5e-5
    warmup_steps: int = 100
    weight_decay: float = 0.01
    freeze_layers: int = 0  # token embeddings + this many lowest transformer blocks stay fixed (faster on CPU)
    grad_clip: float = 1.0
    loss: str = "auto"  # "triplet" (hard negatives, dynamic margin), "infonce" (softmax over the batch's labels);
    # "auto": infonce for decoders (the triplet loss collapses them), triplet for encoders
    temperature: float = 0.05  # softmax temperature of the infonce loss
    margin_min: float = 0.1  # dynamic triplet margin clamped to [margin_min, margin_max]
    margin_max: float = 0.3
    num_negatives: int = 10  # hardest in-batch negatives per product
    cluster_size: int = 16  # products per cluster when building hard-negative batches
    cluster_start_epoch: int = 1  # epochs before clustering starts (random batches until then)
    seed: int = 0
    # --- label vectors (second stage, on frozen product embeddings) --------------------------------------------
    label_vector_epochs: int = 30
    label_vector_lr: float = 2e-3
    label_vector_scale: float = 40.0  # logit = scale * (<product, label vector> + bias)
    # Above this many labels seen in training, the label-vector and classifier stages score each batch against a
    # shortlist (its positives, label_shortlist hard negatives per product, label_random_negatives per batch that
    # stand for the other labels) instead of all labels (xmctag/training/shortlist.py).
    label_shortlist_above: int = 50_000
    label_shortlist: int = 32
    label_random_negatives: int = 512
    # --- classifier fine-tuning (third stage, encoders only: xmctag/training/classifier.py) -------------------
    # The encoder fine-tuned through a one-vs-all head started from the label vectors; the head then is the label
    # vectors. "auto": as many epochs as fit the time budget left after the dual-encoder epochs (which then plan
    # on dual_encoder_budget_share of time_budget_minutes), at most auto_max_epochs; 0 = off.
    classifier_epochs: int | str = "auto"
    # Where the budget binds (CPU), a classifier epoch gained more per minute than a dual-encoder one (Myntra dev,
    # bench/RESULTS.md, "Classifier stage"). A GPU reaches auto_max_epochs of both stages within the budget anyway.
    dual_encoder_budget_share: float = 0.25
    classifier_lr: float = 3e-5  # the encoder's learning rate in this stage
    classifier_vector_lr: float = 1e-3  # the head's
    classifier_max_labels: int = 0  # more labels seen in training: stage skipped; 0 = no limit (shortlists above
    # label_shortlist_above; its head and optimiser state are in train's memory estimate)
    # --- neighbour votes (kNN over the training products, blended with the label vectors; see scoring.py) ----
    knn_neighbours: int = 20  # training products that vote; 0 = label vectors alone (smaller bundle)
    knn_temperature: float = 10.0  # vote weight exp(T * similarity), normalised over the neighbours
    knn_weight: float = 0.5  # score = (1 - w) * sigmoid(label-vector logit) + w * neighbour vote
    # --- lexical stage (TF-IDF label trees fused with the dense ranking; xmctag/lexical/, bench/RESULTS.md) -------
    lexical: str = "omikuji"  # "omikuji": label trees over TF-IDF word 1-2 + char 2-5 grams; "none": dense only
    lexical_min_df: int = 2  # a term counts when it is in at least this many training texts
    lexical_max_features: int = 2_000_000  # per analyzer (words, characters): the most frequent terms
    lexical_trees: int = 3
    # Tree shape. Bonsai-like by default (100 children per node, unbalanced, depth 3): on EURLEX dev it beat
    # Parabel-like trees (2 balanced children, depth 20) alone and fused, and predicted twice as fast (RESULTS.md).
    lexical_cluster_k: int = 100
    lexical_cluster_balanced: bool = False
    lexical_max_depth: int = 3
    lexical_beam: int = 10  # beam width of the tree search
    lexical_candidates: int = 50  # lexical labels per product that join the dense candidates
    lexical_bands: list[int] = field(default_factory=lambda: [5, 50])  # training counts: a fusion weight per band
    # --- memory -------------------------------------------------------------------------------------------------
    max_memory_gb: float = 0.0  # train refuses to start when its estimated peak is above this; 0 = what is free
    # --- evaluation --------------------------------------------------------------------------------------------
    dev_eval_rows: int = 20_000  # dev products scored after each epoch (a fixed sample); the final model: all
    eval_ks: list[int] = field(default_factory=lambda: [1, 3, 5])
    psp_a: float = 0.55
    psp_b: float = 1.5

    # ----------------------------------------------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    @classmethod
    def create(cls, toml_path: str | Path | None = None, base: dict[str, Any] | None = None,
               **overrides: Any) -> "Config":
        """Defaults (or the settings ``base``, e.g. a resumed run's), then the TOML file, then the non-None
        ``overrides``."""
        values: dict[str, Any] = dict(base or {})
        if toml_path is not None:
            values.update(_read_toml(Path(toml_path)))
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(values, source=str(toml_path) if toml_path else "arguments")

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "Config":
        unknown = sorted(set(values) - cls.field_names())
        if unknown:
            close = difflib.get_close_matches(unknown[0], sorted(cls.field_names()), n=1)
            raise UserError(f"{source}: unknown setting(s) {', '.join(unknown)}"
                            + (f" (did you mean {close[0]}?)" if close else ""))
        config = cls(**values)
        config.validate(source)
        return config

    def validate(self, source: str = "config") -> None:
        self._check_types(source)
        checks = [
            (self.epochs == "auto" or (isinstance(self.epochs, int) and self.epochs >= 0),
             "epochs must be \"auto\" or an integer >= 0"),
            (self.auto_max_epochs >= 0 and self.time_budget_minutes >= 0,
             "auto_max_epochs and time_budget_minutes must be >= 0"),
            (self.classifier_epochs == "auto" or (isinstance(self.classifier_epochs, int)
                                                  and self.classifier_epochs >= 0),
             "classifier_epochs must be \"auto\" or an integer >= 0"),
            (self.classifier_lr > 0 and self.classifier_vector_lr > 0, "classifier learning rates must be > 0"),
            (0.0 <= self.dual_encoder_budget_share <= 1.0, "dual_encoder_budget_share must be in [0, 1]"),
            (self.batch_size >= 2, "batch_size must be >= 2"),
            (self.max_length >= 4, f"max_length {self.max_length}: must be >= 4"),
            (self.label_max_length >= 4, f"label_max_length {self.label_max_length}: must be >= 4"),
            (0 <= self.margin_min <= self.margin_max, "need 0 <= margin_min <= margin_max"),
            (self.loss in ("auto", "triplet", "infonce"), f"loss must be auto, triplet or infonce, not {self.loss!r}"),
            (self.temperature > 0, "temperature must be > 0"),
            (self.centering in ("auto", "none", "ema"), f"centering must be auto, none or ema, not {self.centering!r}"),
            (0.0 <= self.center_momentum < 1.0, "center_momentum must be in [0, 1)"),
            (bool(self.text_cols), "text_cols must name at least one column"),
            (self.lr > 0 and self.label_vector_lr > 0, "learning rates must be > 0"),
            (self.knn_neighbours >= 0, "knn_neighbours must be >= 0"),
            (self.label_shortlist_above >= 0 and self.label_shortlist >= 1 and self.label_random_negatives >= 1,
             "label_shortlist_above must be >= 0, label_shortlist and label_random_negatives >= 1"),
            (self.classifier_max_labels >= 0 and self.max_memory_gb >= 0 and self.dev_eval_rows >= 1,
             "classifier_max_labels and max_memory_gb must be >= 0, dev_eval_rows >= 1"),
            (0.0 <= self.knn_weight <= 1.0, "knn_weight must be in [0, 1]"),
            (self.max_images >= 1, "max_images must be >= 1"),
            (self.image_lr > 0, "image_lr must be > 0"),
            (bool(self.vision) and bool(self.image_col), "vision and image_col must not be empty"),
            (self.lexical in ("omikuji", "none"), f"lexical must be omikuji or none, not {self.lexical!r}"),
            (self.lexical_min_df >= 1 and self.lexical_max_features >= 1 and self.lexical_trees >= 1
             and self.lexical_cluster_k >= 2 and self.lexical_max_depth >= 1 and self.lexical_beam >= 1
             and self.lexical_candidates >= 1, "lexical_* counts must be >= 1 (lexical_cluster_k >= 2)"),
            (list(self.lexical_bands) == sorted(set(self.lexical_bands)) and all(b >= 0 for b in self.lexical_bands),
             "lexical_bands must be increasing training counts >= 0"),
            (self.label_groups in ("auto", "column", "prefix", "none"),
             f"label_groups must be auto, column, prefix or none, not {self.label_groups!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(f"{source}: {message}")
        self._validate_decoder_settings(source)

    def _check_types(self, source: str) -> None:
        """Each value against its field's annotation: a TOML or JSON value of the wrong type (``batch_size =
        "four"``, ``text_cols = "title"``, ``batch_size = 32.7``, ``true`` for a number) is named here rather than
        failing later in arithmetic, or being read as something else (a string iterated as a list of columns)."""
        for name, hint in typing.get_type_hints(type(self)).items():
            value = getattr(self, name)
            if not _has_type(value, hint):
                raise UserError(f"{source}: {name} = {json.dumps(value, default=str)}: expected {_describe(hint)}")

    def _validate_decoder_settings(self, source: str) -> None:
        checks = [
            (self.pooling in ("mean", "last"), f"pooling must be 'mean' or 'last', not {self.pooling!r}"),
            (self.lora_rank >= 0, "lora_rank must be >= 0 (0: no LoRA)"),
            (self.lora_rank == 0 or bool(self.lora_target_modules), "lora_target_modules must name a module"),
            (0.0 <= self.lora_dropout < 1.0, "lora_dropout must be in [0, 1)"),
            (self.lora_lr > 0 and self.lora_alpha > 0, "lora_lr and lora_alpha must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(f"{source}: {message}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Config":
        path = Path(path)
        try:
            values = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"cannot read model config {path}: {e}") from None
        return cls.from_dict(values, source=str(path))


def _has_type(value: Any, hint: Any) -> bool:
    """Whether ``value`` fits the annotation ``hint`` (the types Config uses: int, float, str, bool, list[...],
    unions, None). bool is not accepted as a number (it is an int in Python); an int is accepted as a float."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, arg) for arg in typing.get_args(hint))
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_has_type(v, item) for v in value)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if set(typing.get_args(hint)) == {int, str}:  # epochs, classifier_epochs: the string is "auto"
            return 'an integer or "auto"'
        return " or ".join(_describe(arg) for arg in typing.get_args(hint))
    if origin is list:
        return {str: 'a list of strings, e.g. ["title"]', int: "a list of integers, e.g. [1, 5]"}.get(
            typing.get_args(hint)[0], str(hint))
    return names.get(hint, str(hint))


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise UserError(f"cannot read config file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: not valid TOML ({e})") from None
    if "xmctag" not in data:
        return data
    outside = sorted(set(data) - {"xmctag"})
    if outside or not isinstance(data["xmctag"], dict):  # flat keys beside the table would be ignored silently
        raise UserError(f"{path}: settings outside the [xmctag] table: {', '.join(outside) or 'xmctag'}; put them "
                        "all under [xmctag] or all at the top level")
    return data["xmctag"]
