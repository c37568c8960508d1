"""Label-table updates without retraining, measured on EURLEX57K (issue 20, part 2).

    python bench/relabel.py prepare eurlex57k [--data ../shared/data] [--work bench/work] [--share 0.1] [--seed 0]

``prepare`` holds out ``--share`` of the labels that have at least 5 training products (chosen at random with
``--seed``): it writes ``<work>/relabel-<dataset>/`` with ``labels-kept.parquet`` (the label table without them),
``train-kept.parquet`` (the training rows with those labels removed from their label lists; rows left with no label
are dropped), ``dev-kept.parquet`` (the same for the dev rows: the kept run's ``--dev``, used to pick epochs and fit
the fusion, must not see the held-out labels either) and ``held_out.json`` (the held-out labels and the counts). Train one run on the kept files and one on
the full files, with the same settings, then measure with ``evaluate``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def prepare(data: Path, work: Path, share: float, seed: int) -> dict:
    import numpy as np
    import polars as pl

    train = pl.read_parquet(data / "train.parquet")
    labels = pl.read_parquet(data / "labels.parquet")
    counts = train.select(pl.col("labels").explode().alias("label")).group_by("label").len()
    eligible = sorted(counts.filter(pl.col("len") >= 5)["label"].to_list())
    rng = np.random.default_rng(seed)
    held = sorted(rng.choice(eligible, size=round(share * len(eligible)), replace=False).tolist())
    held_set = set(held)
    def without_held(frame: pl.DataFrame) -> pl.DataFrame:
        return (frame.with_columns(pl.col("labels").list.eval(pl.element().filter(~pl.element().is_in(held))))
                .filter(pl.col("labels").list.len() > 0))

    kept_train = without_held(train)
    kept_dev = without_held(pl.read_parquet(data / "dev.parquet"))
    work.mkdir(parents=True, exist_ok=True)
    labels.filter(~pl.col("label").is_in(held)).write_parquet(work / "labels-kept.parquet")
    kept_train.write_parquet(work / "train-kept.parquet")
    kept_dev.write_parquet(work / "dev-kept.parquet")
    report = {"seed": seed, "share": share, "eligible_labels": len(eligible), "held_out": held,
              "labels_full": labels.height, "labels_kept": labels.height - len(held_set),
              "train_rows_full": train.height, "train_rows_kept": kept_train.height, "dev_rows_kept": kept_dev.height}
    (work / "held_out.json").write_text(json.dumps(report, indent=1))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("dataset")
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--work", type=Path, default=ROOT / "bench" / "work")
    p.add_argument("--share", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "prepare":
        report = prepare(args.data / args.dataset, args.work / f"relabel-{args.dataset}", args.share, args.seed)
        print(json.dumps({k: v for k, v in report.items() if k != "held_out"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
