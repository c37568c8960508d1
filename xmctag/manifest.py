"""A bundle's ``manifest.json``: what it must hold, how its bundle id is made, and the checks that come with it.

Bundles come from other machines and teams, so nothing in one is trusted until ``read_manifest`` has checked it:

- its keys and their types (``SCHEMA``): what tagging reads is there and has the right type;
- every path it names (``files`` keys, ``tokenization.tokenizer``, ``graph.files``, the fusion section's vision
  files, ``calibration.file``) is relative, normalised (no ``..``, ``.``, ``//``, backslash) and stays inside the
  bundle once symlinks are resolved, and is listed in ``files``;
- its ``bundle_id`` is ``bundle_id_of(manifest)``, so an edited manifest (a scoring scale, a kNN weight, a
  tokenisation length, a file dropped from ``files``) is refused: the id names what the results depend on;
- every file in the bundle directory, recursively, is listed in ``files`` (nothing unlisted rides along), no
  symlink in it points outside it, and every listed file is there and, unless ``verify_hashes=False``, matches its
  sha256. Without hash verification the other checks still run: they only read the manifest and list the directory.

``seal(directory, manifest)`` is the other side: hashes every file, sets ``files`` and ``bundle_id``, writes the
manifest (``xmctag.exporter``). A bundle id is a checksum, not a signature: whoever can write a whole bundle can seal
it; what these checks guarantee is that a bundle says truthfully what it holds and that none of its files is read
from outside it. The one path a manifest names outside the bundle is ``fusion.cache_dir``, the training run's
image-embedding cache that tagging a fused bundle uses by default (``xmctag.vision.tagging.resolve_cache_dir``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
from pathlib import Path, PurePosixPath

from xmctag import run_dir
from xmctag.errors import UserError
from xmctag.io.hashing import file_sha256

FORMAT = "xmctag-bundle/2"
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 16 << 20  # a real one is a few KiB
# Never read by tagging or evaluation: provenance and export diagnostics, not inputs of any result. Left out of the
# bundle id so that it is a function of what results depend on (two exports of a run, identical files, share an id).
VOLATILE_KEYS = ("bundle_id", "created", "source_run", "versions", "parity_max_abs")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def bundle_id_of(manifest: dict) -> str:
    """The bundle id: the first 16 hex digits of the sha256 of the canonical JSON (sorted keys, no whitespace, ASCII)
    of the manifest without ``VOLATILE_KEYS``. That covers ``files`` (every file's sha256) and every section that
    affects results or loading: ``format``, ``dims``, ``graph``, ``tokenization``, ``scoring``, ``fusion``,
    ``training``, ``index`` (each search's kind, nprobe, measured recall: ``xmctag.backend.index``), ``lexical``,
    ``calibration`` (``xmctag.calibration``), ``relabel`` (``xmctag.relabeller``), and any key a later xmctag adds."""
    covered = {key: value for key, value in manifest.items() if key not in VOLATILE_KEYS}
    canonical = json.dumps(covered, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def seal(directory: Path, manifest: dict) -> dict:
    """Sets ``manifest``'s ``files`` (the sha256 of every file under ``directory`` but the manifest) and
    ``bundle_id``, writes it as ``directory/manifest.json`` and returns it (``format`` and ``bundle_id`` first)."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.relative_to(directory).as_posix() != MANIFEST)
    manifest = {key: value for key, value in manifest.items() if key not in ("files", "bundle_id")}
    manifest["files"] = {p.relative_to(directory).as_posix(): file_sha256(p) for p in files}
    sealed = {"format": manifest.get("format"), "bundle_id": bundle_id_of(manifest), **manifest}
    (directory / MANIFEST).write_text(json.dumps(sealed, indent=2) + "\n")
    return sealed


# -- what a manifest holds ------------------------------------------------------------------------------------------
def _int(minimum: int):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= minimum


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _names(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _files(v) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and isinstance(d, str) and _SHA256.fullmatch(d)
                                       for k, d in v.items())


def _is(kind):
    return lambda v: isinstance(v, kind) and not isinstance(v, bool)


# (key path, check, required): a section's keys are checked only when the section is there.
SCHEMA = [
    ("bundle_id", _is(str), True), ("files", _files, True),
    ("dims", _is(dict), True), ("dims.embedding", _int(1), True), ("dims.index", _int(2), True),
    ("dims.labels", _int(1), True), ("dims.neighbours", _int(0), False),
    ("graph", _is(dict), True), ("graph.files", _names, True),
    ("tokenization", _is(dict), True), ("tokenization.tokenizer", _is(str), True),
    ("tokenization.max_length", _int(1), True), ("tokenization.pad_id", _int(0), True),
    ("tokenization.prompt", _is(dict), False),
    ("scoring", _is(dict), True), ("scoring.scale", _number, True), ("scoring.knn_neighbours", _int(0), False),
    ("scoring.knn_temperature", _number, False), ("scoring.knn_weight", lambda v: _number(v) and 0 <= v <= 1, False),
    ("training", _is(dict), False), ("training.rows", _int(0), False),
    ("index", _is(dict), False),  # each search's entry is checked by Bundle.check_index_section (backend.index)
    ("fusion", _is(dict), False), ("fusion.vision", _is(str), True), ("fusion.model_id", _is(str), True),
    ("fusion.vision_dim", _int(1), True), ("fusion.image_col", _is(str), True), ("fusion.max_images", _int(1), True),
    ("fusion.cache_dir", lambda v: v is None or isinstance(v, str), False),
    ("fusion.vision_graph", _is(dict), True), ("fusion.vision_graph.files", _names, True),
    ("fusion.vision_graph.meta", _is(str), True),
    ("lexical", _is(dict), False), ("lexical.folder", _is(str), True),
    ("lexical.bands", lambda v: isinstance(v, list) and all(_int(0)(b) for b in v), True),
    ("lexical.weights", lambda v: isinstance(v, list) and all(_number(w) and 0 <= w <= 1 for w in v), True),
    ("lexical.candidates", _int(1), True), ("lexical.beam", _int(1), True),
    ("calibration", _is(dict), False), ("calibration.file", _is(str), True),
    ("calibration.target_precision", lambda v: _number(v) and 0 < v < 1, True),
    # xmctag relabel: the bundle's label table changed after training (xmctag.relabeller)
    ("relabel", _is(dict), False), ("relabel.source_bundle_id", _is(str), True), ("relabel.kept", _int(0), True),
    ("relabel.added", _int(0), True), ("relabel.retired", _int(0), True), ("relabel.text_changed", _int(0), True),
]


def named_paths(manifest: dict) -> list[tuple[str, str]]:
    """``(key, path)`` for every path inside the bundle that the manifest names besides the ``files`` keys."""
    named = [("tokenization.tokenizer", manifest["tokenization"]["tokenizer"])]
    named += [("graph.files", name) for name in manifest["graph"]["files"]]
    vision = manifest.get("fusion", {}).get("vision_graph")
    if vision is not None:
        named += [("fusion.vision_graph.files", name) for name in vision["files"]]
        named.append(("fusion.vision_graph.meta", vision["meta"]))
    lexical = manifest.get("lexical")
    if lexical is not None:
        named += [("lexical.folder", f"{lexical['folder']}/{name}") for name in ("lexical.json", "features.json")]
    calibration = manifest.get("calibration")
    if calibration is not None:
        named.append(("calibration.file", calibration["file"]))
    return named


# -- reading ----------------------------------------------------------------------------------------------------------
def read_manifest(bundle: Path, verify_hashes: bool = True) -> dict:
    """The manifest of the bundle directory ``bundle``, after every check in the module docstring; a one-line
    ``UserError`` naming what is wrong otherwise."""
    path = bundle / MANIFEST
    root = bundle.resolve()
    if not path.is_file():
        if (bundle / run_dir.CONFIG).exists() and (bundle / run_dir.MODEL).exists():
            raise UserError(f"{bundle}: this is a training run, not a bundle; run `xmctag export {bundle} --out DIR`")
        raise UserError(f"{bundle}: not an xmctag bundle (no {MANIFEST})")
    if not _inside(path, root):
        raise UserError(f"{path}: a symlink to a place outside the bundle (re-export the bundle)")
    manifest = _load(path)
    if "format" not in manifest:
        raise UserError(f"{path}: missing key 'format' (re-export the bundle)")
    if manifest["format"] != FORMAT:
        if manifest["format"] == "xmctag-bundle/1":
            raise UserError(f"{bundle}: bundle format 'xmctag-bundle/1', whose id does not cover its manifest; this "
                            f"xmctag reads {FORMAT!r} only: re-export the bundle")
        raise UserError(f"{bundle}: bundle format {manifest['format']!r}, this xmctag reads {FORMAT!r}")
    check_schema(path, manifest)
    files = manifest["files"]
    for name in files:
        _check_path(bundle, root, "files", name)
    for key, name in named_paths(manifest):
        _check_path(bundle, root, key, name)
        if name not in files:
            raise UserError(f"{path}: {key} names {name!r}, which is not in the manifest's files (re-export the "
                            "bundle)")
    if bundle_id_of(manifest) != manifest["bundle_id"]:
        raise UserError(f"{path}: the manifest was modified after export (its bundle id {manifest['bundle_id']} "
                        "does not match its contents); re-export the bundle")
    _check_directory(bundle, root, files)
    for name, digest in files.items():
        if not (bundle / name).is_file():
            raise UserError(f"{bundle}: bundle is incomplete, {name} is missing")
        if verify_hashes and file_sha256(bundle / name) != digest:
            raise UserError(f"{bundle}: {name} does not match the manifest (modified or corrupt bundle)")
    return manifest


def _load(path: Path) -> dict:
    """The manifest's JSON object: no duplicate keys (two readers could see two manifests), no NaN or Infinity."""
    def no_duplicates(pairs):
        keys = [key for key, _ in pairs]
        if len(set(keys)) != len(keys):
            raise ValueError(f"duplicate key {next(k for k in keys if keys.count(k) > 1)!r}")
        return dict(pairs)

    def no_constant(name):
        raise ValueError(f"{name} is not a number JSON allows")

    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise UserError(f"{path}: larger than {MAX_MANIFEST_BYTES >> 20} MiB, not a manifest (re-export the "
                            "bundle)")
        manifest = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=no_duplicates,
                              parse_constant=no_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise UserError(f"{path}: not valid JSON ({e}) (re-export the bundle)") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    if not isinstance(manifest, dict):
        raise UserError(f"{path}: not a JSON object (re-export the bundle)")
    return manifest


def check_schema(path: Path, manifest: dict) -> None:
    """A ``UserError`` naming the first key of ``SCHEMA`` that the manifest lacks or has with the wrong type."""
    for key, check, required in SCHEMA:
        *parents, last = key.split(".")
        section = manifest
        for i, parent in enumerate(parents):
            section = section.get(parent)
            if section is None:
                break
        if section is None:  # an optional section that is not there: nothing in it to check
            continue
        if last not in section:
            if required:
                raise UserError(f"{path}: missing key {key!r} (re-export the bundle)")
            continue
        if not check(section[last]):
            raise UserError(f"{path}: invalid key {key!r} (re-export the bundle)")
    dims = manifest["dims"]
    if dims["index"] != dims["embedding"] + 1:
        raise UserError(f"{path}: invalid key 'dims.index' (not dims.embedding + 1) (re-export the bundle)")


def _inside(path: Path, root: Path) -> bool:
    """Whether ``path``, symlinks resolved, is ``root`` (resolved) or under it; False for a symlink loop."""
    try:
        path = path.resolve()
    except (OSError, RuntimeError):
        return False
    return path == root or root in path.parents


def _check_path(bundle: Path, root: Path, key: str, name: str) -> None:
    """``name`` (from the manifest's ``key``) is a relative, normalised POSIX path that stays inside the bundle."""
    pure = PurePosixPath(name)
    if (not name or "\\" in name or not name.isprintable() or pure.is_absolute() or ".." in pure.parts
            or pure.as_posix() != name or name == "." or name == MANIFEST):
        raise UserError(f"{bundle / MANIFEST}: {key} names {name!r}, which is not a relative path inside the bundle "
                        "(re-export the bundle)")
    if not _inside(bundle / name, root):
        raise UserError(f"{bundle}: {name} leads outside the bundle through a symlink (re-export the bundle)")


def _check_directory(bundle: Path, root: Path, files: dict) -> None:
    """Every file under ``bundle`` is listed in ``files``; no symlink points outside; nothing but files and folders."""
    def unreadable(e: OSError) -> None:
        raise UserError(f"{bundle}: cannot list {e.filename} ({e.strerror or e})")

    for directory, folders, names in os.walk(bundle, onerror=unreadable):
        for name in folders + names:
            entry = Path(directory) / name
            relative = entry.relative_to(bundle).as_posix()
            relative = relative if relative.isprintable() else repr(relative)  # a message stays one line
            if entry.is_symlink():
                if not _inside(entry, root):
                    raise UserError(f"{bundle}: {relative} is a symlink to {os.readlink(entry)!r}, outside the bundle "
                                    "(re-export the bundle)")
                if entry.is_dir():  # not walked into: what it holds is reached (and checked) by its own path
                    continue
            elif name in folders:
                continue
            elif not stat.S_ISREG(entry.lstat().st_mode):
                raise UserError(f"{bundle}: {relative} is not a regular file (re-export the bundle)")
            if relative != MANIFEST and relative not in files:
                raise UserError(f"{bundle}: {relative} is not in the manifest's files (an unlisted file in the "
                                "bundle; re-export it, or remove the file)")
