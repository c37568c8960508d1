"""What ``--overwrite`` may replace: ``train``, ``export`` and ``relabel`` delete their ``--out`` directory before
writing it anew.

Pointed by mistake at a folder of catalogs or at a home directory, that would delete the user's files. So a
directory is replaced only when it is empty or holds nothing but what the command itself writes (a run directory:
``run_dir.is_run_dir``; a bundle: ``bundle.is_bundle``), and never when one of the command's inputs lies in it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from xmctag.errors import UserError


def check_new_output_dir(out: Path, overwrite: bool, holds_only_output: Callable[[Path], bool], what: str,
                         inputs: dict[str, str | Path | None]) -> None:
    """``--out`` of a command that writes a whole directory anew (``export``, ``relabel``): absent or empty, or, with
    ``overwrite``, one ``check_replaceable`` allows."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"--out {out}: directory is not empty (use --overwrite to replace it)")
        check_replaceable(out, holds_only_output, what, inputs)


def check_replaceable(out: Path, holds_only_output: Callable[[Path], bool], what: str,
                      inputs: dict[str, str | Path | None]) -> None:
    """Raises ``UserError`` unless the directory ``out`` may be deleted and written again.

    ``holds_only_output(out)``: whether ``out`` holds only what the command writes, called ``what`` in the message
    ("an xmctag run directory"); ``inputs``: the paths the command reads, by their name in the message
    (``{"--train": path}``; None: not given).
    """
    if not out.is_dir():
        return
    inside = [f"{name} {path}" for name, path in inputs.items() if path is not None and _within(Path(path), out)]
    if inside:
        raise UserError(f"--out {out}: holds {' and '.join(inside)}; refusing to replace it")
    if any(out.iterdir()) and not holds_only_output(out):
        raise UserError(f"--out {out}: not {what} (it holds other files); refusing to replace it")


def _within(path: Path, directory: Path) -> bool:
    """Whether ``path`` is ``directory`` or lies inside it (links resolved)."""
    path, directory = path.resolve(), directory.resolve()
    return path == directory or directory in path.parents
