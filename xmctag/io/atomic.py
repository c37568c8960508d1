"""Output files a nightly job can trust: one writer at a time, complete or absent, readable by the next job.

``AtomicOutput(path)`` is how every output file xmctag writes (predictions, summaries) reaches its place:

- **Write-through symlinks**: an output path that is a symlink is written at its target (the link stays a link).
- **A lock per output**: ``.NAME.HASH.lock`` beside the target, held with ``flock`` for the whole run. A second
  run on the same output stops at once with ``OutputLocked`` (exit 75); a killed run's lock is released by the
  kernel, so it never blocks the next night. The lock file is removed when the run ends.
- **Temporary file, then rename**: the content goes to ``.NAME.HASH.RANDOM.tmp`` in the same directory; only a
  complete file is renamed onto the target (after ``fsync`` of the file, then of the directory), so the target
  holds the old content or the new, never a part. An error or an interruption deletes the temporary file; one left
  by a run killed with SIGKILL is swept by the next run on that output (under the lock, so never a live run's).
  ``NAME`` is the target's name cut to 100 characters and ``HASH`` 8 hex digits of its full name, so a long name
  stays within the file system's limit.
- **Modes**: the new file gets the mode of the file it replaces, else ``0666`` minus the umask (as ``open`` would
  give), so a downstream job running as another user reads what the umask allows.
- **The machine's failures** (disk full, I/O error, read-only file system) become ``EnvironmentFailure`` (exit 74).

``staged_directory(out)`` does the same for a whole directory (``export`` and ``relabel`` write bundles with it): the
content goes to a temporary sibling ``.NAME.RANDOM``, which replaces ``out`` only once complete (the mode the umask
allows) and is deleted after an error or an interruption.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from xmctag.errors import OutputLocked, UserError, environment_failure

NAME_CHARS = 100


def resolve_output(path: str | Path) -> Path:
    """``path``, or the file it links to when it is a symlink (written through, never replaced by a file)."""
    path = Path(path)
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def _stem(target: Path) -> str:
    digest = hashlib.sha256(target.name.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return f".{target.name[:NAME_CHARS]}.{digest}"


@contextmanager
def staged_directory(out: Path):
    """A new temporary directory beside ``out`` to write into; when the block ends without an error it replaces
    ``out`` (deleted first if it exists: the caller checked that it may be), else it is deleted."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield staging
        os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp made it 0700: what the umask allows
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def default_mode() -> int:
    """``0666`` minus the process umask: the mode ``open`` gives a new file."""
    return 0o666 & ~current_umask()


class OutputLock:
    """``flock`` on ``.NAME.HASH.lock`` beside ``target`` (see the module docstring)."""

    def __init__(self, target: Path, what: str = "--output"):
        self.target, self.what = target, what
        self.path = target.parent / f"{_stem(target)}.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as e:
                raise environment_failure(e, f"{self.what} {self.target}: creating its lock") or UserError(
                    f"{self.what} {self.target}: cannot write in {self.target.parent} ({e.strerror or e})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode(errors="replace").strip()
                os.close(fd)
                raise OutputLocked(f"{self.what} {self.target}: another xmctag run is writing it"
                                   + (f" ({holder})" if holder else "") + "; try again when it has finished") from None
            # The lock file may have been removed by the run that held it just before we locked it: then this lock
            # is on a file nobody else will see; start again on the path's current file.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still held: a waiting run re-checks the inode
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "OutputLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class AtomicOutput:
    """``with AtomicOutput(path) as tmp: write to tmp`` -> the complete file at ``path`` (see the module docstring).

    ``lock=False`` for a file whose caller already holds the output's lock (a summary next to its predictions)."""

    def __init__(self, path: str | Path, what: str = "--output", lock: bool = True):
        self.requested = Path(path)
        self.target = resolve_output(path)
        self.what = what
        self.lock = OutputLock(self.target, what) if lock else None
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        if self.target.is_dir():
            raise UserError(f"{self.what} {self.requested}: is a directory")
        if not self.target.parent.is_dir():
            raise UserError(f"{self.what} {self.requested}: directory {self.target.parent} does not exist")
        if self.target.exists() and not os.access(self.target, os.W_OK):
            raise UserError(f"{self.what} {self.requested}: exists and is read-only")
        if self.lock is not None:
            self.lock.acquire()
        try:
            self._sweep()
            fd, tmp = tempfile.mkstemp(prefix=f"{_stem(self.target)}.", suffix=".tmp", dir=self.target.parent)
        except OSError as e:
            self._release()
            raise environment_failure(e, f"{self.what} {self.requested}") or UserError(
                f"{self.what} {self.requested}: cannot write in {self.target.parent} ({e.strerror or e})") from None
        os.close(fd)
        self.tmp = Path(tmp)
        return self.tmp

    def _sweep(self) -> None:
        """Temporary files of this output left by a killed run (we hold the lock: none is a live run's)."""
        if self.lock is None:
            return
        for stale in self.target.parent.glob(f"{_stem(self.target)}.*.tmp"):
            stale.unlink(missing_ok=True)

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None and self.tmp is not None and self.tmp.exists():
                self.commit()
        finally:
            if self.tmp is not None and self.tmp.exists():
                self.tmp.unlink(missing_ok=True)
            self._release()

    def commit(self) -> None:
        """The complete temporary file onto the target (fsync'd, with its mode); the lock stays held."""
        try:
            mode = self.target.stat().st_mode & 0o7777 if self.target.exists() else default_mode()
            with open(self.tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.chmod(self.tmp, mode)
            os.replace(self.tmp, self.target)
            directory = os.open(self.target.parent, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        except OSError as e:
            raise environment_failure(e, f"{self.what} {self.requested}") or UserError(
                f"{self.what} {self.requested}: cannot replace it ({e.strerror or e})") from None

    def _release(self) -> None:
        if self.lock is not None:
            self.lock.release()


def write_json(path: str | Path, data: dict, what: str = "--summary-json", lock: bool = True) -> None:
    """``data`` as indented JSON, atomically (``AtomicOutput``)."""
    with AtomicOutput(path, what, lock=lock) as tmp:
        try:
            tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
        except OSError as e:
            raise environment_failure(e, f"{what} {path}") or e
