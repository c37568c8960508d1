"""``xmctag relabel BUNDLE LABELS --out DIR``: a bundle for a new label table, without retraining.

Taxonomies gain and retire labels every week. ``relabel`` reads the new label table (Parquet or CSV, the columns
training read: the bundle's ``Config``, ``xmctag.io.datasets.LabelTable``) and writes a bundle whose labels are
the new table's, in its order:

- **kept** labels (same id) keep everything training gave them: label vector ``[w, b]``, text embedding,
  ``train_count``, exclusive group, their training products' neighbour votes, their lexical scores. A kept label
  whose text changed keeps its trained vector (it was fitted to the products that carry it; the new text is a new
  wording of the same label): the label table shows the new ``text``, ``encoder_text`` stays what the vector was
  made from, and the manifest counts such labels (``relabel.text_changed``).
- **new** labels are embedded from their text (text + synonyms, as training builds it, cut to ``label_max_length``)
  by the bundle's own ONNX text encoder (fp32, CPU; text only for image bundles), and their label vectors come from
  a map fitted on the trained labels (``xmctag.scoring.new_labels``: ``ridge`` by default, ``scaled`` or
  ``text``). With neighbour votes in the bundle, each new label is given the training products its vector scores
  above a calibrated threshold, and at least its ``--min-products`` best ones (``--no-votes``: none), so its dense
  score is on the scale of a trained label's; ``--refit`` then remakes its vector from its text embedding and the
  mean embedding of those products (``xmctag.scoring.new_labels``).
  ``train_count`` is 0; the exclusive group is the label's group (``label_groups``) when that is one of the
  bundle's exclusive groups. The lexical model's trees cannot return a new label: its lexical weight is 0.
- **retired** labels (in the bundle, not in the table) disappear everywhere: label table, vectors, embeddings, the
  label search (an approximate one rebuilt and tuned again, ``xmctag.backend.index``), the training products' label
  lists (``train_labels.npz``) and the lexical model (``lexical/label_map.npy``: the trees' label index -> the new
  label index, -1 for a retired label, applied after each prediction; ``xmctag.lexical``).

Every other file is copied unchanged. The manifest is the source's with ``dims.labels``, ``created`` and a
``relabel`` section (source bundle id and creation time, counts kept / added / retired / text changed, the vector
map, the votes), sealed again (``xmctag.manifest.seal``). The bundle is written to a temporary sibling directory
and renamed into place; ``--overwrite`` replaces only a bundle, never the source bundle or one holding the table.

A relabel with the bundle's own label table gives a bundle that predicts exactly what the source does.

``label_table_warning(bundle, path)`` is ``tag --labels``: a line saying how a label table differs from a bundle's.
"""

from __future__ import annotations

import datetime
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xmctag import manifest as manifest_file
from xmctag import run_dir
from xmctag.bundle import INDEX, Bundle, is_bundle
from xmctag.errors import UserError
from xmctag.io.atomic import staged_directory
from xmctag.io.datasets import LabelTable
from xmctag.overwrite import check_new_output_dir
from xmctag.progress import Progress

MIN_PRODUCTS = 5  # the fewest training products a new label gets votes from (bench/RESULTS.md, "Relabel")


@dataclass
class RelabelReport:
    """What ``relabel`` did: the new bundle, its id and the source's, label counts, vectors and votes."""

    bundle: Path
    bundle_id: str
    source_bundle_id: str
    kept: int
    added: int
    retired: int
    text_changed: int
    vectors: dict  # the vector map (VectorMap.describe), {} without new labels
    votes: dict  # {"threshold", "cap", "min_products", "pairs", ...} of the new labels' votes, {} without
    seconds: float
    calibration_dropped: bool = False  # the source was calibrated: thresholds are per label, recalibrate

    def line(self) -> str:
        votes = f", {self.votes['pairs']} training products voting for them" if self.votes else ""
        return (f"{self.kept} labels kept, {self.added} added ({self.vectors.get('method', '-')} vectors{votes}), "
                f"{self.retired} retired, {self.text_changed} texts changed; bundle {self.bundle_id} written to "
                f"{self.bundle}" + ("; the source's calibration was dropped (thresholds are per label): run "
                                    "`xmctag calibrate` on the new bundle" if self.calibration_dropped else ""))


def relabel(bundle: str | Path, labels: str | Path, out: str | Path, overwrite: bool = False,
            vectors: str = "ridge", votes: bool = True, min_products: int = MIN_PRODUCTS, refit: bool = True,
            progress: bool = True) -> RelabelReport:
    """Writes to ``out`` the bundle ``bundle`` with the label table ``labels`` (see the module docstring).

    ``vectors``: how new labels' vectors are made (``ridge``, ``scaled``, ``text``: ``xmctag.scoring.new_labels``);
    ``votes``: give new labels the training products that their vectors score above the calibrated threshold, and
    each at least its ``min_products`` best ones; ``refit`` (with votes): then remake the new labels' vectors from
    their text embedding and the mean embedding of those products, by a ridge map fitted on the trained labels."""
    from xmctag.backend import runtime
    from xmctag.scoring.new_labels import METHODS

    started = time.perf_counter()
    show = Progress(progress)
    if vectors not in METHODS:
        raise UserError(f"--vectors must be one of {', '.join(METHODS)}, not {vectors!r}")
    if min_products < 0:
        raise UserError(f"--min-products must be >= 0, not {min_products}")
    runtime.check_runtime_packages()
    source = Bundle.open(bundle)
    out = Path(out)
    check_new_output_dir(out, overwrite, is_bundle, "an xmctag bundle",
                         {"the bundle": source.path, "the label table": labels})
    table = read_label_table(labels, source)
    old = source.labels(["label", "text", "encoder_text", "exclusive_group", "train_count"])
    change = LabelChange(old["label"].to_list(), table.ids)
    show.log(f"{len(change.kept_new)} labels kept, {len(change.added)} added, {len(change.retired)} retired")
    with staged_directory(out) as staging:
        written = _write_relabelled(source, old, table, change, staging, vectors, min_products if votes else None,
                                    refit, show)
        manifest = dict(source.manifest)
        # Calibrated thresholds are per label and fitted on the old ranking: they do not carry over.
        calibration = manifest.pop("calibration", None)
        manifest["dims"] = {**manifest["dims"], "labels": len(table)}
        if written["index"] is not None:  # the label search of the new labels (xmctag.backend.index)
            manifest["index"] = {**manifest["index"], "labels": written["index"]}
        manifest["created"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        manifest["relabel"] = {"source_bundle_id": source.bundle_id,
                               "source_created": str(source.manifest.get("created", "")),
                               "kept": len(change.kept_new), "added": len(change.added),
                               "retired": len(change.retired), "text_changed": written["text_changed"],
                               "vectors": written["vectors"], "votes": written["votes"]}
        _write_model_card(source, manifest["relabel"], staging / "README.md", manifest["created"])
        for name in source.manifest["files"]:  # the rest, unchanged
            if calibration is not None and name == calibration["file"]:
                continue
            if name == INDEX and written["index"] is not None and written["index"]["kind"] == "exact":
                continue  # an approximate label index that fell back to exact search: no file
            if not (staging / name).exists():
                (staging / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source.path / name, staging / name)
        sealed = manifest_file.seal(staging, manifest)
    report = RelabelReport(out, sealed["bundle_id"], source.bundle_id, len(change.kept_new), len(change.added),
                           len(change.retired), written["text_changed"], written["vectors"], written["votes"],
                           time.perf_counter() - started, calibration_dropped=calibration is not None)
    return report


def _write_model_card(source: Bundle, section: dict, path: Path, created: str) -> None:
    """The source bundle's model card (``README.md``), when it has one, with a section saying that its label table
    changed after training: the card's training figures describe the old table."""
    card = source.path / "README.md"
    if not card.is_file():
        return
    lines = [card.read_text(encoding="utf-8").rstrip(), "", "## Label table changed after training (`xmctag relabel`)",
             "",
             f"On {created[:10]} this bundle's label table was replaced without retraining (source bundle "
             f"`{section['source_bundle_id']}`): {section['kept']} labels kept with their trained vectors, "
             f"{section['added']} added (vectors from their text: {section['vectors'].get('method', '-')}), "
             f"{section['retired']} retired, {section['text_changed']} texts changed. The training figures above "
             "describe the label table the model was trained on; the manifest's `relabel` section has the details.",
             ""]
    path.write_text("\n".join(lines), encoding="utf-8")


def read_label_table(path: str | Path, bundle: Bundle) -> LabelTable:
    """The label table at ``path``, read as training read the bundle's (its ``Config``'s columns); at least 2
    labels, and every label with a text: a null or blank text is an error naming the row (a new label is embedded
    from its text, and outputs show it)."""
    path = Path(path)
    table = LabelTable.load(path, bundle.config)
    if len(table) < 2:
        raise UserError(f"{path}: the label table has {len(table)} label(s); a ranking needs at least 2")
    for row, (label, display) in enumerate(zip(table.ids, table.display)):
        if not label.strip():
            raise UserError(f"{path}: row {row}: empty label id in column {bundle.config.label_id_col!r}")
        if not display.strip():
            raise UserError(f"{path}: row {row} (label {label!r}): empty text in column "
                            f"{bundle.config.label_text_col!r}")
    return table


class LabelChange:
    """Old label ids -> new ones: ``old_to_new`` ``(L_old,)`` (-1: retired); ``kept_new`` / ``kept_old`` the kept
    labels' new and old indices (in new order); ``added`` the new labels' new indices; ``retired`` old indices."""

    def __init__(self, old_ids: list[str], new_ids: list[str]):
        position = {label: i for i, label in enumerate(old_ids)}
        self.old_to_new = np.full(len(old_ids), -1, dtype=np.int64)
        kept_new, kept_old, added = [], [], []
        for i, label in enumerate(new_ids):
            j = position.get(label)
            if j is None:
                added.append(i)
            else:
                kept_new.append(i)
                kept_old.append(j)
                self.old_to_new[j] = i
        self.kept_new, self.kept_old = np.array(kept_new, np.int64), np.array(kept_old, np.int64)
        self.added = np.array(added, np.int64)
        self.retired = np.flatnonzero(self.old_to_new < 0)
        self.identity = len(old_ids) == len(new_ids) and bool((self.old_to_new == np.arange(len(old_ids))).all())


def _write_relabelled(source: Bundle, old, table: LabelTable, change: LabelChange, staging: Path, method: str,
                      floor: int | None, refit: bool, show: Progress) -> dict:
    """Writes the files that change (labels, embeddings, vectors, label index, neighbour labels, the lexical map)
    into ``staging``; returns the ``text_changed`` count and the ``vectors`` and ``votes`` records. ``floor``: the
    fewest training products a new label gets votes from (None: no votes)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from xmctag.scoring import LabelVectors

    n = len(table)
    old_vectors = np.asarray(source.label_vectors())
    old_embeddings = source.label_embeddings()
    counts = old["train_count"].to_numpy().astype(np.int64)
    old_texts, old_encoder = old["text"].to_list(), old["encoder_text"].to_list()
    vectors = np.zeros((n, old_vectors.shape[1]), np.float32)
    embeddings = np.zeros((n, old_embeddings.shape[1]), np.float32)
    vectors[change.kept_new] = old_vectors[change.kept_old]
    embeddings[change.kept_new] = old_embeddings[change.kept_old]
    new_counts = np.zeros(n, np.int64)
    new_counts[change.kept_new] = counts[change.kept_old]
    encoder_text = list(table.texts)
    for i, j in zip(change.kept_new, change.kept_old):
        encoder_text[i] = old_encoder[j]  # what the kept vector was made from
    text_changed = sum(table.display[i] != old_texts[j] or table.texts[i] != old_encoder[j]
                       for i, j in zip(change.kept_new, change.kept_old))
    record, vote_record, pseudo = {}, {}, None
    neighbours = source.neighbours()
    if len(change.added):
        from xmctag.scoring.new_labels import fit_vector_map

        added_texts = [table.texts[i] for i in change.added]
        show.log(f"embedding {len(added_texts)} new label texts with the bundle's encoder")
        embeddings[change.added] = embed_label_texts(source, added_texts)
        vector_map = fit_vector_map(old_embeddings, old_vectors, counts, method)
        vectors[change.added] = vector_map.apply(embeddings[change.added])
        record = vector_map.describe()
        if floor is not None and neighbours is not None:
            new_vectors = vectors[change.added]
            pseudo, vote_record = _new_label_votes(neighbours, vector_map, old_embeddings, old_vectors,
                                                   embeddings[change.added], new_vectors, floor, refit, show)
            vectors[change.added] = new_vectors
    exclusive = _exclusive_groups(source, old, table, change)
    columns = {"label": pa.array(table.ids, pa.string()), "text": pa.array(table.display, pa.string()),
               "encoder_text": pa.array(encoder_text, pa.string())}
    if exclusive is not None:
        columns["exclusive_group"] = pa.array(exclusive, pa.string())
    columns["train_count"] = pa.array(new_counts, pa.int64())
    pq.write_table(pa.table(columns), staging / run_dir.LABELS)
    np.save(staging / run_dir.LABEL_EMBEDDINGS, embeddings)
    np.save(staging / run_dir.LABEL_VECTORS, vectors)
    entry = source.index_entry("labels")
    if change.identity:  # the same labels: the same search (no rebuild, same bytes)
        if INDEX in source.manifest["files"]:
            shutil.copy2(source.path / INDEX, staging / INDEX)
    else:
        entry = _label_index(source, LabelVectors(vectors[:, :-1], vectors[:, -1], 1.0).index_matrix(), embeddings,
                             neighbours, staging, show)
    if neighbours is not None:
        _write_neighbour_labels(neighbours[1], change, pseudo, staging / run_dir.TRAIN_LABELS, source)
    lexical = source.manifest.get("lexical")
    if lexical is not None and not change.identity:
        from xmctag.lexical import write_label_map

        folder = staging / lexical["folder"]
        shutil.copytree(source.path / lexical["folder"], folder)
        (folder / "label_map.npy").unlink(missing_ok=True)
        earlier = source.lexical()[0].label_map  # a bundle relabelled before: the maps compose
        tree_map = change.old_to_new if earlier is None else \
            np.where(earlier >= 0, change.old_to_new[np.maximum(earlier, 0)], -1)
        write_label_map(folder, tree_map, n)
    return {"text_changed": int(text_changed), "vectors": record, "votes": vote_record, "index": entry}


def _label_index(source: Bundle, vectors: np.ndarray, embeddings: np.ndarray, neighbours, staging: Path,
                 show: Progress) -> dict | None:
    """Writes the label search of the kind the source bundle records for the new ``vectors`` and returns its
    manifest entry: exact (no file), or an IVF index rebuilt and its ``nprobe`` tuned again to the source's floor on
    real rows (training products from the neighbour index, else the label embeddings), exact with a warning when
    that fails (``xmctag.backend.index``). A source from before the ``index`` section: an exact ``labels.faiss``
    as it had (entry None)."""
    from xmctag.backend import index as searches
    from xmctag.backend import runtime

    faiss = runtime.faiss()
    old = source.index_entry("labels")
    if old is None:
        index = faiss.IndexFlatIP(vectors.shape[1])
        index.add(vectors)
        faiss.write_index(index, str(staging / INDEX))
        return None
    if neighbours is not None:
        queries = neighbours[0].reconstruct_n(0, min(searches.MAX_QUERIES, neighbours[0].ntotal))
    else:
        queries = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    index, entry = searches.label_index(vectors, queries, float(source.manifest["scoring"]["scale"]),
                                        requested=old["kind"], exact_below=old["exact_below"], floor=old["floor"],
                                        log=show.log)
    entry["requested"] = old["requested"]
    if index is not None:
        faiss.write_index(index, str(staging / INDEX))
    return entry


def embed_label_texts(source: Bundle, texts: list[str], batch_size: int = 64) -> np.ndarray:
    """``(n, d)`` embeddings of label texts by the bundle's fp32 ONNX encoder, tokenised as training tokenised
    labels (cut to ``label_max_length``; a decoder's prompt; no image)."""
    from xmctag.models.tokens import clip_text, pad

    session = source.session("cpu", "fp32")
    max_length = source.config.label_max_length
    tokenizer = source.tokenizer()
    tokenizer.enable_truncation(max_length)
    prompt = source.prompt()
    texts = [clip_text(t, max_length) for t in texts]
    ids = (prompt.ids(tokenizer, texts, max_length, None) if prompt is not None
           else [e.ids for e in tokenizer.encode_batch(texts)])
    pad_id = int(source.manifest["tokenization"]["pad_id"])
    out = np.zeros((len(ids), source.dims["embedding"]), np.float32)
    order = np.argsort([len(x) for x in ids], kind="stable")
    fusion = source.fusion
    for start in range(0, len(ids), batch_size):
        rows = order[start:start + batch_size]
        input_ids, mask = pad([ids[i] for i in rows], pad_id)
        feeds = {"input_ids": input_ids, "attention_mask": mask}
        if fusion is not None:  # new labels are text only: every image slot masked out
            feeds["image_embedding"] = np.zeros((len(rows), fusion["max_images"], fusion["vision_dim"]), np.float32)
            feeds["image_mask"] = np.zeros((len(rows), fusion["max_images"]), np.int64)
        out[rows] = session.run(["embedding"], feeds)[0]
    return out


def _new_label_votes(neighbours, vector_map, old_embeddings, old_vectors, new_embeddings, new_vectors, floor: int,
                     refit: bool, show: Progress):
    """``(pseudo, record)``: per training product, the new labels (indices into the added labels) it votes for, as
    ``(rows, labels)`` arrays; and what the manifest records (threshold, pairs, cap). ``refit``: the new labels'
    vectors are then remade, in place, from their text and their voting products (``--refit``)."""
    from xmctag.scoring.new_labels import calibrate_threshold, fit_vector_map, label_centroids, pseudo_labels

    index, labels = neighbours
    n = index.ntotal

    def products(start: int, stop: int) -> np.ndarray:
        return index.reconstruct_n(start, stop - start)

    # The threshold: at most 512 trained labels with training products, their vectors as the map makes them.
    true_counts = np.bincount(labels.indices, minlength=len(old_vectors))
    seen = np.flatnonzero(true_counts > 0)
    sample = np.random.default_rng(0).choice(seen, size=min(512, len(seen)), replace=False) if len(seen) else seen
    show.log(f"calibrating the new labels' neighbour votes on {len(sample)} trained labels x {n} training products")
    threshold = calibrate_threshold(products, n, vector_map.apply(old_embeddings[sample]), true_counts[sample])
    cap = int(true_counts.max()) if len(true_counts) else 0
    rows, added = pseudo_labels(products, n, new_vectors, threshold, cap, floor)
    per_label = np.bincount(added, minlength=len(new_vectors))
    record = {"threshold": threshold, "cap": cap, "min_products": floor, "pairs": len(rows),
              "labels_without_products": int((per_label == 0).sum())}
    if refit and (per_label > 0).any():
        # [text embedding, mean embedding of the label's products, 1] -> [w, b], fitted on the trained labels (their
        # own products), applied to the new ones (the products voting for them).
        show.log("refitting the new labels' vectors on the products voting for them")
        trained_rows = np.repeat(np.arange(len(labels)), np.diff(labels.indptr))
        centroids = label_centroids(trained_rows, labels.indices, len(old_vectors), products, n)
        refit_map = fit_vector_map(old_embeddings, old_vectors, true_counts, "ridge", extra=centroids)
        has = per_label > 0
        new_centroids = label_centroids(rows, added, len(new_vectors), products, n)
        new_vectors[has] = refit_map.apply(new_embeddings[has], new_centroids[has])
        record["refit"] = refit_map.describe()
    return (rows, added), record


def _write_neighbour_labels(labels, change: LabelChange, pseudo, path: Path, source: Bundle) -> None:
    """The training products' label lists over the new labels: kept labels renumbered, retired ones dropped, and
    each product's new labels (``pseudo``) after them."""
    from xmctag.scoring import NeighbourLabels

    if change.identity and pseudo is None:
        shutil.copy2(source.path / run_dir.TRAIN_LABELS, path)
        return
    mapped = change.old_to_new[labels.indices]
    row_of = np.repeat(np.arange(len(labels)), np.diff(labels.indptr))
    keep = mapped >= 0
    rows, values = [row_of[keep]], [mapped[keep]]
    if pseudo is not None:
        rows.append(pseudo[0])
        values.append(change.added[pseudo[1]])
    rows, values = np.concatenate(rows), np.concatenate(values)
    order = np.argsort(rows, kind="stable")  # per product: its kept labels in their order, then the new ones
    indptr = np.zeros(len(labels) + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=len(labels)), out=indptr[1:])
    NeighbourLabels(indptr, values[order].astype(np.int32)).save(path)


def _exclusive_groups(source: Bundle, old, table: LabelTable, change: LabelChange) -> list[str | None] | None:
    """Each new-table label's exclusive group: a kept label's as trained; a new label's group (``label_groups``) if
    it is one of the bundle's exclusive groups. None when the bundle's table has no ``exclusive_group`` column."""
    from xmctag.label_groups import group_names

    if "exclusive_group" not in old.columns:
        return None
    trained = old["exclusive_group"].to_list()
    out: list[str | None] = [None] * len(table)
    for i, j in zip(change.kept_new, change.kept_old):
        out[i] = trained[j]
    if len(change.added):
        exclusive = {g for g in trained if g is not None}
        names = group_names(table, source.config)
        for i in change.added:
            out[i] = names[i] if names[i] in exclusive else None
    return out


def label_table_warning(bundle: Bundle, path: str | Path) -> str | None:
    """One line saying how the label table at ``path`` differs from ``bundle``'s (labels added, retired, texts
    changed; whether the file is newer than the bundle), or None when they hold the same labels and texts."""
    path = Path(path)
    table = LabelTable.load(path, bundle.config)
    old = bundle.labels(["label", "text"])
    change = LabelChange(old["label"].to_list(), table.ids)
    old_texts = old["text"].to_list()
    changed = sum(table.display[i] != old_texts[j] for i, j in zip(change.kept_new, change.kept_old))
    if not len(change.added) and not len(change.retired) and not changed:
        return None
    parts = [f"{len(change.added)} label(s) added, {len(change.retired)} retired"] if (
        len(change.added) or len(change.retired)) else []
    if changed:
        parts.append(f"{changed} label text(s) changed")
    created = _created(bundle)
    newer = created is not None and path.stat().st_mtime > created
    when = (f"; the file is newer than the bundle (created {bundle.manifest.get('created')})" if newer else
            "; the bundle is newer than the file" if created is not None else "")
    hint = (f"run `xmctag relabel {bundle.path} {path} --out DIR`" if len(change.added) or len(change.retired) else
            "tagging outputs the bundle's texts")
    return f"--labels {path} does not match the bundle {bundle.path}: {', '.join(parts)}{when}; {hint}"


def _created(bundle: Bundle) -> float | None:
    """The bundle's ``created`` (manifest) as a POSIX time, None when absent or unreadable."""
    try:
        return datetime.datetime.fromisoformat(str(bundle.manifest["created"])).timestamp()
    except (KeyError, ValueError):
        return None

