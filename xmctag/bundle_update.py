"""Changing a sealed bundle without ever leaving a broken one (``xmctag calibrate`` adds its thresholds this way).

A bundle is sealed (``xmctag.manifest``): its manifest lists every file's sha256 and its id covers them, so adding
a file or a manifest section makes a new bundle with a new id. ``update_bundle(path, sections, files)`` builds that
new bundle in a temporary sibling directory ``.NAME.RANDOM`` (in the same parent, so on the same file system):

1. the old bundle's files, hard-linked (in place) or copied (``out``, or where a link is refused), except the
   manifest and the files being replaced;
2. the new ``files`` (name -> bytes) written, the manifest's ``sections`` set (None removes one), the manifest
   sealed (``xmctag.manifest.seal``) and read back with every check, then ``check(staged directory)``;
3. swapped in: in place, the staged directory and the bundle are exchanged in one atomic ``renameat2``
   (``RENAME_EXCHANGE``, Linux); where that is unavailable, the bundle is renamed aside, the staged one renamed into
   its place, and the old one renamed back if that fails. The old bundle is then deleted. With ``out`` (a directory
   that does not exist or is empty) the staged directory is renamed to it and the source is left alone.

Any failure before the swap (an error, Ctrl-C, SIGTERM) deletes the staged directory and leaves the bundle as it
was, byte for byte; the swap itself is a rename. The whole update holds the bundle's output lock
(``xmctag.io.atomic.OutputLock``, a ``.NAME.HASH.lock`` beside it): a second update of the same bundle at the same
time stops at once (exit 75). A process that already loaded the old bundle keeps reading its (unchanged) files.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

from xmctag.errors import UserError, environment_failure
from xmctag.io.atomic import OutputLock, current_umask
from xmctag.manifest import read_manifest, seal

AT_FDCWD = -100
RENAME_EXCHANGE = 2


def update_bundle(bundle: str | Path, sections: dict[str, dict | None], files: dict[str, bytes],
                  out: str | Path | None = None, check: Callable[[Path], None] | None = None,
                  what: str = "bundle", expected_id: str | None = None) -> dict:
    """The bundle at ``bundle`` (or a copy at ``out``) with ``files`` added or replaced and the manifest's
    ``sections`` set (see the module docstring); returns the new manifest. ``what`` names the command in messages;
    ``expected_id``: the bundle id the caller's work was based on (a bundle that changed since is an error)."""
    source = Path(os.path.realpath(bundle))  # a symlinked bundle is updated where it lies; the link stays
    target = Path(os.path.realpath(out)) if out is not None else source
    if out is not None:
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise UserError(f"--out {out}: exists and is not an empty directory")
        if not target.parent.is_dir():
            raise UserError(f"--out {out}: directory {target.parent} does not exist")
    with OutputLock(target, what):
        manifest = read_manifest(source)  # checked again under the lock: what is copied is what was sealed
        if expected_id is not None and manifest["bundle_id"] != expected_id:
            raise UserError(f"{what} {bundle}: the bundle changed while {what} ran (id {expected_id} -> "
                            f"{manifest['bundle_id']}: another calibrate or export?); run it again")
        try:
            staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        except OSError as e:
            raise environment_failure(e, f"{what} {target}") or UserError(
                f"{what} {bundle}: cannot write in {target.parent} ({e.strerror or e})") from None
        try:
            _fill(staging, source, manifest, files, link=out is None)
            for name, value in sections.items():
                if value is None:
                    manifest.pop(name, None)
                else:
                    manifest[name] = value
            sealed = seal(staging, manifest)
            read_manifest(staging, verify_hashes=False)  # seal just hashed every file
            if check is not None:
                check(staging)
            mode = stat.S_IMODE(source.stat().st_mode) if out is None else 0o777 & ~current_umask()
            os.chmod(staging, mode)  # mkdtemp made it 0700
            if out is None:
                _swap(staging, source)  # staging now holds the old bundle
            elif target.exists():
                target.rmdir()  # empty (checked above)
                staging.rename(target)
            else:
                staging.rename(target)
            _fsync_directory(target.parent)
        except OSError as e:
            raise environment_failure(e, f"{what} {bundle}") or UserError(
                f"{what} {bundle}: cannot write the new bundle ({e.strerror or e})") from None
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    return sealed


def _fill(staging: Path, source: Path, manifest: dict, files: dict[str, bytes], link: bool) -> None:
    """The old bundle's listed files (links or copies), less the manifest and those in ``files``; then ``files``."""
    for name in manifest["files"]:
        if name in files:
            continue
        target = staging / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if link:
            try:
                os.link(source / name, target)
                continue
            except OSError:  # a file system without hard links, or across devices: copy instead
                pass
        shutil.copy2(source / name, target)
    for name, data in files.items():
        (staging / name).parent.mkdir(parents=True, exist_ok=True)
        (staging / name).write_bytes(data)


def _swap(staging: Path, bundle: Path) -> None:
    """``bundle`` becomes what ``staging`` held and ``staging`` what ``bundle`` held."""
    if _exchange(staging, bundle):
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{bundle.name}.old.", dir=bundle.parent))
    aside.rmdir()  # a free name in the same directory
    os.rename(bundle, aside)
    try:
        os.rename(staging, bundle)
    except BaseException:
        os.rename(aside, bundle)
        raise
    os.rename(aside, staging)


def _exchange(a: Path, b: Path) -> bool:
    """Exchanges ``a`` and ``b`` atomically (``renameat2(RENAME_EXCHANGE)``); False where the system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not glibc >= 2.28 (or not Linux)
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):  # kernel or file system without it
        return False
    raise OSError(code, os.strerror(code), str(b))


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
