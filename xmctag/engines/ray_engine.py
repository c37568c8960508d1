"""The Ray Data engine: ``xmctag tag CATALOG --engine ray [--ray-address ADDRESS] [--actors N]``, or in Python
``xmctag.RayTagger.load(bundle, actors=2).tag_file(catalog, output)``. Needs the ``ray`` extra
(``pip install -e '.[cpu,ray]'``); without it, a one-line ``UserError`` says so.

**Reads** a catalog of Parquet files: one file, a directory (its ``*.parquet`` files, not those of its
subdirectories, hidden files left out) or a glob (``'data/part-*.parquet'``); the files in name order. Each file is
checked on the driver as the local engine checks its one file (a Parquet file with the id and text columns; the
image column in all files or none) and its rows counted from its footer.

**Work**: the driver cuts the catalog into slices of ``batch_size`` rows of one file, ``(file, first row, rows)``,
one Ray Data block each (``ray.data.from_items``), and runs ``map_batches(TagWorker, compute=ActorPoolStrategy(
size=N))``. Each actor loads the bundle once (``Tagger.load``, hashes verified, bundle id compared with the
driver's: a node whose copy differs fails the run) and, per slice, reads those rows with polars and tags them with
the local engine's code (``Tagger.prepare_batch``, ``Tagger.tag_prepared``; image bundles also
``BundleImages.features``, cache shared by all actors: ``xmctag.vision.cache`` shards are written under unique
names and renamed into place, so concurrent writers never clash). It returns the slice's writer rows and one counts
row (rows read, rows skipped by reason, images by outcome).

**Writes** one prediction file, on the driver, in any format the local engine writes (Parquet, CSV, JSON Lines),
through the same ``xmctag.tagging_run``: the same columns, the same provenance metadata (bundle id, settings,
``content_hash``; ``xmctag.catalog`` is the catalog as given, ``xmctag.catalog_sha256`` is
``xmctag.io.hashing.files_sha256`` of its files), a lock per output, a temporary file beside it renamed into place
only when complete, and the checks of the result (``--max-skipped-share``, ``--allow-empty``, ...) before that.
Rows are in catalog order (files in name order, each file's rows in order: Ray Data's ``preserve_order``), so the
output is the local engine's output on the files' concatenation (scores equal up to float32 rounding when both
run with the same number of OpenMP threads: Ray sets an actor's ``OMP_NUM_THREADS`` to its CPUs, and with
another number float sums run in another order, so a product near a tie can score differently). ``eval``,
``diff`` and ``--previous`` read it as any prediction file.

**Counts**: each slice's counts row is added on the driver (``TagSummary.add_batch``, ``add_images``), so the
summary is the sum over slices; a retried slice is counted once (only its final result reaches the driver).

**Failures**: an actor whose process dies is restarted and its slice retried by Ray (``MAX_RETRIES`` times); an
exception in an actor is not retried and ends the run: a ``UserError`` raised there (``--strict`` naming a row, an
unreadable file) reaches the caller as that same error (exit 2 on the command line), Ray's own failures (actors
that keep dying, lost nodes) as ``EnvironmentFailure`` (exit 74), anything else as itself (a bug). Either way the
temporary file is deleted and nothing is left at the output, as with Ctrl-C.

**Actors**: ``--device cuda``: one per GPU of the cluster (each ``num_gpus=1``); CPU: each actor takes ``threads``
CPUs (default ``CPU_THREADS``, at most the smallest node's) and runs ONNX Runtime on that many threads, and there
are as many as fit on the nodes (at least 1); ``--actors N`` gives N, each with the cluster's CPUs / N (at most the
smallest node's; more actors than CPUs is an error).
``--device auto``: cuda when the cluster has GPUs, else cpu. ``--ray-address``: default a new local Ray (or the one
``ray.init`` already started in this process, or ``RAY_ADDRESS``); ``auto`` joins the running cluster of this node.

**Not supported**: ``--previous`` (a one-line error). Ray prints its own warnings on stderr (token authentication,
actor restarts) besides xmctag's lines.
"""

from __future__ import annotations

import glob
import json
import logging
import time
import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path

import polars as pl

from xmctag.errors import EnvironmentFailure, UserError, first_line
from xmctag.io.catalog import count_rows
from xmctag.io.writers import EVIDENCE_SCHEMA, PRODUCT_SCHEMA
from xmctag.progress import Progress
from xmctag.summary import RunChecks, TagSummary
from xmctag.tagger import Tagger
from xmctag.tagging_run import tagging_run

INSTALL = "pip install -e '.[cpu,ray]' (or pip install 'ray[data]>=2.60,<2.64')"
CPU_THREADS = 4  # ONNX Runtime threads (and Ray CPUs) per CPU actor by default
MAX_RETRIES = 3  # restarts of a dead actor, and retries of the slice it was tagging
COUNTS = "_counts"  # the column of an actor's output that holds a slice's counts (JSON), null on product rows


def import_ray():
    """The ``ray`` module with Ray Data, or a one-line ``UserError`` saying how to install it."""
    try:
        import ray
        import ray.data  # the Data library: the data extra of ray
    except ImportError:
        raise UserError(f"--engine ray needs Ray: {INSTALL}") from None
    return ray


def catalog_files(catalog: str | Path) -> list[Path]:
    """The Parquet files of ``catalog`` in name order: the file itself, a directory's ``*.parquet`` files (not
    hidden ones, not subdirectories'), or a glob's matches."""
    path = Path(catalog)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".parquet" and not p.name.startswith(".")
                       and p.is_file())
        if not files:
            raise UserError(f"{catalog}: a directory without .parquet files")
        return files
    if glob.has_magic(str(catalog)):
        files = sorted(Path(p) for p in glob.glob(str(catalog)) if Path(p).is_file())
        if not files:
            raise UserError(f"{catalog}: no file matches")
        return files
    raise UserError(f"{catalog}: no such file or directory")


def plan_actors(device: str, actors: int | None, threads: int | None, cluster: dict, node_cpus: list[int]):
    """``(actors, CPUs per actor, GPUs per actor, ONNX Runtime threads)`` on a cluster of ``cluster`` resources
    whose nodes have ``node_cpus`` CPUs (an actor's CPUs are on one node)."""
    if device == "cuda":
        gpus = int(cluster.get("GPU", 0))
        if gpus == 0:
            raise UserError("--device cuda: the Ray cluster has no GPU")
        return actors or gpus, 1, 1, threads
    cpus = int(cluster.get("CPU", 0))
    if actors is not None and actors > cpus:
        raise UserError(f"--actors {actors}: the Ray cluster has {cpus} CPUs; each actor needs one")
    smallest = max(1, min(node_cpus, default=1))
    if actors is None:
        per_actor = max(1, min(threads or CPU_THREADS, smallest))
        actors = max(1, sum(n // per_actor for n in node_cpus))
    else:
        per_actor = max(1, min(threads or cpus // actors, smallest))
    return actors, per_actor, 0, per_actor


class RayTagger:
    """A bundle ready to tag catalogs with Ray Data actors; ``tag_file`` mirrors ``Tagger.tag_file``.

    The driver holds a CPU ``Tagger`` of the bundle (``local``: its checks, label table, settings and provenance);
    the actors load their own on their nodes."""

    def __init__(self, local: Tagger, path: Path, device: str, precision: str, exclusive_groups: bool,
                 calibrated: bool, address: str | None, actors: int | None, threads: int | None):
        self.local = local
        self.model_path = Path(path).resolve()
        self.requested_device, self.precision = device, precision
        self.exclusive_groups, self.calibrated = exclusive_groups, calibrated
        self.address, self.actors, self.threads = address, actors, threads
        self.device = f"ray, {device}"  # once a run has planned its actors: "ray: 2 CPU actors"

    @classmethod
    def load(cls, path: str | Path, device: str = "auto", precision: str = "auto", exclusive_groups: bool = False,
             calibrated: bool = False, address: str | None = None, actors: int | None = None,
             threads: int | None = None) -> RayTagger:
        """As ``Tagger.load``; ``address``: the Ray cluster (None: a new local Ray, or the one already started in
        this process; ``auto``: the running cluster of this node; ``ray://HOST:10001``), ``actors``: how many (see
        the module docstring), ``threads``: ONNX Runtime threads per CPU actor."""
        import_ray()
        if actors is not None and actors < 1:
            raise UserError(f"--actors must be >= 1, not {actors}")
        # The driver's Tagger (CPU, fp32 unless int8): the same checks and warnings as a local run, before Ray starts.
        local = Tagger.load(path, device="cpu", precision="int8" if precision == "int8" else "fp32", threads=1,
                            exclusive_groups=exclusive_groups, calibrated=calibrated)
        local.bundle.graph("cuda" if device == "cuda" else "cpu", precision)  # a precision the bundle lacks: now
        return cls(local, path, device, precision, exclusive_groups, calibrated, address, actors, threads)

    # What the CLI and callers read of a Tagger.
    @property
    def bundle(self):
        return self.local.bundle

    @property
    def config(self):
        return self.local.config

    @property
    def label_ids(self):
        return self.local.label_ids

    @property
    def label_texts(self):
        return self.local.label_texts

    @property
    def bundle_id(self) -> str:
        return self.local.bundle_id

    def tag_file(self, catalog: str | Path, output: str | Path | None = None, top_k: int = 5,
                 fmt: str | None = None, min_score: float | None = None, batch_size: int = 4096, strict: bool = False,
                 progress: bool = True, cache_dir: str | Path | None = None, workers: int = 8,
                 checks: RunChecks | None = None, summary_json: str | Path | None = None,
                 escape_formulas: bool = False, image_hosts: Sequence[str] = (), previous: str | Path | None = None,
                 evidence: int = 0) -> TagSummary:
        """``Tagger.tag_file`` on Ray actors: ``catalog`` may also be a directory or glob of Parquet files (see
        the module docstring); ``batch_size`` rows make one Ray block. ``previous`` is not supported."""
        if previous is not None:
            raise UserError("--previous is not supported with --engine ray; use --engine local for incremental "
                            "nights")
        if batch_size < 1:
            raise UserError(f"--batch-size must be >= 1, not {batch_size}")
        files = catalog_files(catalog)
        label = Path(catalog)
        if len(files) > 1 and output is None and not label.is_dir():
            raise UserError(f"{catalog}: a glob needs --output")
        ray = import_ray()
        started_ray = not ray.is_initialized()
        if started_ray:
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False,
                     logging_level=logging.WARNING)
        try:
            return self._tag(ray, label, files, output, top_k, fmt, min_score, batch_size, strict, progress,
                             cache_dir, workers, checks, summary_json, escape_formulas, tuple(image_hosts), evidence)
        finally:
            if started_ray:
                ray.shutdown()

    def _tag(self, ray, catalog: Path, files: list[Path], output, top_k, fmt, min_score, batch_size, strict,
             progress, cache_dir, workers, checks, summary_json, escape_formulas, image_hosts, evidence):
        cluster = ray.cluster_resources()
        device = self.requested_device
        if device == "auto":
            device = "cuda" if cluster.get("GPU", 0) > 0 else "cpu"
        node_cpus = [int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
        actors, cpus, gpus, threads = plan_actors(device, self.actors, self.threads, cluster, node_cpus)
        self.local.graph = self.local.bundle.graph(device, self.precision).name  # what the actors run
        self.device = f"ray: {actors} {'GPU' if device == 'cuda' else 'CPU'} actor{'s' * (actors > 1)}"
        ray_report = {"engine": "ray", "ray": {"actors": actors, "cpus_per_actor": cpus, "gpus_per_actor": gpus,
                                               "device": device, "files": len(files)}}
        with tagging_run(self.local, catalog, files, output, top_k=top_k, fmt=fmt, min_score=min_score,
                         checks=checks, summary_json=summary_json, escape_formulas=escape_formulas,
                         evidence=evidence, report_fields=ray_report) as run:
            summary = run.summary
            slices = [{"path": str(f.resolve()), "offset": offset, "length": min(batch_size, rows - offset)}
                      for f, rows in ((f, count_rows(f)) for f in files) for offset in range(0, rows, batch_size)]
            image_cache = None
            if self.local.fusion is not None:
                from xmctag.vision.tagging import resolve_cache_dir

                image_cache = resolve_cache_dir(cache_dir, self.local.fusion.get("cache_dir"), summary.output)
            worker = {"model": str(self.model_path), "device": device, "precision": self.precision,
                      "threads": threads, "exclusive_groups": self.exclusive_groups, "calibrated": self.calibrated,
                      "bundle_id": self.local.bundle_id, "columns": run.columns, "top_k": run.top_k,
                      "min_score": min_score, "strict": strict, "evidence": evidence,
                      "cache_dir": str(image_cache) if image_cache else None, "workers": workers,
                      "image_hosts": image_hosts}
            started = time.perf_counter()
            with Progress(progress).task("tagging", total=sum(s["length"] for s in slices),
                                         unit="products") as update:
                for frame in tagged_frames(ray, slices, worker, actors, cpus, gpus):
                    counts = frame.filter(pl.col(COUNTS).is_not_null())[COUNTS].to_list()
                    products = frame.filter(pl.col(COUNTS).is_null()).drop(COUNTS)
                    if len(products):
                        run.writer.write_frame(products)
                    summary.add_batch(0, {}, products)
                    for found in map(json.loads, counts):
                        summary.add_batch(found["read"], found["skipped"])
                        if found["images"] is not None:
                            summary.add_images(found["images"])
                        update(found["read"])
            summary.seconds = time.perf_counter() - started
            summary.image_cache = image_cache
        return summary


def tagged_frames(ray, slices: list[dict], worker: dict, actors: int, cpus: int, gpus: int):
    """The actors' output frames (writer rows and counts rows) in slice order; a failure as described in the module
    docstring."""
    if not slices:
        return
    from ray.data import ActorPoolStrategy, DataContext

    context = DataContext.get_current()
    saved = (context.execution_options.preserve_order, context.enable_progress_bars,
             context.raise_original_map_exception)
    context.execution_options.preserve_order = True  # output in catalog order
    context.enable_progress_bars = False  # the driver shows its own
    context.raise_original_map_exception = True  # an actor's exception reaches the driver as itself (``failure``)
    # Each actor gets a name of this run's, so that the run can end them itself: Ray Data leaves a failed run's
    # actors to reference counting, and a reference that outlives the run (an exception) would keep them, and
    # their CPUs or GPUs, from the next run on the same Ray.
    run, names = f"xmctag-tag-{uuid.uuid4().hex[:12]}", []

    def remote_args() -> dict:  # called by Ray Data, in this process, for each actor it starts
        names.append(f"{run}-{len(names)}")
        return {"max_restarts": MAX_RETRIES, "max_task_retries": MAX_RETRIES, "name": names[-1]}

    quiet = logging.getLogger("ray.data")  # its log of a failed block repeats the error, with a traceback
    level, quiet.level = quiet.level, logging.CRITICAL
    error = None
    try:
        with warnings.catch_warnings():  # deprecated in 2.60 without a replacement, removed in 2.64 (hence ray<2.64)
            warnings.filterwarnings("ignore", message="`ray_remote_args_fn` is deprecated")
            dataset = ray.data.from_items(slices, override_num_blocks=len(slices)).map_batches(
                TagWorker, fn_constructor_kwargs=worker, batch_size=1, batch_format="pyarrow",
                compute=ActorPoolStrategy(size=actors), num_cpus=cpus, num_gpus=gpus or None,
                ray_remote_args_fn=remote_args)
        for table in dataset.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1):
            yield pl.from_arrow(table)
    except Exception as e:  # noqa: BLE001 - Ray wraps what happened in an actor: the cause decides
        error = failure(ray, e)
    finally:
        (context.execution_options.preserve_order, context.enable_progress_bars,
         context.raise_original_map_exception) = saved
        dataset, quiet.level = None, level
        for name in names:
            try:
                ray.kill(ray.get_actor(name))
            except ValueError:  # gone already
                pass
    if error is not None:
        # Raised here, not in the except block: Ray's exception (its traceback holds the executor and through it
        # the actors, which live as long as that) must not stay attached as the context of ours.
        raise error


def failure(ray, error: BaseException) -> BaseException:
    """What to raise for ``error`` from a Ray run: the ``UserError`` an actor raised, ``EnvironmentFailure`` for
    Ray's own failures, else the actor's exception itself (a bug)."""
    chain, seen, cause = [], set(), error
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        chain.append(cause)
        cause = getattr(cause, "cause", None) or cause.__cause__ or cause.__context__
    raised = [e for e in chain if not isinstance(e, ray.exceptions.RayError)]  # the actor's own, not Ray's wrapping
    if raised and any(isinstance(e, ray.exceptions.RayTaskError) for e in chain):
        if isinstance(raised[-1], UserError):  # one line, as raised: Ray appends its retry advice to the message
            raised[-1].args = (first_line(raised[-1]),)
            raised[-1].__cause__ = raised[-1].__context__ = None  # Ray's own exceptions, holding its executor
        return raised[-1]  # a UserError (its exit code), or a bug with its traceback
    return EnvironmentFailure(f"Ray: {first_line(error)}; nothing was written")


class TagWorker:
    """A Ray Data actor: the bundle loaded once (``Tagger.load``), then ``__call__`` per block of slices (see the
    module docstring)."""

    def __init__(self, model: str, device: str, precision: str, threads: int | None, exclusive_groups: bool,
                 calibrated: bool, bundle_id: str, columns: list[str], top_k: int, min_score: float | None,
                 strict: bool, evidence: int, cache_dir: str | None, workers: int, image_hosts: tuple[str, ...]):
        with warnings.catch_warnings():  # the driver's Tagger gave the same warnings, once
            warnings.simplefilter("ignore")
            self.tagger = Tagger.load(model, device=device, precision=precision, threads=threads,
                                      exclusive_groups=exclusive_groups, calibrated=calibrated)
        if self.tagger.bundle_id != bundle_id:
            raise UserError(f"{model}: on this Ray node the bundle is {self.tagger.bundle_id}, not the driver's "
                            f"{bundle_id}; every node must read the same bundle")
        if evidence:
            self.tagger.evidence_ids()
        self.columns, self.top_k, self.min_score = columns, top_k, min_score
        self.strict, self.evidence = strict, evidence
        self.images = (self.tagger.images(cache_dir, workers=workers, image_hosts=image_hosts)
                       if self.tagger.fusion is not None else None)
        self.schema = {**PRODUCT_SCHEMA, **(EVIDENCE_SCHEMA if evidence else {})}

    def __call__(self, block):
        frames = [self.tag_slice(path, offset, length) for path, offset, length in
                  zip(*(block[c].to_pylist() for c in ("path", "offset", "length")))]
        return pl.concat(frames, how="vertical").to_arrow()

    def tag_slice(self, path: str, offset: int, length: int) -> pl.DataFrame:
        """Rows ``offset`` to ``offset + length`` of ``path``: their writer rows, then one counts row."""
        try:
            frame = pl.scan_parquet(path).select(self.columns).slice(offset, length).collect()
        except (pl.exceptions.PolarsError, OSError) as e:
            raise UserError(f"{path}: cannot read ({first_line(e)})") from None
        batch, skipped = self.tagger.prepare_batch(frame, path, offset, self.strict)
        images = None
        if self.images is not None:
            from xmctag.vision.tagging import ImageCounts

            self.images.counts = ImageCounts()  # this slice's
            if len(batch) and "image" in batch.columns:
                images = self.images.features(batch["image"].to_list(), Path(path).parent, row0=offset)
        rows = [pl.DataFrame(schema=self.schema)]
        if len(batch):
            rows = [self.tagger.tag_prepared(batch, self.top_k, self.min_score, images, self.evidence)
                    .select(list(self.schema))]
        counts = {"read": len(frame), "skipped": skipped,
                  "images": self.images.counts.to_dict() if self.images is not None else None}
        counts_row = pl.DataFrame({c: [None] for c in self.schema}, schema=self.schema)
        return pl.concat([rows[0].with_columns(pl.lit(None, pl.String).alias(COUNTS)),
                          counts_row.with_columns(pl.lit(json.dumps(counts), pl.String).alias(COUNTS))])
