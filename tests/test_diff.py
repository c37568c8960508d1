"""diff: what changed between two prediction files. Numbers on hand-made files written by the real writer, the same
report from every mix of formats, the Python-set definition of every count on random files, real tagging runs,
the CLI (table, --json, --html, errors), HTML escaping, and the page rendered by a real headless Chromium."""

import json
import shutil
import statistics
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from conftest import write_catalog
from typer.testing import CliRunner

import xmctag
from xmctag import UserError
from xmctag.cli import app
from xmctag.io.predictions import read_parquet_metadata
from xmctag.io.writers import PredictionWriter
from xmctag.reports.html import NEW_COLOUR, OLD_COLOUR, render_html, write_html
from xmctag.reports.values import display, lookup

runner = CliRunner()

# Last night's and tonight's predictions: (label, score) lists per product id.
OLD = {"p1": [("red", 0.9), ("shirt", 0.8)], "p2": [("blue", 0.7), ("jeans", 0.6), ("cap", 0.2)],
       "p3": [("green", 0.5)], "p4": [("black", 0.95), ("shoes", 0.4)], "p5": [], "p6": [("red", 0.6), ("bag", 0.3)]}
NEW = {"p1": [("shirt", 0.85), ("red", 0.82)],  # reordered: same set, another best label
       "p2": [("blue", 0.75), ("jeans", 0.55), ("belt", 0.25)],  # re-tagged: +belt -cap
       "p3": [("green", 0.45)],  # unchanged
       "p5": [("red", 0.3)],  # re-tagged: +red (had no label above min_score)
       "p6": [("blue", 0.65), ("bag", 0.35)],  # re-tagged: +blue -red
       "p7": [("red", 0.99), ("dress", 0.5)]}  # added; p4 removed
OLD_META = {"bundle_id": "bundle-old", "bundle": "/srv/export/old", "tagged_at": "2026-12-02T02:00:00+00:00",
            "top_k": "3", "min_score": "0.2", "xmctag_version": "0.1.0"}
NEW_META = {**OLD_META, "bundle_id": "bundle-new", "bundle": "/srv/export/new", "tagged_at": "2026-12-03T02:00:00+00:00"}


def write_predictions(path: Path, rows: dict, metadata: dict, fmt: str | None = None) -> Path:
    """``rows`` written by xmctag's own PredictionWriter, as ``tag`` writes them."""
    fmt = fmt or path.suffix.lstrip(".")
    with PredictionWriter(path, fmt, metadata) as writer:
        writer.write(list(rows), [[label for label, _ in r] for r in rows.values()],
                     [[f"text of {label}" for label, _ in r] for r in rows.values()],
                     [np.array([score for _, score in r], dtype=np.float32) for r in rows.values()])
    return path


@pytest.fixture(scope="module")
def nights(tmp_path_factory) -> Path:
    """OLD and NEW in every format: old.parquet, old.csv, old.jsonl, new.parquet, ... (read-only)."""
    out = tmp_path_factory.mktemp("nights")
    for fmt in ("parquet", "csv", "jsonl"):
        write_predictions(out / f"old.{fmt}", OLD, OLD_META)
        write_predictions(out / f"new.{fmt}", NEW, NEW_META)
    return out


def invoke(*args):
    return runner.invoke(app, ["diff", *[str(a) for a in args]], catch_exceptions=False)


def test_counts_labels_and_scores_of_hand_made_files(nights):
    report = xmctag.diff(nights / "old.parquet", nights / "new.parquet", top=3)
    products = report.products
    assert (products.old, products.new, products.added, products.removed, products.common) == (6, 6, 1, 1, 5)
    assert (products.retagged, products.unchanged, products.reordered, products.top1_changed) == (3, 2, 1, 3)
    assert products.mean_jaccard == pytest.approx((1 + 2 / 4 + 1 + 0 + 1 / 3) / 5)
    labels = report.labels
    assert (labels.old, labels.new, labels.appeared, labels.disappeared) == (9, 8, 2, 3)  # +belt +dress; -cap -black -shoes
    assert (labels.gains, labels.losses, labels.changed) == (3, 2, 4)  # +belt +red +blue; -cap -red
    # movers by change in products with the label, ties by label id; gained/lost among products in both files
    assert [(m.label, m.old, m.new, m.change, m.gained, m.lost) for m in report.top_gainers] == [
        ("belt", 0, 1, 1, 1, 0), ("blue", 1, 2, 1, 1, 0), ("dress", 0, 1, 1, 0, 0)]
    assert [(m.label, m.change, m.lost) for m in report.top_losers] == [("black", -1, 0), ("cap", -1, 1),
                                                                          ("shoes", -1, 0)]
    assert report.examples.added == ["p7"] and report.examples.removed == ["p4"]
    assert [(r.id, r.gained, r.lost) for r in report.examples.retagged] == [
        ("p2", ["belt"], ["cap"]), ("p5", ["red"], []), ("p6", ["blue"], ["red"])]
    # provenance from the Parquet metadata
    assert (report.old.bundle_id, report.new.bundle_id, report.bundle_changed) == ("bundle-old", "bundle-new", True)
    assert report.new.tagged_at == NEW_META["tagged_at"] and report.old.top_k == "3"
    assert (report.old.pairs, report.new.pairs) == (10, 11)
    assert report.notes == []

    old_scores = [s for r in OLD.values() for _, s in r]
    new_scores = [s for r in NEW.values() for _, s in r]
    for kind, before, after in (("all", old_scores, new_scores),
                                ("top1", [r[0][1] for r in OLD.values() if r], [r[0][1] for r in NEW.values() if r])):
        shift = report.scores[kind]
        for stats, values, counts in ((shift.old, before, shift.histogram.old), (shift.new, after, shift.histogram.new)):
            assert stats.count == len(values) == sum(counts)
            assert stats.mean == pytest.approx(statistics.fmean(values), abs=1e-6)
            assert stats.std == pytest.approx(statistics.pstdev(values), abs=1e-6)
            assert (stats.min, stats.max) == (pytest.approx(min(values)), pytest.approx(max(values)))
            assert stats.p50 == pytest.approx(statistics.median(values), abs=1e-6)
        assert shift.histogram.edges == pytest.approx([i / 20 for i in range(21)])
    # float32 scores land in their decimal bin: 0.6 (twice) in [0.6, 0.65), 0.95 in [0.95, 1], 0.2 in [0.2, 0.25)
    assert [(i, c) for i, c in enumerate(report.scores["all"].histogram.old) if c] == [
        (4, 1), (6, 1), (8, 1), (10, 1), (12, 2), (14, 1), (16, 1), (18, 1), (19, 1)]


def test_swapping_the_files_swaps_the_report(nights):
    forward = xmctag.diff(nights / "old.parquet", nights / "new.parquet")
    back = xmctag.diff(nights / "new.parquet", nights / "old.parquet")
    assert (back.products.added, back.products.removed) == (forward.products.removed, forward.products.added)
    assert (back.products.retagged, back.products.mean_jaccard) == (forward.products.retagged,
                                                                     forward.products.mean_jaccard)
    assert (back.labels.gains, back.labels.losses) == (forward.labels.losses, forward.labels.gains)
    assert [m.label for m in back.top_losers] == [m.label for m in forward.top_gainers]
    assert back.scores["all"].old == forward.scores["all"].new
    swapped = f"OLD was tagged after NEW ({NEW_META['tagged_at']} > {OLD_META['tagged_at']}): are the files swapped?"
    assert back.notes == [swapped]
    same = xmctag.diff(nights / "old.parquet", nights / "old.csv")
    assert (same.products.retagged, same.products.unchanged, same.labels.changed, same.bundle_changed) == (0, 5, 0,
                                                                                                           False)
    # p5 has no label: an empty list in Parquet, no row in CSV; left out, not counted as removed
    assert (same.products.removed, same.old.products) == (0, 5)
    assert same.notes == [("OLD is Parquet and the other file CSV/JSONL, which has no row for a product without "
                           "labels: the 1 products of OLD without labels are left out")]


@pytest.mark.parametrize("old_fmt,new_fmt", [("csv", "parquet"), ("parquet", "jsonl"), ("jsonl", "csv")])
def test_formats_mixed_give_the_same_report(nights, old_fmt, new_fmt):
    reference = xmctag.diff(nights / "old.csv", nights / "new.jsonl").to_dict()
    mixed = xmctag.diff(nights / f"old.{old_fmt}", nights / f"new.{new_fmt}").to_dict()
    assert (mixed["old"]["format"], mixed["new"]["format"]) == (old_fmt, new_fmt)
    # OLD's p5 has no label: no row in CSV/JSONL, so a Parquet OLD beside a CSV/JSONL NEW is taken without it
    assert len(mixed["notes"]) == (old_fmt == "parquet")
    for d in (reference, mixed):
        del d["notes"]
        for side in ("old", "new"):  # provenance of CSV/JSONL from their .meta.json sidecars
            del d[side]["path"], d[side]["format"]
    assert mixed == reference
    assert reference["products"]["added"] == 2 and reference["examples"]["added"] == ["p5", "p7"]


def test_every_count_matches_its_definition_on_random_files(tmp_path):
    """Random predictions with repeats of the same label sets, compared with plain Python sets."""
    rng = np.random.default_rng(7)
    labels = [f"l{i}" for i in range(30)]

    def night(ids):
        return {i: [(str(x), float(s)) for x, s in zip(rng.choice(labels, rng.integers(0, 6), replace=False),
                                                       np.sort(rng.random(6))[::-1])] for i in ids}

    old = night([f"id{i}" for i in rng.choice(400, 300, replace=False)])
    new = {i: (v if rng.random() < 0.5 else night([i])[i]) for i, v in old.items() if rng.random() < 0.9}
    new.update(night([f"new{i}" for i in range(40)]))
    write_predictions(tmp_path / "old.parquet", old, OLD_META)
    write_predictions(tmp_path / "new.parquet", new, NEW_META)  # both Parquet: products without labels are rows
    report = xmctag.diff(tmp_path / "old.parquet", tmp_path / "new.parquet", top=1000)

    sets_old = {i: {x for x, _ in r} for i, r in old.items()}
    sets_new = {i: {x for x, _ in r} for i, r in new.items()}
    common = sets_old.keys() & sets_new.keys()
    retagged = {i for i in common if sets_old[i] != sets_new[i]}
    assert report.products.added == len(sets_new.keys() - sets_old.keys())
    assert report.products.removed == len(sets_old.keys() - sets_new.keys())
    assert (report.products.common, report.products.retagged) == (len(common), len(retagged))
    assert report.products.top1_changed == sum(
        (old[i][0][0] if old[i] else None) != (new[i][0][0] if new[i] else None) for i in common)
    assert report.products.mean_jaccard == pytest.approx(statistics.fmean(
        len(sets_old[i] & sets_new[i]) / len(sets_old[i] | sets_new[i]) if sets_old[i] | sets_new[i] else 1.0
        for i in common))
    moves = {m.label: m for m in report.top_gainers + report.top_losers}
    for label in labels:
        before = sum(label in s for s in sets_old.values())
        after = sum(label in s for s in sets_new.values())
        gained = sum(label in sets_new[i] - sets_old[i] for i in common)
        lost = sum(label in sets_old[i] - sets_new[i] for i in common)
        if before != after:
            m = moves[label]
            assert (m.old, m.new, m.change, m.gained, m.lost) == (before, after, after - before, gained, lost)
        else:
            assert label not in moves
    assert report.labels.gains == sum(len(sets_new[i] - sets_old[i]) for i in common)
    assert report.labels.losses == sum(len(sets_old[i] - sets_new[i]) for i in common)
    changes = [m.change for m in report.top_gainers]
    assert changes == sorted(changes, reverse=True) and all(c > 0 for c in changes)
    for kind in ("all", "top1"):
        histogram = report.scores[kind].histogram
        assert sum(histogram.old) == report.scores[kind].old.count and sum(histogram.new) == report.scores[kind].new.count
    assert report.scores["all"].new.count == sum(len(r) for r in new.values())
    assert report.scores["top1"].old.count == sum(1 for r in old.values() if r)
    assert [r.id for r in report.examples.retagged] == sorted(retagged)


@pytest.mark.e2e
def test_diff_of_two_real_tagging_runs(tagger, tmp_path):
    titles = ["acme red shirt", "zeta blue jeans", "nova white watch", "orbit pink dress", "lumen grey belt"]
    write_catalog(tmp_path / "monday.parquet", titles)
    # Tuesday: p0 is gone, p1 changed its title, p5 is new
    write_catalog(tmp_path / "tuesday.parquet", ["acme black shoes", *titles[2:], "nova green cap"],
                  ids=["p1", "p2", "p3", "p4", "p5"])
    tagger.tag_file(tmp_path / "monday.parquet", tmp_path / "monday.parquet.out.parquet", top_k=3, progress=False)
    tagger.tag_file(tmp_path / "tuesday.parquet", tmp_path / "tuesday.csv", top_k=2, progress=False)
    report = xmctag.diff(tmp_path / "monday.parquet.out.parquet", tmp_path / "tuesday.csv")
    assert (report.products.added, report.products.removed, report.products.common) == (1, 1, 4)
    assert report.examples.added == ["p5"] and report.examples.removed == ["p0"]
    assert report.products.retagged == 4  # top-3 -> top-2: every label set changed
    assert report.labels.losses == 4 + sum(m.gained for m in report.top_gainers)  # p1 is re-tagged as well
    assert report.bundle_changed is False and report.old.bundle_id == tagger.bundle_id
    meta = read_parquet_metadata(tmp_path / "monday.parquet.out.parquet")
    assert report.old.tagged_at == meta["tagged_at"] and report.new.tagged_at is not None
    assert "top_k changed from 3 to 2: label counts change with it" in report.notes
    assert (report.scores["all"].old.count, report.scores["all"].new.count) == (15, 10)
    assert report.scores["top1"].new.count == 5 and 0 <= report.scores["all"].new.min <= 1


def test_bad_inputs_are_user_errors(nights, tmp_path):
    good = nights / "old.parquet"
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(UserError, match="broken.parquet: not a readable Parquet file"):
        xmctag.diff(good, tmp_path / "broken.parquet")
    pl.read_parquet(good).with_columns(pl.col("scores").list.slice(0, 1)).write_parquet(tmp_path / "short.parquet")
    with pytest.raises(UserError, match="short.parquet: id 'p1': 1 scores for 2 labels"):
        xmctag.diff(good, tmp_path / "short.parquet")
    pl.read_csv(nights / "new.csv").with_columns(score=pl.lit("high")).write_csv(tmp_path / "words.csv")
    with pytest.raises(UserError, match="words.csv: column 'score' has type String; expected numbers"):
        xmctag.diff(good, tmp_path / "words.csv")
    pl.read_csv(nights / "new.csv").with_columns(score=pl.when(pl.col("id") == "p3").then(float("nan"))
                                                 .otherwise(pl.col("score"))).write_csv(tmp_path / "nan.csv")
    with pytest.raises(UserError, match="nan.csv: id 'p3', rank 1: score nan is not a finite number"):
        xmctag.diff(good, tmp_path / "nan.csv")
    pl.concat([pl.read_parquet(good)] * 2).write_parquet(tmp_path / "twice.parquet")
    with pytest.raises(UserError, match="twice.parquet: id 'p1' is in more than one row"):
        xmctag.diff(tmp_path / "twice.parquet", good)
    shutil.copy(nights / "new.csv", tmp_path / "new.csv")
    (tmp_path / "new.csv.meta.json").write_text("[1, 2]")
    with pytest.raises(UserError, match=r"new.csv.meta.json: not the metadata xmctag writes \(a JSON object"):
        xmctag.diff(good, tmp_path / "new.csv")
    with pytest.raises(UserError, match="--top must be at least 1"):
        xmctag.diff(good, good, top=0)


def test_a_file_without_scores_or_provenance_still_diffs(nights, tmp_path):
    pl.read_parquet(nights / "new.parquet").drop("scores").write_parquet(tmp_path / "bare.parquet")
    report = xmctag.diff(nights / "old.parquet", tmp_path / "bare.parquet")
    assert report.scores["all"].new is None and sum(report.scores["all"].histogram.new) == 0
    assert report.new.bundle_id is None and report.bundle_changed is None
    assert report.products.retagged == 3
    assert report.notes == [f"NEW {tmp_path / 'bare.parquet'} has no scores: its score statistics are empty"]


# -- CLI ------------------------------------------------------------------------------------------------------------
def test_cli_json_table_and_html_agree(nights, tmp_path):
    old, new = nights / "old.parquet", nights / "new.parquet"
    report = xmctag.diff(old, new, top=2)
    result = invoke(old, new, "--json", "--top", "2", "--html", tmp_path / "r.html")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == json.loads(json.dumps(report.to_dict()))
    assert (tmp_path / "r.html").read_text() == render_html(report.to_dict())
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]  # no temporary or lock file left
    table = invoke(old, new, "--top", "2")
    assert table.exit_code == 0
    lines = table.stdout.splitlines()
    assert any("re-tagged (label set changed)" in line and line.rstrip(" │").endswith(" 3") for line in lines)
    assert any("mean Jaccard" in line and "0.5667" in line for line in lines)
    assert any(line.startswith("│ belt ") and "+1" in line for line in lines)
    assert "bundle: changed" in table.stdout


@pytest.mark.parametrize("args,message", [
    (["{nights}/old.parquet", "{tmp}/missing.csv"], "{tmp}/missing.csv: no such file"),
    (["{nights}/old.parquet", "{nights}"], "is a directory, not a prediction file"),
    (["{nights}/old.parquet", "{nights}/new.csv", "--html", "{nights}/new.csv"],
     "--html {nights}/new.csv: is the prediction file"),
    (["{nights}/old.parquet", "{nights}/new.csv", "--html", "{tmp}/no/r.html"], "directory {tmp}/no does not exist"),
])
def test_cli_errors_are_one_line_and_write_nothing(nights, tmp_path, args, message):
    before = sorted(nights.iterdir())
    result = invoke(*[a.format(nights=nights, tmp=tmp_path) for a in args])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message.format(nights=nights, tmp=tmp_path) in lines[0]
    assert sorted(nights.iterdir()) == before and list(tmp_path.iterdir()) == []
    assert invoke(nights / "old.parquet", nights / "new.csv", "--top", "0").exit_code == 2


def test_diff_loads_no_model_runtime(nights, tmp_path):
    """diff reads files: torch, ONNX Runtime and faiss stay unloaded (the CLI and the API)."""
    import sys

    code = """if True:
        import sys
        import xmctag
        from xmctag.cli import app
        xmctag.diff(sys.argv[1], sys.argv[2])
        try:
            app(["diff", sys.argv[1], sys.argv[2], "--html", sys.argv[3]])
        except SystemExit as e:
            assert e.code in (0, None), e.code
        print(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "onnxruntime", "faiss", "transformers")))
    """
    done = subprocess.run([sys.executable, "-c", code, str(nights / "old.parquet"), str(nights / "new.jsonl"),
                           str(tmp_path / "r.html")], cwd=Path(__file__).parent.parent, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "r.html").stat().st_size > 0


# -- HTML -----------------------------------------------------------------------------------------------------------
HOSTILE = {"<script>alert(1)</script>": 0.9, "a&b\"quoted\" 'x'": 0.6, "\x1b[31mred": 0.5,
           "</svg><img src=x onerror=alert(2)>": 0.4}


@pytest.fixture()
def hostile(tmp_path) -> tuple[Path, Path]:
    """Two files whose ids, labels and provenance are markup."""
    meta = {**NEW_META, "bundle_id": "<b onmouseover=alert(3)>x</b>"}
    old = write_predictions(tmp_path / "old.parquet", {"p1": [("safe", 0.5)]}, OLD_META)
    new = write_predictions(tmp_path / "new<i>.jsonl", {
        "p1": list(HOSTILE.items()), "<img src=y onerror=alert(4)>": [("<script>alert(1)</script>", 0.7)]}, meta)
    return old, new


def test_html_escapes_text_from_the_files(hostile):
    report = xmctag.diff(*hostile)
    page = render_html(report.to_dict())
    assert "<script" not in page.lower() and "<img" not in page and "<b " not in page and "<i>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;/svg&gt;&lt;img src=x" in page
    assert "a&amp;b&quot;quoted&quot; &#x27;x&#x27;" in page
    assert "\x1b" not in page and "\\x1b[31mred" in page
    assert "new&lt;i&gt;.jsonl" in page
    # self-contained: nothing fetched, nothing run
    assert "content=\"default-src 'none'; style-src 'unsafe-inline'\"" in page
    for fetches in ("src=", "href=", "url(", "@import", "https://", "<link", "<iframe", "<object"):
        assert fetches not in page.replace("src=x", "").replace("src=y", "")  # (the escaped text of the labels)


CHROMIUMS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    return next((found for name in CHROMIUMS if (found := shutil.which(name))), None)


class NumberCollector(HTMLParser):
    """Every element with a ``data-key``: its text (spans, cells) or ``data-count`` (SVG bars)."""

    def __init__(self):
        super().__init__()
        self.found: list[tuple[str, str, dict]] = []
        self._open: list = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "data-key" in attrs:
            self._open.append([tag, attrs, ""])

    def handle_data(self, data):
        if self._open and self._open[-1][0] != "rect":  # a bar's text is its tooltip: data-count has the count
            self._open[-1][2] += data

    def handle_endtag(self, tag):
        if self._open and tag == self._open[-1][0]:
            tag, attrs, text = self._open.pop()
            self.found.append((attrs["data-key"], text, attrs))


@pytest.mark.skipif(find_chromium() is None, reason="no Chromium found (Debian: apt-get install chromium; "
                                                     ".ci/run installs it)")
def test_html_renders_in_chromium_with_the_numbers_of_the_json(nights, hostile, tmp_path):
    chromium = find_chromium()
    old, new = nights / "old.parquet", nights / "new.jsonl"
    result = invoke(old, new, "--json", "--html", tmp_path / "report.html")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    common = [chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}",
              "--no-first-run"]
    url = (tmp_path / "report.html").as_uri()
    shot = subprocess.run([*common, f"--screenshot={tmp_path / 'out.png'}", "--window-size=1200,1600", url],
                          capture_output=True, timeout=180, check=False)
    assert shot.returncode == 0, shot.stderr.decode()[-2000:]
    from PIL import Image

    with Image.open(tmp_path / "out.png") as image:
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape == (1600, 1200, 3)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # text, tables, bars: not a blank page
    for colour in (OLD_COLOUR, NEW_COLOUR):  # the SVG bars were drawn (the frequency plot is in the first screen)
        rgb = [int(colour[i:i + 2], 16) for i in (1, 3, 5)]
        assert (pixels == rgb).all(axis=2).sum() > 200, colour

    dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, timeout=180, check=False)
    assert dom.returncode == 0, dom.stderr.decode()[-2000:]
    collector = NumberCollector()
    collector.feed(dom.stdout.decode())
    keys = set()
    for key, text, attrs in collector.found:
        value = lookup(data, key)
        keys.add(key)
        if "data-count" in attrs:
            assert int(attrs["data-count"]) == value, key
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            assert float(text.replace(",", "")) == pytest.approx(value, abs=5e-5), key
        else:
            assert text == display(value), key
    # every headline number, every histogram bar and every mover is on the page
    for key in ("products.added", "products.removed", "products.retagged", "products.unchanged",
                "labels.gains", "labels.losses", "scores.all.old.mean", "scores.top1.new.p50", "new.tagged_at"):
        assert key in keys
    for kind in ("all", "top1"):
        for side in ("old", "new"):
            assert {k for k in keys if k.startswith(f"scores.{kind}.histogram.{side}.")} == {
                f"scores.{kind}.histogram.{side}.{i}" for i in range(20)}
    assert {k.rsplit(".", 1)[0] for k in keys if k.startswith("top_")} == {
        f"{which}.{i}" for which in ("top_gainers", "top_losers") for i in range(len(data[which]))}

    # markup in the files stays text in the browser too
    write_html(xmctag.diff(*hostile), tmp_path / "hostile.html")
    dom = subprocess.run([*common, "--dump-dom", (tmp_path / "hostile.html").as_uri()], capture_output=True,
                         timeout=180, check=False)
    assert dom.returncode == 0
    assert "<script" not in dom.stdout.decode() and "<img" not in dom.stdout.decode()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom.stdout.decode()
