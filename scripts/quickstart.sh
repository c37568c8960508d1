#!/usr/bin/env bash
# The main job on the bundled sample (catalogs/myntra-sample): set up, train with the bundled MiniLM, export to ONNX,
# tag the sample's dev products, show the top-5 labels of a few, and evaluate (P@k table). The sample has images, so
# training first embeds them (EfficientNet-Lite0, cached). About 5-7 minutes on 2 cores, pip install included.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
xmctag=.venv/bin/xmctag
sample=catalogs/myntra-sample
"$xmctag" train --train $sample/train.parquet --labels $sample/labels.parquet --dev $sample/dev.parquet \
  --out runs/myntra-sample --overwrite --time-budget 5  # fine-tuning (both stages) capped at 5 min (default 20)
"$xmctag" export runs/myntra-sample --out export/myntra-sample --overwrite
"$xmctag" tag $sample/dev.parquet --model export/myntra-sample --top-k 5 \
  --output runs/myntra-sample-dev.predictions.parquet --show 5
"$xmctag" eval runs/myntra-sample-dev.predictions.parquet --truth $sample/dev.parquet --train $sample/train.parquet
