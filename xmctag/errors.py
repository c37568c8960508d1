"""Errors a user can fix, and the exit code each gives on the command line.

The CLI prints any ``UserError`` as one line and exits with its ``exit_code``, never with a traceback:

- ``UserError`` (2): bad input, a missing file or column, a model that does not match, a wrong option;
- ``ThresholdError`` (3): the run did its work but failed a check of its result (nothing tagged, too many rows
  skipped, too many images failed): no output is written, a nightly job should alert;
- ``EnvironmentFailure`` (74, ``EX_IOERR``): the machine failed the run (disk full, I/O error, a file system that
  refuses writes): no output is written, rerunning after fixing the machine gives the complete result;
- ``OutputLocked`` (75, ``EX_TEMPFAIL``): another run is writing the same output; try again later.

Interrupted runs exit 130 (SIGINT, Ctrl-C) or 143 (SIGTERM): ``Terminated`` is raised for SIGTERM by the CLI, as
``KeyboardInterrupt`` is for SIGINT, so the same cleanup runs. Anything else is a bug (exit 1, with its traceback).
"""

import errno

ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG, errno.ENOMEM}


class UserError(Exception):
    """Bad input, a missing file or column, a model that does not match: something the user can fix."""

    exit_code = 2


class ThresholdError(UserError):
    """The run finished its work, but its result failed a check (``--max-skipped-share``, nothing tagged, ...)."""

    exit_code = 3


class EnvironmentFailure(UserError):
    """The machine failed the run: a full disk, an I/O error, a read-only file system."""

    exit_code = 74


class OutputLocked(UserError):
    """Another run is writing the same output."""

    exit_code = 75


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised by the CLI's handler so that a terminated run cleans up as an interrupted one does."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name if the message is empty): the part of a library's
    error worth putting in a one-line ``UserError``."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def environment_failure(e: OSError, doing: str) -> EnvironmentFailure | None:
    """An ``EnvironmentFailure`` for an ``OSError`` the machine caused (disk full, I/O error, ...), else None.
    ``doing``: what failed, e.g. "writing /out/preds.parquet"."""
    if e.errno not in ENVIRONMENT_ERRNOS:
        return None
    return EnvironmentFailure(f"{doing}: {e.strerror or first_line(e)} (errno {errno.errorcode.get(e.errno, e.errno)})"
                              "; nothing was written")


class UnreadableFile(UserError):
    """A file that is there but that a library could not read (damaged, truncated, not what it should be).

    ``path``: the file; ``reason``: the library's message (one line). For callers that word the error in their own
    terms (a bundle says which of its files it was and that it should be re-exported)."""

    def __init__(self, message: str, path, reason: str):
        super().__init__(message)
        self.path, self.reason = path, reason
