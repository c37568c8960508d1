"""``xmctag diff --html FILE``: the report as one self-contained HTML page a person opens in a browser.

The page is rendered from ``DiffReport.to_dict()`` (the dict ``--json`` prints), with inline CSS and inline SVG plots
drawn here: label frequency before/after for the top movers, and histograms of the old and new scores (all returned,
and each product's best). No script, no external resource: its Content-Security-Policy allows inline styles only, so
the page loads nothing and runs nothing even if a label smuggled markup past the escaping. Every text from the
files (paths, ids, labels, provenance) is HTML-escaped, with control characters shown as escapes.

Every number shown is an element with ``data-key`` set to its path in the report dict (``products.added``,
``scores.all.old.mean``, ``top_gainers.0.new``; ``xmctag.reports.values.lookup``), whose text is that value as
``xmctag.reports.values.display`` writes it; histogram bars carry theirs (``scores.all.histogram.old.3``) in
``data-key`` and ``data-count``. A test reads the rendered page back and checks each against the JSON.

``write_html(report, path)`` writes it atomically (``xmctag.io.atomic``); ``check_html_output(path, inputs)`` refuses
an output that is one of the inputs, before any work.
"""

from __future__ import annotations

import html
from pathlib import Path

from xmctag.errors import UserError
from xmctag.io.atomic import AtomicOutput, resolve_output
from xmctag.reports.values import LABEL_ROWS, PRODUCT_ROWS, STATS, display, lookup, shown, signed

OLD_COLOUR, NEW_COLOUR = "#9aa5b1", "#2f6fb0"
LABEL_CHARS = 40  # a longer label is cut in the plot (the full text is its tooltip and in the tables)

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; color: #1f2933;
       margin: 24px auto; max-width: 1100px; padding: 0 16px; background: #fff; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px; border-bottom: 1px solid #d9e2ec; }
table { border-collapse: collapse; margin: 6px 0 12px; }
th, td { padding: 3px 10px; border-bottom: 1px solid #e4e7eb; text-align: left; vertical-align: top; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
.cards { display: flex; flex-wrap: wrap; gap: 10px; margin: 8px 0; }
.card { border: 1px solid #d9e2ec; border-radius: 6px; padding: 8px 14px; min-width: 120px; }
.card .v { font-size: 22px; font-weight: 600; } .card .k { color: #52606d; font-size: 12px; }
.old { color: #616e7c; } .new { color: #2f6fb0; } .plus { color: #1b7a3d; } .minus { color: #b42318; }
.note { background: #fff8e1; border-left: 4px solid #f0b429; padding: 4px 10px; margin: 4px 0; }
.path, code { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 12.5px; word-break: break-all; }
.legend span { display: inline-block; width: 12px; height: 12px; margin: 0 4px 0 12px; vertical-align: -1px; }
svg text { font: 11px system-ui, "DejaVu Sans", sans-serif; fill: #3e4c59; }
"""


def check_html_output(path: str | Path, inputs: list[str | Path]) -> None:
    """A ``UserError`` when ``path`` is one of the inputs (writing it would replace a prediction file)."""
    target = resolve_output(path).resolve()
    for source in inputs:
        if Path(source).resolve() == target:
            raise UserError(f"--html {path}: is the prediction file {source}; write the report elsewhere")


def write_html(report, path: str | Path) -> Path:
    """``report`` (a ``DiffReport``) as an HTML page at ``path``, atomically; returns ``path``."""
    check_html_output(path, [report.old.path, report.new.path])
    page = render_html(report.to_dict())
    with AtomicOutput(path, what="--html") as tmp:
        tmp.write_text(page, encoding="utf-8")
    return Path(path)


def render_html(data: dict) -> str:
    """The page for a report dict (``DiffReport.to_dict()``)."""
    old_name, new_name = (Path(data[side]["path"]).name for side in ("old", "new"))
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>xmctag diff: {esc(old_name)} \u2192 {esc(new_name)}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>What changed: {esc(old_name)} \u2192 {esc(new_name)}</h1>",
        _provenance(data), _products(data), _labels(data), _scores(data), _examples(data), _notes(data),
        '<p class="old">Written by <code>xmctag diff</code>; every number is in <code>xmctag diff --json</code>.</p>',
        "</body></html>",
    ]
    return "\n".join(p for p in parts if p) + "\n"


def esc(text) -> str:
    """Text from a file (or anything) as HTML text or attribute value."""
    return html.escape(shown(str(text)), quote=True)


def num(data: dict, key: str, css: str = "") -> str:
    """The value at ``key`` as an element carrying its path (see the module docstring)."""
    klass = f' class="{css}"' if css else ""
    return f'<span data-key="{esc(key)}"{klass}>{esc(display(lookup(data, key)))}</span>'


def svg_open(width: int, height: int, label: str, css: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
            f'aria-label="{esc(label)}" class="{css}">')


def _provenance(data: dict) -> str:
    rows = []
    for field, name in (("path", "file"), ("format", "format"), ("products", "products"),
                        ("pairs", "(product, label) pairs"), ("labels", "distinct labels"), ("bundle_id", "bundle id"),
                        ("bundle", "bundle directory"), ("tagged_at", "tagged at"), ("top_k", "top-k"),
                        ("min_score", "min score"), ("xmctag_version", "xmctag version"), ("catalog", "catalog")):
        numeric = isinstance(data["old"][field], int) and not isinstance(data["old"][field], bool)
        cells = "".join(f'<td class="{"n" if numeric else "path"}">{num(data, f"{side}.{field}")}</td>'
                        for side in ("old", "new"))
        rows.append(f"<tr><th>{name}</th>{cells}</tr>")
    changed = {None: "unknown (a file does not record its bundle)", True: "changed", False: "the same"}
    return (f'<h2>Files</h2><table><tr><th></th><th class="old">OLD</th><th class="new">NEW</th></tr>{"".join(rows)}'
            f'</table><p>Bundle: <strong data-bundle-changed="{esc(display(data["bundle_changed"]))}">'
            f'{changed[data["bundle_changed"]]}</strong></p>')


def _cards(data: dict, items) -> str:
    cards = "".join(f'<div class="card"><div class="v">{num(data, key)}</div><div class="k">{esc(name)}</div></div>'
                    for name, key in items)
    return f'<div class="cards">{cards}</div>'


def _products(data: dict) -> str:
    items = [(name, f"products.{key}") for name, key in PRODUCT_ROWS]
    return f"<h2>Products</h2>{_cards(data, items[:4])}{_cards(data, items[4:])}"


def _labels(data: dict) -> str:
    items = [(name, f"labels.{key}") for name, key in LABEL_ROWS]
    rows = []
    for which, title in (("top_gainers", "rose most"), ("top_losers", "fell most")):
        for i, move in enumerate(data[which]):
            key = f"{which}.{i}"
            css = "plus" if move["change"] > 0 else "minus"
            rows.append(f'<tr><td>{esc(title) if i == 0 else ""}</td><td class="path">{num(data, key + ".label")}</td>'
                        f'<td class="n">{num(data, key + ".old")}</td><td class="n">{num(data, key + ".new")}</td>'
                        f'<td class="n {css}" data-key="{key}.change">{esc(signed(move["change"]))}</td>'
                        f'<td class="n">{num(data, key + ".gained")}</td><td class="n">{num(data, key + ".lost")}</td>'
                        "</tr>")
    table = ("<table><tr><th></th><th>label</th><th class=\"n\">OLD</th><th class=\"n\">NEW</th>"
             "<th class=\"n\">change</th><th class=\"n\">gained</th><th class=\"n\">lost</th></tr>"
             + "".join(rows) + "</table>") if rows else "<p>No label's product count changed.</p>"
    return (f"<h2>Labels</h2>{_cards(data, items)}"
            f"<h3>Top movers: products with the label, OLD and NEW (at most {esc(display(data['top']))} each way; "
            "gained / lost: products in both files)</h3>"
            f"{_legend()}{_frequency_plot(data)}{table}")


def _legend() -> str:
    return (f'<p class="legend"><span style="background:{OLD_COLOUR}"></span>OLD'
            f'<span style="background:{NEW_COLOUR}"></span>NEW</p>')


def _frequency_plot(data: dict) -> str:
    """Horizontal bar pairs (OLD, NEW product counts) for each top mover."""
    moves = [(f"top_gainers.{i}", m) for i, m in enumerate(data["top_gainers"])]
    moves += [(f"top_losers.{i}", m) for i, m in enumerate(data["top_losers"])]
    if not moves:
        return ""
    width, label_w, row_h, bar_h, value_w = 1000, 300, 30, 11, 70
    plot_w = width - label_w - value_w
    top = max(max(m["old"], m["new"]) for _, m in moves) or 1
    height = row_h * len(moves) + 10
    out = [svg_open(width, height, "label frequency before and after", "frequency")]
    for row, (key, move) in enumerate(moves):
        y = 5 + row * row_h
        label = shown(move["label"])
        cut = label if len(label) <= LABEL_CHARS else label[:LABEL_CHARS - 1] + "\u2026"
        out.append(f'<text x="{label_w - 8}" y="{y + bar_h + 4}" text-anchor="end"><title>{esc(label)}</title>'
                   f"{esc(cut)}</text>")
        for side, colour, dy in (("old", OLD_COLOUR, 0), ("new", NEW_COLOUR, bar_h + 1)):
            w = plot_w * move[side] / top
            out.append(f'<rect x="{label_w}" y="{y + dy}" width="{w:.1f}" height="{bar_h}" fill="{colour}" '
                       f'data-key="{key}.{side}" data-count="{move[side]}"><title>{side.upper()}: '
                       f"{esc(display(move[side]))}</title></rect>")
            out.append(f'<text x="{label_w + w + 4:.1f}" y="{y + dy + bar_h - 2}">{esc(display(move[side]))}</text>')
    out.append("</svg>")
    return "".join(out)


def _scores(data: dict) -> str:
    header = "".join(f'<th class="n {side}">{kind} {side.upper()}</th>' for kind in ("all", "best")
                     for side in ("old", "new"))
    rows = []
    for stat in STATS:
        cells = []
        for kind in ("all", "top1"):
            for side in ("old", "new"):
                entry = data["scores"][kind][side]
                cells.append(f'<td class="n">{num(data, f"scores.{kind}.{side}.{stat}")}</td>' if entry is not None
                             else '<td class="n">-</td>')
        rows.append(f"<tr><th>{stat}</th>{''.join(cells)}</tr>")
    plots = "".join(f"<h3>{title}</h3>{_histogram(data, kind)}" for kind, title in (
        ("all", "Every score returned"), ("top1", "Each product's best score")))
    return (f"<h2>Scores</h2><table><tr><th></th>{header}</tr>{''.join(rows)}</table>"
            f"{_legend()}{plots}")


def _histogram(data: dict, kind: str) -> str:
    """OLD and NEW bars side by side in each bin (counts), with the bins' edges below."""
    histogram = data["scores"][kind]["histogram"]
    edges, bins = histogram["edges"], len(histogram["edges"]) - 1
    width, height, left, bottom, top_pad = 1000, 240, 60, 30, 12
    plot_w, plot_h = width - left - 10, height - bottom - top_pad
    peak = max(histogram["old"] + histogram["new"] + [0]) or 1
    bin_w = plot_w / bins
    out = [svg_open(width, height, f"{kind} score histogram", "histogram"),
           f'<line x1="{left}" y1="{top_pad + plot_h}" x2="{left + plot_w}" y2="{top_pad + plot_h}" stroke="#7b8794"/>',
           f'<line x1="{left}" y1="{top_pad}" x2="{left}" y2="{top_pad + plot_h}" stroke="#7b8794"/>',
           f'<text x="{left - 6}" y="{top_pad + 4}" text-anchor="end">{esc(display(peak))}</text>',
           f'<text x="{left - 6}" y="{top_pad + plot_h}" text-anchor="end">0</text>']
    for i in range(bins):
        x = left + i * bin_w
        for side, colour, dx in (("old", OLD_COLOUR, 1), ("new", NEW_COLOUR, bin_w / 2)):
            count = histogram[side][i]
            h = plot_h * count / peak
            out.append(f'<rect x="{x + dx:.1f}" y="{top_pad + plot_h - h:.1f}" width="{bin_w / 2 - 1:.1f}" '
                       f'height="{h:.1f}" fill="{colour}" data-key="scores.{kind}.histogram.{side}.{i}" '
                       f'data-count="{count}"><title>{side.upper()} {edges[i]:g}-{edges[i + 1]:g}: '
                       f"{esc(display(count))}</title></rect>")
    for i in range(0, bins + 1, max(1, bins // 10)):
        x = left + i * bin_w
        out.append(f'<text x="{x:.1f}" y="{height - 10}" text-anchor="middle">{edges[i]:g}</text>')
    out.append("</svg>")
    return "".join(out)


def _examples(data: dict) -> str:
    examples = data["examples"]
    parts = ["<h2>Examples</h2>"]
    for name in ("added", "removed"):
        ids = examples[name]
        if ids:
            parts.append(f"<p><strong>{name}</strong> (first {len(ids)} by id): "
                         + ", ".join(f'<code>{esc(x)}</code>' for x in ids) + "</p>")
    if examples["retagged"]:
        rows = "".join(f'<tr><td class="path">{esc(r["id"])}</td><td class="plus">{esc(", ".join(r["gained"]))}</td>'
                       f'<td class="minus">{esc(", ".join(r["lost"]))}</td></tr>' for r in examples["retagged"])
        parts.append(f"<p><strong>re-tagged</strong> (first {len(examples['retagged'])} by id)</p>"
                     f"<table><tr><th>id</th><th>gained</th><th>lost</th></tr>{rows}</table>")
    return "".join(parts) if len(parts) > 1 else ""


def _notes(data: dict) -> str:
    if not data["notes"]:
        return ""
    return "<h2>Notes</h2>" + "".join(f'<p class="note">{esc(note)}</p>' for note in data["notes"])
