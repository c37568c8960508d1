"""Rebuilds the bundled sample catalogs from the shared benchmark data (run from the repository root):

    python catalogs/make_samples.py [--data ../shared/data]

myntra-sample/: 2,000 training and 400 dev products drawn at random (seed 0) from the Myntra benchmark's train and
dev splits (title, 60x80 JPEG image bytes, 5 facet labels each), and its full 247-label table.
"""

import argparse
from pathlib import Path

import polars as pl

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data")
    args = parser.parse_args()
    source, target = args.data / "myntra", HERE / "myntra-sample"
    target.mkdir(exist_ok=True)
    for split, n in (("train", 2000), ("dev", 400)):
        frame = pl.read_parquet(source / f"{split}.parquet").sample(n, seed=0, shuffle=True)
        frame.select("id", "title", "image", "labels").write_parquet(target / f"{split}.parquet")
    pl.read_parquet(source / "labels.parquet").write_parquet(target / "labels.parquet")


if __name__ == "__main__":
    main()
