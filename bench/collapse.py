"""Does a dual encoder collapse? One short training run that logs the loss and the in-batch score spread.

    python bench/collapse.py --encoder builtin:smollm2-135m --set centering=ema
    python bench/collapse.py --encoder builtin:minilm-l6 --train-rows 3000 --dev-rows 300

Trains ``--epochs`` (default 1) on ``--train-rows`` rows of EURLEX-57K (sampled with ``--seed``) through
``xmctag.train`` and prints, every ``--every`` steps, the mean training loss and the mean per-product standard
deviation of its in-batch scores (product x label cosines). A collapsing encoder shows the spread shrinking toward
0 and the triplet loss toward num_negatives x margin_min; a learning one keeps the spread while the loss falls. It
then prints the dev metrics of the dual encoder alone (label-text embeddings, no label vectors) after each epoch
and stops after the last (``--full`` runs the rest of training: label vectors, neighbour votes). Settings: xmctag
defaults plus ``--set`` overrides; the CPU runs in bench/RESULTS.md used ``batch_size=64 warmup_steps=10 max_length=32
label_max_length=24``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import parse_overrides, print_header, write_title_subsets  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


class EpochsDone(Exception):
    pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", default="builtin:smollm2-135m")
    parser.add_argument("--dataset", type=Path, default=ROOT.parent / "shared" / "data" / "eurlex57k")
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "work" / "collapse")
    parser.add_argument("--train-rows", type=int, default=3000)
    parser.add_argument("--dev-rows", type=int, default=300, help="first N dev rows (0: all)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--every", type=int, default=5, help="report every N steps")
    parser.add_argument("--full", action="store_true", help="finish training instead of stopping after epoch 1")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="Config overrides")
    args = parser.parse_args()

    import numpy as np

    import xmctag
    import xmctag.training.trainer as trainer

    print_header(f"collapse check: {args.encoder}")
    train_path, dev_path, _ = write_title_subsets(args.dataset, args.work, args.train_rows, args.dev_rows, args.seed)
    config = xmctag.Config.create(None, encoder=args.encoder, epochs=args.epochs, vision="none",
                                  **parse_overrides(args.set))

    started, losses, spreads = time.perf_counter(), [], []
    make_loss = trainer.make_loss

    def logging_loss(config):
        loss_fn = make_loss(config)
        forward = loss_fn.forward

        def forward_and_log(scores, positive, is_relevant):
            loss = forward(scores, positive, is_relevant)
            losses.append(float(loss.detach()))
            spreads.append(float(scores.detach().float().std(dim=1).mean()))
            if len(losses) % args.every == 0:
                print(f"step {len(losses):4d}  loss {np.mean(losses[-args.every:]):.4f}  score spread "
                      f"{np.mean(spreads[-args.every:]):.4f}  {time.perf_counter() - started:.0f} s", flush=True)
            return loss

        loss_fn.forward = forward_and_log
        return loss_fn

    evaluate, epochs_done = trainer.evaluate_scores, []

    def evaluate_and_stop(*a, **k):
        metrics = evaluate(*a, **k)
        epochs_done.append(1)
        print(f"dev, dual encoder alone after epoch {len(epochs_done)}: " +
              ", ".join(f"{m} {100 * metrics[m]:.2f}" for m in ("P@1", "P@5", "PSP@5")), flush=True)
        if len(epochs_done) == args.epochs:
            trainer.evaluate_scores = evaluate  # the later calls are the label-vector stage's
            if not args.full:
                raise EpochsDone
        return metrics

    trainer.make_loss, trainer.evaluate_scores = logging_loss, evaluate_and_stop
    try:
        xmctag.train(train_path, args.dataset / "labels.parquet", args.work / "run", dev=dev_path, config=config,
                     overwrite=True, progress=False)
    except EpochsDone:
        pass
    print(f"{time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
