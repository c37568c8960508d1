"""What the ``xmctag`` commands share: the ``UserError`` decorator, option parsing and shared options (Annif's
``cli_util``), and how results are printed (metric tables, example predictions, warnings as one line)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from xmctag.errors import Terminated, UserError, environment_failure

out_console = Console()
err_console = Console(stderr=True)


def user_errors(command):
    """Decorator: a ``UserError`` becomes a one-line message and its exit code (2 user error, 3 failed check, 74
    environment, 75 output locked: ``xmctag.errors``), never a traceback; so does an ``OSError`` the machine caused
    (disk full, I/O error: 74). Interrupted: 130 (SIGINT), 143 (SIGTERM, see ``main``)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except UserError as e:
            fail(str(e), e.exit_code)
        except OSError as e:
            failure = environment_failure(e, "xmctag")
            if failure is None:
                raise
            fail(str(failure), failure.exit_code)
        except Terminated:
            err_console.print("[bold red]terminated[/]")
            raise typer.Exit(code=143) from None
        except KeyboardInterrupt:
            err_console.print("[bold red]interrupted[/]")
            raise typer.Exit(code=130) from None

    return wrapper


def fail(message: str, code: int):
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=code) from None


def terminate_on_sigterm() -> None:
    """SIGTERM raises ``Terminated`` in the main thread, so a killed run cleans up (temporary output, lock) as an
    interrupted one does, and exits 143."""
    import signal

    def handler(signum, frame):
        raise Terminated()

    signal.signal(signal.SIGTERM, handler)


def parse_epochs(value: str | None, option: str) -> int | str | None:
    if value is None or value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise UserError(f"{option} {value!r}: expected an integer or auto") from None


def split_list(value: Optional[str]) -> Optional[list[str]]:
    return [x.strip() for x in value.split(",") if x.strip()] if value else None


def label_columns(value: Optional[str]) -> dict:
    """``--label-cols ID,TEXT[,SYNONYMS...]`` as Config fields ({} when not given)."""
    columns = split_list(value)
    if columns is None:
        return {}
    if len(columns) < 2:
        raise UserError(f"--label-cols {value}: give at least the id and the text column, e.g. label,text")
    return dict(label_id_col=columns[0], label_text_col=columns[1], label_extra_cols=columns[2:])


# Shared options ----------------------------------------------------------------------------------------------------
QuietOption = typer.Option(False, "--quiet", "-q", help="No progress bars or log lines.")
DeviceOption = typer.Option("auto", "--device", help="auto, cpu or cuda.")
ImageColOption = typer.Option(None, "--image-col", help="Image column: bytes, relative paths, file:// or http(s) "
                              "URLs, or lists of them [default: image].")
WorkersOption = typer.Option(16, "--workers", min=1, help="Threads that read, fetch and decode images.")
SummaryJsonOption = typer.Option(None, "--summary-json", help="Write a JSON summary of the run here, however it "
                                 "ends (status, exit code, counts, timings, versions).")
ImageHostsOption = typer.Option(None, "--image-hosts", metavar="HOST_OR_CIDR,...", help="Hosts, addresses and "
                                "networks that image URLs may reach although they are not public (loopback, "
                                "private, link-local), comma-separated, e.g. images.corp.example,.cdn.corp,"
                                "10.20.0.0/16 [default: public addresses only].")


def image_hosts(value: Optional[str]) -> tuple[str, ...]:
    """``--image-hosts`` as a tuple, checked now (a bad entry is a ``UserError`` before any work)."""
    from xmctag.vision.netguard import HostPolicy

    hosts = tuple(split_list(value) or ())
    HostPolicy(hosts)
    return hosts


def newest_bundle(directory: Path) -> Path:
    """The most recently exported bundle under ``directory`` (the default of ``tag --model``)."""
    from xmctag.bundle import MANIFEST

    manifests = sorted(directory.glob(f"*/{MANIFEST}"), key=lambda p: p.stat().st_mtime) if directory.is_dir() else []
    if not manifests:
        raise UserError(f"no --model given and no bundle in ./{directory}; run `xmctag export` or pass --model DIR")
    chosen = manifests[-1].parent
    err_console.print(f"using model bundle {chosen}", highlight=False)
    return chosen


def print_metrics(metrics: dict[str, float], title: str | None) -> None:
    ks = sorted({int(name.split("@")[1]) for name in metrics})
    families = [f for f in ("P", "nDCG", "PSP", "R") if any(m.startswith(f + "@") for m in metrics)]
    if title:  # a line of its own: as a table title, a long path wraps to the table's narrow width
        out_console.print(title, highlight=False, soft_wrap=True)
    table = Table()
    table.add_column("metric")
    for k in ks:
        table.add_column(f"@{k}", justify="right")
    for family in families:
        table.add_row(family, *[f"{100 * metrics[f'{family}@{k}']:.2f}" if f"{family}@{k}" in metrics else ""
                                for k in ks])
    out_console.print(table)


def print_examples(tagger, catalog: Path, output: Path, n: int, top_k: int) -> None:
    import polars as pl

    from xmctag.io.datasets import product_text_expr
    from xmctag.io.predictions import read_predictions

    # The k-th product of an id in the output is the k-th tagged catalog row with that id (ids can repeat).
    nth = pl.int_range(pl.len()).over("id").alias("nth")
    preds = read_predictions(output, one_per_id=False).head(n).with_columns(nth)
    texts = (pl.scan_parquet(catalog).select(pl.col(tagger.config.id_col).cast(pl.String).alias("id"),
                                             product_text_expr(tagger.config.text_cols).alias("text"))
             .filter(pl.col("id").str.strip_chars().str.len_chars() > 0, pl.col("text").is_not_null())  # tagged
             .join(preds.lazy().select("id").unique(), on="id", how="semi", maintain_order="left")
             .with_columns(nth).collect())
    text_of = {(row_id, k): text for row_id, text, k in texts.iter_rows()}
    label_text = dict(zip(tagger.label_ids.tolist(), tagger.label_texts.tolist()))
    table = Table(title=f"top-{top_k} labels of {len(preds)} products")
    table.add_column("id")
    table.add_column("text", max_width=50)
    table.add_column("labels")
    for row_id, labels, k in preds.iter_rows():
        # Catalog and label texts are data, not rich markup: "[/x]" would raise, "[bold]" would format.
        table.add_row(escape(printable(row_id)), escape(printable(text_of.get((row_id, k)) or "")),
                      escape("\n".join(printable(str(label_text.get(x, x))) for x in labels)))
    out_console.print(table)


def printable(text: str) -> str:
    """``text`` with control characters (terminal escape sequences among them) shown as escapes, not sent to the
    terminal: catalog text is data."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    # Warnings (a fallback taken, an option with nothing to do) are for the user: one yellow line, no source line.
    warn(str(message))


def warn(message: str) -> None:
    err_console.print(f"[bold yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)


