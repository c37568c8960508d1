"""``xmctag diff``'s report on the terminal: rich tables rendered from ``DiffReport.to_dict()`` (the same dict as
``--json`` and the HTML page; values shown by ``xmctag.reports.values``). Text from the files (paths, ids, labels) is
printed as data, never as rich markup or terminal control sequences."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from xmctag.reports.values import LABEL_ROWS, PRODUCT_ROWS, STATS, display, lookup, shown, signed

SPARK = " ▁▂▃▄▅▆▇█"


def print_report(data: dict, console: Console) -> None:
    def text(value) -> str:
        return escape(display(value))

    for side in ("old", "new"):
        info = data[side]
        console.print(f"{side.upper()}: {escape(shown(info['path']))} ({info['format']}, {text(info['products'])} "
                      f"products; bundle {text(info['bundle_id'])}, tagged at {text(info['tagged_at'])})",
                      highlight=False, soft_wrap=True)
    changed = {None: "unknown (not recorded)", True: "changed", False: "the same"}[data["bundle_changed"]]
    console.print(f"bundle: {changed}", highlight=False)

    counts = Table()
    counts.add_column("")
    counts.add_column("count", justify="right")
    for name, key in PRODUCT_ROWS:
        counts.add_row(name, text(lookup(data, f"products.{key}")))
    labels = Table()
    labels.add_column("")
    labels.add_column("count", justify="right")
    for name, key in LABEL_ROWS:
        labels.add_row(name, text(lookup(data, f"labels.{key}")))
    titled(console, "products", counts)
    titled(console, "labels", labels)

    movers = Table()
    for column in ("label", "OLD", "NEW", "change", "gained", "lost"):
        movers.add_column(column, justify="left" if column == "label" else "right")
    for which in ("top_gainers", "top_losers"):
        for move in data[which]:
            movers.add_row(escape(shown(move["label"])), text(move["old"]), text(move["new"]),
                           escape(signed(move["change"])), text(move["gained"]), text(move["lost"]))
        if which == "top_gainers" and data["top_gainers"] and data["top_losers"]:
            movers.add_section()
    if data["top_gainers"] or data["top_losers"]:
        titled(console, f"top movers: products with the label (at most {data['top']} each way)", movers)

    scores = Table()
    scores.add_column("")
    for kind in ("all", "top1"):
        for column in ("OLD", "NEW", "change"):
            scores.add_column(f"{kind} {column}", justify="right")
    for stat in STATS:
        cells = []
        for kind in ("all", "top1"):
            old, new = data["scores"][kind]["old"], data["scores"][kind]["new"]
            before, after = (old or {}).get(stat), (new or {}).get(stat)
            change = after - before if before is not None and after is not None else None
            cells += [text(before), text(after), escape(signed(change))]
        scores.add_row(stat, *cells)
    titled(console, "scores: all returned (all) and each product's best (top1)", scores)
    for kind, name in (("all", "all scores"), ("top1", "best scores")):
        histogram = data["scores"][kind]["histogram"]
        edges = histogram["edges"]
        console.print(f"{name}, {edges[0]:g} to {edges[-1]:g} in {len(edges) - 1} bins: OLD |"
                      f"{sparkline(histogram['old'])}|  NEW |{sparkline(histogram['new'])}|", highlight=False,
                      soft_wrap=True)

    examples = data["examples"]
    for name in ("added", "removed"):
        if examples[name]:
            console.print(f"{name} (first {len(examples[name])} by id): "
                          + ", ".join(escape(shown(x)) for x in examples[name]), highlight=False, soft_wrap=True)
    if examples["retagged"]:
        retagged = Table()
        for column in ("id", "gained", "lost"):
            retagged.add_column(column)
        for row in examples["retagged"]:
            retagged.add_row(escape(shown(row["id"])), escape(", ".join(shown(x) for x in row["gained"])),
                             escape(", ".join(shown(x) for x in row["lost"])))
        titled(console, f"re-tagged (first {len(examples['retagged'])} by id)", retagged)
    for note in data["notes"]:
        console.print(f"note: {escape(shown(note))}", highlight=False, soft_wrap=True)


def titled(console: Console, title: str, table: Table) -> None:
    # A line of its own: a table title would wrap to the table's width.
    console.print(title, highlight=False, soft_wrap=True)
    console.print(table)


def sparkline(counts: list[int]) -> str:
    """One character per bin, its height proportional to the count (a space for an empty bin)."""
    top = max(counts, default=0)
    if top == 0:
        return SPARK[0] * len(counts)
    return "".join(SPARK[0] if c == 0 else SPARK[max(1, round(c / top * (len(SPARK) - 1)))] for c in counts)
