"""Bundles are untrusted input: the bundle id covers the manifest, every file is listed and inside the bundle, and a
damaged file is a one-line error naming it (``xmctag.manifest``, ``xmctag.bundle.Bundle``).

Each test tampers with a ``copy_of`` the session's exported bundle. "Resealed" means the way an attacker (or a
careless script) would cover the tracks: file hashes and bundle id recomputed with the current rule. Last,
Tagger.load's clear errors for a missing or broken bundle."""

import json
import os
import shutil

import pytest
from typer.testing import CliRunner

from xmctag import Tagger, UserError, run_dir
from xmctag import bundle as layout
from xmctag import manifest as manifest_file
from xmctag.bundle import Bundle
from xmctag.cli import app


def test_bundle_problems_are_clear_errors(trained_run, bundle, copy_of, tmp_path):
    with pytest.raises(UserError, match="training run, not a bundle"):
        Tagger.load(trained_run)
    with pytest.raises(UserError, match="no such bundle"):
        Tagger.load(tmp_path / "nothing")
    broken = copy_of(bundle)
    (broken / "label_vectors.npy").unlink()
    with pytest.raises(UserError, match="label_vectors.npy is missing"):
        Tagger.load(broken)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["dims"]["labels"] == len(Tagger.load(bundle, verify=False).label_ids)


def test_a_broken_manifest_is_a_clear_error(bundle, copy_of):
    broken = copy_of(bundle)
    manifest_path = broken / "manifest.json"
    good = json.loads(manifest_path.read_text())
    cases = [
        ({k: v for k, v in good.items() if k != "files"}, "missing key 'files'"),
        ({k: v for k, v in good.items() if k != "tokenization"}, "missing key 'tokenization'"),
        ({**good, "dims": {"embedding": 32}}, "missing key 'dims.index'"),
        ({**good, "files": ["encoder.onnx"]}, "invalid key 'files'"),
        ({k: v for k, v in good.items() if k != "format"}, "missing key 'format'"),
        (["not", "an", "object"], "not a JSON object"),
    ]
    for manifest, message in cases:
        manifest_path.write_text(json.dumps(manifest))
        with pytest.raises(UserError, match=rf"manifest.json: {message}.* \(re-export the bundle\)"):
            Tagger.load(broken, device="cpu")
    manifest_path.write_text("{ not json")
    with pytest.raises(UserError, match=r"manifest.json: not valid JSON .*\(re-export the bundle\)"):
        Tagger.load(broken, device="cpu")


def edit(bundle, change, reseal: bool = False, rehash_id: bool = False) -> dict:
    """Applies ``change(manifest)`` to ``bundle``'s manifest; ``reseal``: recompute every file hash and the bundle
    id; ``rehash_id``: recompute only the bundle id (``files`` as ``change`` left it)."""
    manifest = json.loads((bundle / layout.MANIFEST).read_text())
    change(manifest)
    if reseal:
        return manifest_file.seal(bundle, manifest)
    if rehash_id:
        manifest["bundle_id"] = manifest_file.bundle_id_of(manifest)
    (bundle / layout.MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def set_key(path: str, value):
    def change(manifest):
        *parents, last = path.split(".")
        section = manifest
        for key in parents:
            section = section[key]
        section[last] = value
    return change


def refused(bundle, match: str, verify: bool = True) -> str:
    """The one-line message with which ``Bundle.open`` and ``Tagger.load`` refuse ``bundle``."""
    with pytest.raises(UserError, match=match) as caught:
        Bundle.open(bundle, verify=verify)
    with pytest.raises(UserError, match=match):
        Tagger.load(bundle, device="cpu", verify=verify)
    message = str(caught.value)
    assert "\n" not in message
    return message


# -- the bundle id covers the manifest --------------------------------------------------------------------------------
@pytest.mark.parametrize("key,value", [("scoring.scale", 3.0), ("scoring.knn_weight", 0.9),
                                       ("tokenization.max_length", 8), ("dims.neighbours", 0)])
def test_editing_a_setting_in_the_manifest_is_refused(tiny_bundle, copy_of, key, value):
    copy = copy_of(tiny_bundle)
    edit(copy, set_key(key, value))
    for verify in (True, False):  # the id check is cheap: it runs without hash verification too
        refused(copy, r"manifest.json: the manifest was modified after export .*re-export the bundle", verify)


def test_a_resealed_setting_is_another_bundle_id(tiny_bundle, copy_of):
    # The id names what results depend on: the same files with another scale are another bundle.
    copy = copy_of(tiny_bundle)
    original = Bundle.open(tiny_bundle).bundle_id
    assert manifest_file.bundle_id_of(json.loads((tiny_bundle / layout.MANIFEST).read_text())) == original
    edit(copy, set_key("scoring.scale", 3.0), reseal=True)
    assert Tagger.load(copy, device="cpu").bundle_id not in (original, None)
    # ... while what never changes results (provenance, export diagnostics) is outside the id
    resealed = Bundle.open(copy).bundle_id
    edit(copy, set_key("created", "1999-01-01T00:00:00+00:00"))
    edit(copy, set_key("parity_max_abs", {}))
    assert Bundle.open(copy).bundle_id == resealed


@pytest.mark.parametrize("rehash_id", [False, True])
def test_format_1_is_refused_even_as_a_downgrade(tiny_bundle, copy_of, rehash_id):
    copy = copy_of(tiny_bundle)
    edit(copy, set_key("format", "xmctag-bundle/1"), rehash_id=rehash_id)
    message = refused(copy, "bundle format 'xmctag-bundle/1'", verify=False)
    assert "re-export" in message and "does not cover its manifest" in message


# -- every file listed, nothing else in the bundle ------------------------------------------------------------------
@pytest.mark.parametrize("name", ["README.md", run_dir.LABEL_VECTORS])
def test_a_file_dropped_from_files_then_edited_is_refused(tiny_bundle, copy_of, name):
    copy = copy_of(tiny_bundle)

    def drop(manifest):
        del manifest["files"][name]

    edit(copy, drop)
    with open(copy / name, "ab") as f:
        f.write(b"\0")
    refused(copy, "the manifest was modified", verify=False)
    edit(copy, lambda manifest: None, rehash_id=True)  # the id made to match the shorter list
    refused(copy, rf"{name} is not in the manifest's files", verify=False)


@pytest.mark.parametrize("extra", ["notes.txt", "tokenizer/added_tokens.json", "deep/er/x.bin"])
def test_an_unlisted_file_is_refused(tiny_bundle, copy_of, extra):
    copy = copy_of(tiny_bundle)
    (copy / extra).parent.mkdir(parents=True, exist_ok=True)
    (copy / extra).write_text("{}")
    refused(copy, rf"{extra} is not in the manifest's files", verify=False)


def test_a_listed_file_that_is_missing_or_changed_is_refused(tiny_bundle, copy_of):
    copy = copy_of(tiny_bundle)
    with open(copy / run_dir.LABELS, "ab") as f:
        f.write(b"x")
    refused(copy, f"{run_dir.LABELS} does not match the manifest")
    Bundle.open(copy, verify=False)  # presence, listing and the id only
    (copy / run_dir.LABELS).unlink()
    refused(copy, f"{run_dir.LABELS} is missing", verify=False)


def test_a_file_tagging_reads_must_be_listed(tiny_bundle, copy_of):
    copy = copy_of(tiny_bundle)
    (copy / run_dir.LABEL_VECTORS).unlink()

    def drop(manifest):
        del manifest["files"][run_dir.LABEL_VECTORS]

    edit(copy, drop, reseal=True)
    refused(copy, f"bundle is incomplete, {run_dir.LABEL_VECTORS} is not in the manifest's files")


# -- paths stay inside the bundle ---------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["../x/tokenizer.json", "ABSOLUTE", "tokenizer/../../x/tokenizer.json",
                                  "./tokenizer/tokenizer.json", "tokenizer//tokenizer.json", "manifest.json"])
def test_a_tokenizer_path_outside_the_bundle_is_refused(tiny_bundle, copy_of, tmp_path, path):
    copy = copy_of(tiny_bundle)
    outside = tmp_path / "x" / "tokenizer.json"  # a real tokenizer there: only the path check stands in the way
    outside.parent.mkdir()
    shutil.copy(tiny_bundle / "tokenizer" / "tokenizer.json", outside)
    path = str(outside) if path == "ABSOLUTE" else path
    edit(copy, set_key("tokenization.tokenizer", path), rehash_id=True)
    refused(copy, r"tokenization.tokenizer names .*, which is not a relative path inside the bundle", verify=False)


@pytest.mark.parametrize("key", ["files", "graph.files"])
def test_other_manifest_paths_outside_the_bundle_are_refused(tiny_bundle, copy_of, tmp_path, key):
    copy = copy_of(tiny_bundle)
    (tmp_path / "evil.onnx").write_bytes((tiny_bundle / layout.ONNX_FP32).read_bytes())

    def change(manifest):
        if key == "files":
            manifest["files"]["../evil.onnx"] = manifest["files"][layout.ONNX_FP32]
        else:
            manifest["graph"]["files"].append(str(tmp_path / "evil.onnx"))

    edit(copy, change, rehash_id=True)
    refused(copy, rf"{key} names .*evil.onnx', which is not a relative path inside the bundle", verify=False)


def test_symlinks_out_of_the_bundle_are_refused(tiny_bundle, copy_of, tmp_path):
    # Same content as the real file, so every hash matches: only the symlink check can tell.
    copy = copy_of(tiny_bundle)
    outside = tmp_path / "outside"
    shutil.copytree(copy / layout.TOKENIZER, outside)
    tokenizer = copy / layout.TOKENIZER / "tokenizer.json"
    tokenizer.unlink()
    tokenizer.symlink_to(outside / "tokenizer.json")
    refused(copy, "tokenizer/tokenizer.json leads outside the bundle through a symlink")
    shutil.rmtree(copy / layout.TOKENIZER)  # the whole folder a symlink to a copy outside
    (copy / layout.TOKENIZER).symlink_to(outside, target_is_directory=True)
    refused(copy, "leads outside the bundle through a symlink")
    (copy / layout.TOKENIZER).unlink()
    shutil.copytree(outside, copy / layout.TOKENIZER)
    Bundle.open(copy)  # restored
    os.symlink("/etc/passwd", copy / "extra")  # unlisted, and pointing out
    refused(copy, "extra is a symlink to '/etc/passwd', outside the bundle", verify=False)


def test_a_symlink_inside_the_bundle_to_a_listed_file_is_fine(tiny_bundle, copy_of):
    copy = copy_of(tiny_bundle)
    (copy / "README.md").unlink()
    (copy / "README.md").symlink_to(layout.NEIGHBOUR_INDEX)  # stays inside; its content is checked like any file's
    edit(copy, lambda manifest: None, reseal=True)
    Bundle.open(copy)


# -- damaged files: one line naming the file -----------------------------------------------------------------------
DAMAGEABLE = [layout.NEIGHBOUR_INDEX, run_dir.TRAIN_LABELS, run_dir.LABELS, run_dir.LABEL_VECTORS,
              layout.ONNX_FP32, "tokenizer/tokenizer.json", run_dir.CONFIG]


@pytest.mark.parametrize("name", DAMAGEABLE)
def test_a_truncated_file_is_a_one_line_error_naming_it(tiny_bundle, copy_of, catalog_dir, tmp_path, name):
    copy = copy_of(tiny_bundle)
    data = (copy / name).read_bytes()
    (copy / name).write_bytes(data[: len(data) // 2])
    edit(copy, lambda manifest: None, reseal=True)
    if name != run_dir.CONFIG:  # read by Bundle.open itself
        Bundle.open(copy)  # the manifest is consistent: the damage shows when the file is read
    with pytest.raises(UserError) as caught:
        Tagger.load(copy, device="cpu")
    message = str(caught.value)
    assert f"bundle file {name} is unreadable (" in message and message.endswith("; re-export the bundle")
    assert "\n" not in message
    result = CliRunner().invoke(app, ["tag", str(catalog_dir / "dev.parquet"), "--model", str(copy), "--device",
                                      "cpu", "-o", str(tmp_path / "p.parquet"), "--quiet"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and name in lines[0], result.output
    assert not (tmp_path / "p.parquet").exists()


class _Touch:
    """Unpickling it creates a file: proof that a pickle in a bundle is never loaded."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        from pathlib import Path

        return Path.touch, (Path(self.path),)


def test_a_pickle_in_a_bundle_is_never_loaded(tiny_bundle, copy_of, tmp_path):
    import numpy as np

    copy = copy_of(tiny_bundle)
    marker = tmp_path / "unpickled"
    indptr = np.empty(1, dtype=object)
    indptr[0] = _Touch(marker)
    np.savez(copy / run_dir.TRAIN_LABELS, indptr=indptr, indices=np.zeros(0, np.int32))
    edit(copy, lambda manifest: None, reseal=True)
    with pytest.raises(UserError, match=rf"bundle file {run_dir.TRAIN_LABELS} is unreadable \(.*allow_pickle"):
        Tagger.load(copy, device="cpu")
    assert not marker.exists()


@pytest.mark.parametrize("key,value,match", [
    ("scoring.scale", float("nan"), "not valid JSON"), ("scoring.knn_weight", 2.0, "invalid key 'scoring.knn_weight'"),
    ("tokenization.max_length", "16", "invalid key 'tokenization.max_length'"),
    ("dims.labels", 7, "label table .* does not match the manifest"),
    ("files.README.md", "0" * 63, "invalid key 'files'"),
])
def test_a_resealed_manifest_with_wrong_values_is_a_clear_error(tiny_bundle, copy_of, key, value, match):
    copy = copy_of(tiny_bundle)
    if key.startswith("files."):
        def change(manifest):
            manifest["files"]["README.md"] = value
    else:
        change = set_key(key, value)
    manifest = json.loads((copy / layout.MANIFEST).read_text())
    change(manifest)
    text = json.dumps({**manifest, "bundle_id": "x"}, indent=2)  # allow_nan: json writes NaN
    (copy / layout.MANIFEST).write_text(text)
    if "NaN" not in text:
        edit(copy, lambda m: None, rehash_id=True)
    with pytest.raises(UserError, match=match):
        Tagger.load(copy, device="cpu", verify=False)


def test_a_manifest_with_a_duplicate_key_is_refused(tiny_bundle, copy_of):
    copy = copy_of(tiny_bundle)
    text = (copy / layout.MANIFEST).read_text()
    (copy / layout.MANIFEST).write_text(text.replace('"scoring": {', '"scoring": {"scale": 3.0, ', 1))
    with pytest.raises(UserError, match="not valid JSON .*duplicate key 'scale'"):
        Bundle.open(copy)
