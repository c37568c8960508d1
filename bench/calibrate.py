"""Calibrated thresholds (``xmctag calibrate``): the precision promised against the precision measured on dev rows
the thresholds were not fitted on.

    python bench/calibrate.py --bundle export/myntra --dev ../shared/data/myntra/dev.parquet --name Myntra
        [--targets 0.8 0.9 0.95] [--top-k 20] [--min-positives 20] [--seeds 5] [--scores bench/work/myntra.npz]

Tags the dev catalog once with the bundle (the model's text columns: title only for bundles trained on titles) at
``--top-k``, as ``xmctag calibrate`` does (``xmctag.calibration.score_dev``), then for each target precision and each
split seed 0..``--seeds``-1 fits the thresholds on one half of dev and measures the other
(``xmctag.calibration.fit_calibration``, the function ``calibrate`` runs). The bundle is only read, never written.
``--scores FILE`` keeps the tagged dev (an npz) and reuses it when it is there: EURLEX dev takes minutes to tag on
2 cores.

Prints the machine and date, then markdown tables for bench/RESULTS.md ("Calibrated thresholds"): per target, seed
0's held-out figures (precision, recall, labels per product, share of products without a label) and the
thresholds' kinds, the measured precision over all seeds (mean, min, max), and the uncalibrated top-5 on the same
held-out rows for reference.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from common import markdown_table, print_header

ARRAYS = ("indices", "scores", "correct", "truth_counts", "truth_rows", "truth_labels")


def tagged_dev(args):
    """The ``DevScores`` of ``--dev``: loaded from ``--scores`` when that file exists, else tagged (and saved)."""
    import xmctag
    from xmctag.calibration import DevScores, score_dev

    if args.scores is not None and args.scores.exists():
        with np.load(args.scores, allow_pickle=False) as saved:
            meta = {key: saved[key].item() for key in ("n_labels", "top_k", "rows_read", "rows_skipped",
                                                       "unknown_labels", "seconds")}
            dev = DevScores(*(saved[key] for key in ARRAYS), n_labels=meta["n_labels"], top_k=meta["top_k"],
                            rows_read=meta["rows_read"], rows_skipped=meta["rows_skipped"],
                            unknown_labels=meta["unknown_labels"], source=str(args.dev))
        return dev, meta["seconds"], True
    tagger = xmctag.Tagger.load(args.bundle, device="cpu")
    started = time.perf_counter()
    dev = score_dev(tagger, args.dev, args.top_k, progress=False)
    seconds = time.perf_counter() - started
    if args.scores is not None:
        args.scores.parent.mkdir(parents=True, exist_ok=True)
        np.savez(args.scores, **{key: getattr(dev, key) for key in ARRAYS}, n_labels=dev.n_labels, top_k=dev.top_k,
                 rows_read=dev.rows_read, rows_skipped=dev.rows_skipped, unknown_labels=dev.unknown_labels,
                 seconds=seconds)
    return dev, seconds, False


def percent(value) -> str:
    return f"{100 * value:.2f}" if value is not None else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--dev", type=Path, required=True)
    parser.add_argument("--name", default=None, help="The dataset's name in the tables.")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.8, 0.9, 0.95])
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--min-positives", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=5, help="Split seeds 0..N-1 (the first is the reported split).")
    parser.add_argument("--scores", type=Path, default=None, help="npz of the tagged dev, reused when present.")
    args = parser.parse_args()

    import xmctag
    from xmctag.bundle import Bundle
    from xmctag.calibration import fit_calibration

    name = args.name or args.dev.parent.name
    bundle = Bundle.open(args.bundle)
    train_counts = bundle.labels(["train_count"], optional=())["train_count"].to_numpy()
    dev, seconds, reused = tagged_dev(args)
    print_header(f"calibrated thresholds on {name} dev ({', '.join(bundle.config.text_cols)})")
    print(f"- bundle {args.bundle} (id {bundle.bundle_id}), xmctag {xmctag.__version__}; {dev.n_labels:,} labels")
    print(f"- dev {args.dev}: {len(dev.indices):,} rows tagged at top-{dev.top_k} in {seconds:.0f} s"
          + (" (saved scores reused)" if reused else "") + f"; {dev.unknown_labels} true labels not in the bundle")
    print(f"- split: seeded halves (fit / held-out); min_positives {args.min_positives}; seeds 0..{args.seeds - 1}")
    print()
    rows, spread = [], []
    for target in args.targets:
        measured = []
        for seed in range(args.seeds):
            started = time.perf_counter()
            _, report = fit_calibration(dev, train_counts, target, seed, args.min_positives)
            fit_seconds = time.perf_counter() - started
            measured.append(report.measured_precision)
            if seed == 0:
                held, base, c = report.held_out, report.baseline, report.counts
                rows.append([name, f"{100 * target:g}", percent(held["precision"]), percent(held["recall"]),
                             f"{held['labels_per_product']:.2f}", f"{100 * held['no_label_share']:.1f}",
                             percent(report.fit["precision"]),
                             f"{c['per_label']:,} / {c['band']:,} / {c['global']:,} / {c['never']:,}",
                             f"{fit_seconds:.2f}"])
                baseline = base
        values = [m for m in measured if m is not None]
        spread.append([name, f"{100 * target:g}", percent(float(np.mean(values))) if values else "-",
                       percent(min(values)) if values else "-", percent(max(values)) if values else "-",
                       str(sum(m is not None and m < target for m in measured)), str(len(measured))])
    print(f"Seed 0: fit on {report.fit['rows']:,} rows, measured on the other {report.held_out['rows']:,}.")
    print()
    print(markdown_table(["dataset", "promised P", "measured P", "recall", "labels/product", "no label %",
                          "P on fit half", "thresholds: label / band / global / never", "fit s"], rows, 1))
    print()
    print(f"Uncalibrated top-{baseline['k']} on the same held-out rows: P {percent(baseline['precision'])}, "
          f"recall {percent(baseline['recall'])}, {baseline['labels_per_product']:.2f} labels per product.")
    print()
    print(markdown_table(["dataset", "promised P", "measured P, mean", "min", "max", "seeds below the promise",
                          "seeds"], spread, 1))


if __name__ == "__main__":
    main()
