"""Quality benchmark: xmctag with default settings vs baselines computed in the same run, on a dev split.

    python bench/quality.py eurlex57k [--data ../shared/data] [--work bench/work] [--set epochs=3 ...]
    python bench/quality.py myntra

For the dataset's train/dev/labels (title only), it computes on dev:

1. TF-IDF (word 1-2 + char 2-5 grams) one-vs-rest LinearSVC (``baselines.tfidf_linear_svc``);
2. zero-shot MiniLM: the off-the-shelf encoder, products vs label texts (with synonyms);
3. xmctag through its public API, exactly as the CLI runs it: ``train`` (defaults, plus any ``--set`` overrides),
   ``export``, ``Tagger.tag_file`` on the dev catalog, ``evaluate`` with the training catalog's propensities; with
   the lexical stage (the default), also its two parts apart: the dense ranking and the lexical model alone. The
   fusion weights are fitted on this dev set, so the fused row is what a dev-tuned model scores on dev.

It prints the machine, the date, a markdown table (P@1/3/5, nDCG@5, PSP@1/3/5, R@5) and the time of each xmctag
phase, and keeps the run, bundle, predictions and a JSON summary under ``--work/<dataset>/``. The test splits are
held back: tune on dev only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from baselines import tfidf_linear_svc, zero_shot
from common import markdown_table, parse_overrides, print_header

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = ["P@1", "P@3", "P@5", "nDCG@5", "PSP@1", "PSP@3", "PSP@5", "R@5"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", help="eurlex57k or myntra (a folder of --data)")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "work")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="Config overrides for xmctag")
    parser.add_argument("--skip", nargs="*", default=[], choices=["tfidf", "zero-shot", "xmctag"])
    args = parser.parse_args(argv)

    import xmctag
    from xmctag.evaluation.metrics import evaluate_rankings, inverse_propensity
    from xmctag.io.datasets import LabelTable, load_labelled_set

    data = args.data / args.dataset
    work = args.work / args.dataset
    work.mkdir(parents=True, exist_ok=True)
    paths = {split: data / f"{split}.parquet" for split in ("train", "dev", "labels")}
    # Title only, as the baselines: Myntra's catalogs have an image column, which `vision = "auto"` would use
    # (bench/images.py measures images). `--set vision=auto` brings them back.
    config = xmctag.Config(**{"vision": "none", **parse_overrides(args.set)})
    labels = LabelTable.load(paths["labels"], config)
    train_set = load_labelled_set(paths["train"], config, labels)
    dev_set = load_labelled_set(paths["dev"], config, labels)
    inv_p = inverse_propensity(train_set.label_counts(len(labels)), len(train_set), config.psp_a, config.psp_b)

    print_header(f"xmctag quality on {args.dataset} (dev split, {', '.join(config.text_cols)} only)")
    print(f"- data: {len(train_set)} train / {len(dev_set)} dev rows, {len(labels)} labels "
          f"({int((train_set.label_counts(len(labels)) > 0).sum())} seen in train); PSP A={config.psp_a} "
          f"B={config.psp_b}")
    print(f"- xmctag settings: defaults{' + ' + ' '.join(args.set) if args.set else ''}")
    print()
    results: dict[str, dict] = {}
    seconds: dict[str, float] = {}

    if "tfidf" not in args.skip:
        started = time.perf_counter()
        top = tfidf_linear_svc(train_set.texts, train_set.labels, dev_set.texts, len(labels))
        seconds["tfidf"] = time.perf_counter() - started
        results["TF-IDF + LinearSVC (one-vs-rest)"] = evaluate_rankings(top, dev_set.labels, (1, 3, 5), inv_p)
    if "zero-shot" not in args.skip:
        from xmctag.models.embedding import encode_texts
        from xmctag.models.encoder import TextEncoder
        from xmctag.models.registry import load_pretrained

        tokenizer, backbone = load_pretrained("builtin:minilm-l6")
        encoder = TextEncoder(backbone)

        def encode(texts):
            return encode_texts(encoder, tokenizer, texts, config.max_length)

        top = zero_shot(encode, dev_set.texts, labels.texts)
        results["zero-shot MiniLM (label texts)"] = evaluate_rankings(top, dev_set.labels, (1, 3, 5), inv_p)
    if "xmctag" not in args.skip:
        run, bundle, preds = work / "run", work / "bundle", work / "dev.predictions.parquet"
        started = time.perf_counter()
        result = xmctag.train(paths["train"], paths["labels"], run, dev=paths["dev"], config=config, overwrite=True)
        seconds["xmctag train"] = time.perf_counter() - started
        started = time.perf_counter()
        xmctag.export(run, bundle, overwrite=True)
        seconds["xmctag export"] = time.perf_counter() - started
        tagger = xmctag.Tagger.load(bundle, device="cpu")
        summary = tagger.tag_file(paths["dev"], preds, top_k=5)
        seconds["xmctag tag (dev)"] = summary.seconds
        report = xmctag.evaluate(preds, paths["dev"], train=paths["train"], psp_a=config.psp_a, psp_b=config.psp_b)
        trained_epochs = json.loads((run / "metrics.json").read_text())["epochs"]
        results[f"xmctag ({config.encoder}, epochs {config.epochs} -> {trained_epochs})"] = report.metrics
        final = result.history[-1]
        if "dev_exclusive_groups" in final:  # exact search, one label per exclusive facet (tag --exclusive-groups)
            results["  same model, tag --exclusive-groups"] = final["dev_exclusive_groups"]
        if "dev_lexical" in final:  # the fused ranking's two parts (training's exact search, same dev rows)
            results["  of which: dense (label vectors + neighbour votes)"] = final["dev_dense"]
            results["  of which: lexical model alone (TF-IDF label trees)"] = final["dev_lexical"]
            fusion = json.loads((run / "lexical" / "lexical.json").read_text())["fusion"]
            print(f"- fusion weights {fusion['weights']} for training counts <= {fusion['bands']} and above, "
                  f"fitted on {fusion['fitted_on']}; lexical stage {final.get('lexical_seconds', 0) / 60:.1f} min")
        if "dev_label_vectors" in final:
            results["  of which: label vectors alone (no neighbour votes)"] = final["dev_label_vectors"]
        encoder_only = [h["dev"] for h in result.history if "epoch" in h and "dev" in h]
        if encoder_only:
            results["  of which: dual encoder alone (label texts)"] = encoder_only[-1]

    rows = [[name] + [f"{100 * m.get(c, float('nan')):.2f}" for c in COLUMNS] for name, m in results.items()]
    print(markdown_table(["method"] + COLUMNS, rows))
    print()
    for phase, s in seconds.items():
        print(f"- {phase}: {s / 60:.1f} min")
    (work / "summary.json").write_text(json.dumps({"results": results, "seconds": seconds,
                                                   "overrides": args.set}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
