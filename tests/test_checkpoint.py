"""The training checkpoint: safetensors + JSON, never a pickle; damaged or foreign checkpoints are one-line errors."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from xmctag import Config, UserError, run_dir, train
from xmctag.scoring import LabelVectors

# The file format module is imported by the tests that use it: the security test below runs as is on versions
# without it (it failed on the version that unpickled checkpoint.pt).


def _quick(tiny_encoder_dir, **settings) -> Config:
    return Config(**{**dict(encoder=tiny_encoder_dir, epochs=1, classifier_epochs=0, batch_size=32, lr=1e-3,
                            warmup_steps=2, max_length=16, label_max_length=12, label_vector_epochs=1,
                            knn_neighbours=0), **settings})


def _files(catalog_dir, out, config) -> dict:
    return dict(train=catalog_dir / "train.parquet", labels=catalog_dir / "labels.parquet", out=out, config=config,
                progress=False)


# -- the security hole: a pickled checkpoint.pt is never loaded --------------------------------------------------------
class _WritesAFile:
    """Unpickled, it creates ``path``: the stand-in for any code a crafted pickle runs."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_a_pickled_checkpoint_is_never_loaded(tmp_path, catalog_dir, tiny_encoder_dir, monkeypatch):
    from typer.testing import CliRunner

    from xmctag.cli import app
    from xmctag.training import trainer

    config, run, marker = _quick(tiny_encoder_dir), tmp_path / "run", tmp_path / "pwned"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:  # a run stopped after its first epoch, its checkpoint saved
        patch.setattr(trainer, "fit_label_vectors", interrupted)
        with pytest.raises(KeyboardInterrupt):
            train(**_files(catalog_dir, run, config))
    # Its checkpoint replaced by a pickle as older versions wrote (torch.save), crafted to run code when loaded.
    (run / run_dir.CHECKPOINT).unlink(missing_ok=True)
    legacy = run / "checkpoint.pt"
    torch.save({"stage": "dual encoder", "torch_rng": torch.get_rng_state(), "payload": _WritesAFile(marker)}, legacy)
    assert run_dir.is_run_dir(run) and run_dir.run_state(run) == "interrupted"  # still a run (--overwrite)
    before = sorted(p.name for p in run.iterdir())

    with pytest.raises(Exception) as caught:
        train(resume=True, **_files(catalog_dir, run, config))
    assert not marker.exists(), "the pickled checkpoint was loaded: its code ran"
    assert caught.type is UserError
    message = str(caught.value)
    assert "\n" not in message and "checkpoint.pt" in message and "--overwrite" in message
    assert sorted(p.name for p in run.iterdir()) == before  # refused before anything is written

    args = ["train", "--train", catalog_dir / "train.parquet", "--labels", catalog_dir / "labels.parquet", "--out",
            run, "--resume", "--quiet"]
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 2 and "never loaded" in result.output and "Traceback" not in result.output
    assert not marker.exists()

    train(overwrite=True, **_files(catalog_dir, run, config))  # --overwrite replaces the run, unread
    assert run_dir.run_state(run) == "finished" and not legacy.exists()
    assert not marker.exists()


# -- the file format -------------------------------------------------------------------------------------------------
def _every_kind_of_value() -> dict:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    model(torch.randn(5, 3)).sum().backward()
    optimizer.step()
    scheduler.step()
    weight = torch.randn(4, 6)
    return {
        "stage": "dual encoder",
        "progress": {"epochs": 3, "done": 1, "history": [{"epoch": 1, "loss": 0.25, "dev": {"P@1": 0.5}}],
                     "best": {"score": -1.0, "epoch": 0}},
        "state": {
            "encoder": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "seen": np.random.default_rng(0).normal(size=(7, 4)).astype(np.float32),
            "ids": np.arange(-3, 9, dtype=np.int64), "mask": np.array([True, False]), "empty": np.zeros((0, 4)),
            "head": LabelVectors(np.ones((3, 2), np.float32), np.arange(3, dtype=np.float32), 20.0), "best": None,
            "shared": [weight, weight, weight.T, weight[1:], weight[:, 0]],  # one storage, non-contiguous views
            "half": torch.randn(3, dtype=torch.bfloat16), "scalar": torch.tensor(7),
            "floats": [0.1, -0.0, 1e300, math.inf, -math.inf], "nan": math.nan, "tuple": (1, ("a", None), [2.5]),
            "keys": {0: "int", 1.5: "float", None: "none", True: "bool", "$dollar": "str"},
        },
        "torch_rng": torch.get_rng_state(),
    }


def _assert_same(got, expected, path="state"):
    assert type(got) is type(expected) or (isinstance(expected, dict) and type(got) is dict), (path, type(got))
    if isinstance(expected, torch.Tensor):
        assert got.dtype == expected.dtype and got.shape == expected.shape and got.device.type == "cpu", path
        assert torch.equal(got, expected.cpu()), path
    elif isinstance(expected, np.ndarray):
        assert got.dtype == expected.dtype, path
        np.testing.assert_array_equal(got, expected, err_msg=path)
    elif isinstance(expected, LabelVectors):
        _assert_same(got.vectors, expected.vectors, path + ".vectors")
        _assert_same(got.bias, expected.bias, path + ".bias")
        assert got.scale == expected.scale
    elif isinstance(expected, dict):
        assert list(got) == list(expected), path
        for key in expected:
            assert type(next(k for k in got if k == key)) is type(key), (path, key)
            _assert_same(got[key], expected[key], f"{path}/{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(got) == len(expected), path
        for i, (a, b) in enumerate(zip(got, expected, strict=True)):
            _assert_same(a, b, f"{path}/{i}")
    elif isinstance(expected, float) and math.isnan(expected):
        assert math.isnan(got), path
    else:
        assert got == expected and (not isinstance(expected, float) or math.copysign(1, got) == math.copysign(
            1, expected)), path


def test_round_trip_gives_back_every_value_with_its_type(tmp_path, monkeypatch):
    from xmctag.training import checkpoint

    state = _every_kind_of_value()
    path, tmp = tmp_path / run_dir.CHECKPOINT, tmp_path / run_dir.CHECKPOINT_TMP
    checkpoint.save(path, state, tmp)
    assert path.exists() and not tmp.exists()

    def no_pickle(*args, **kwargs):
        raise AssertionError("a checkpoint is read without pickle")

    import pickle

    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    monkeypatch.setattr(pickle, "Unpickler", no_pickle)
    monkeypatch.setattr(torch, "load", no_pickle)
    _assert_same(checkpoint.load(path), state)

    # The restored optimiser and schedule are the saved ones (tuples where torch wants them: betas).
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    optimizer.load_state_dict(checkpoint.load(path)["state"]["optimizer"])
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.999)
    _assert_same(optimizer.state_dict(), state["state"]["optimizer"])


def test_the_file_is_safetensors_with_the_state_as_json(tmp_path):
    from safetensors import safe_open

    from xmctag.training import checkpoint

    path = tmp_path / run_dir.CHECKPOINT
    checkpoint.save(path, _every_kind_of_value(), tmp_path / run_dir.CHECKPOINT_TMP)
    with safe_open(path, framework="pt") as f:
        metadata, names = f.metadata(), set(f.keys())
    assert (metadata["format"], metadata["version"]) == ("xmctag-checkpoint", "1")
    tree = json.loads(metadata["state"])
    assert tree["stage"] == "dual encoder" and tree["torch_rng"] == {"$tensor": "torch_rng"}
    assert tree["state"]["head"]["$label_vectors"]["scale"] == 20.0
    assert tree["state"]["tuple"] == {"$tuple": [1, {"$tuple": ["a", None]}, [2.5]]}
    assert {"state/encoder/0.weight", "state/optimizer/state/0/exp_avg", "state/seen", "torch_rng"} <= names


def test_a_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from xmctag.training import checkpoint

    path, tmp = tmp_path / run_dir.CHECKPOINT, tmp_path / run_dir.CHECKPOINT_TMP
    checkpoint.save(path, {"epoch": 1, "w": torch.ones(3)}, tmp)

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x10\x00")  # half-written
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(path, {"epoch": 2, "w": torch.zeros(3)}, tmp)
    assert checkpoint.load(path)["epoch"] == 1
    with pytest.raises(TypeError, match="cannot store a set"):  # refused before anything is written
        checkpoint.save(path, {"epoch": 3, "bad": {1, 2}}, tmp)
    assert checkpoint.load(path)["epoch"] == 1


# -- damaged or foreign checkpoints: one-line UserErrors naming the file ---------------------------------------------
@pytest.fixture(scope="module")
def interrupted_runs(tmp_path_factory, catalog_dir, tiny_encoder_dir):
    """Two runs stopped right after their first checkpoint: in the dual-encoder stage, in the classifier stage."""
    from xmctag.training import checkpoint

    runs = {}
    save_checkpoint = run_dir.save_checkpoint
    for stage, settings in (("dual encoder", {}), ("classifier", dict(epochs=0, classifier_epochs=2))):
        config = _quick(tiny_encoder_dir, **settings)
        out = tmp_path_factory.mktemp("interrupted") / "run"

        def save_then_stop(out, state):
            save_checkpoint(out, state)
            raise KeyboardInterrupt

        with pytest.MonkeyPatch.context() as patch, pytest.raises(KeyboardInterrupt):
            patch.setattr(run_dir, "save_checkpoint", save_then_stop)
            train(**_files(catalog_dir, out, config))
        assert checkpoint.load(out / run_dir.CHECKPOINT)["stage"] == stage
        runs[stage] = (out, config)
    return runs


def _retensor(state, path, value):
    """``state`` with the value at ``path`` (keys) replaced by ``value`` (or removed: None)."""
    *parents, last = path
    node = state
    for key in parents:
        node = node[key]
    if value is None:
        del node[last]
    else:
        node[last] = value
    return state


def _rewrite_metadata(path, text):
    """Rewrites the JSON state of the checkpoint ``path`` as ``text(state)``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(path, framework="pt") as f:
        names = f.keys()
        tensors, metadata = {k: f.get_tensor(k) for k in names}, f.metadata()
    save_file(tensors, path, metadata={**metadata, "state": text(metadata["state"])})


def _tamper(path, edit):
    """Saves ``edit(state)`` as the checkpoint ``path`` (a well-formed file of another state)."""
    from xmctag.training import checkpoint

    checkpoint.save(path, edit(checkpoint.load(path)), path.with_suffix(".tmp"))


DAMAGES = {
    "truncated": ("dual encoder", lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
                  "not a safetensors file"),
    "empty": ("dual encoder", lambda p: p.write_bytes(b""), "not a safetensors file"),
    "a pickle": ("dual encoder", lambda p: torch.save({"stage": "dual encoder"}, p), "not a safetensors file"),
    "bad json": ("dual encoder", lambda p: _rewrite_metadata(p, lambda s: s[:-10]), "bad state"),
    "a missing tensor": ("dual encoder", lambda p: _rewrite_metadata(p, lambda s: s.replace(
        '"$tensor": "torch_rng"', '"$tensor": "gone"')), "refers to a tensor 'gone'"),
    "a missing key": ("dual encoder", lambda p: _tamper(p, lambda s: _retensor(
        s, ["state", "seen_embeddings"], None)), "missing 'seen_embeddings'"),
    "no progress": ("dual encoder", lambda p: _tamper(p, lambda s: _retensor(s, ["dual_encoder", "done"], None)),
                    "missing 'done'"),
    "an unknown stage": ("dual encoder", lambda p: _tamper(p, lambda s: {**s, "stage": "other"}),
                         "unknown stage 'other'"),
    "no rng": ("dual encoder", lambda p: _tamper(p, lambda s: _retensor(s, ["torch_rng"], None)), "torch_rng"),
    "an encoder weight of another shape": ("dual encoder", lambda p: _tamper(p, lambda s: _retensor(
        s, ["state", "encoder", "backbone.pooler.dense.weight"], torch.zeros(3, 3))), "size mismatch"),
    "an optimiser moment of another shape": ("dual encoder", lambda p: _tamper(p, lambda s: _retensor(
        s, ["state", "optimizer", "state", 0, "exp_avg"], torch.zeros(2))), "optimizer exp_avg of shape"),
    "seen embeddings of another shape": ("dual encoder", lambda p: _tamper(p, lambda s: _retensor(
        s, ["state", "seen_embeddings"], np.zeros((1, 32), np.float32))), "seen_embeddings of shape"),
    "a head of another shape": ("classifier", lambda p: _tamper(p, lambda s: _retensor(
        s, ["state", "head"], LabelVectors(np.zeros((4, 32), np.float32), np.zeros(4, np.float32), 20.0))),
                                "head of shape"),
    "a head that is not label vectors": ("classifier", lambda p: _tamper(p, lambda s: _retensor(
        s, ["state", "best_head"], [1, 2])), "'best_head' is a list"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_checkpoint_is_a_one_line_error(damage, interrupted_runs, catalog_dir, tmp_path):
    stage, damage_file, why = DAMAGES[damage]
    source, config = interrupted_runs[stage]
    out = tmp_path / "run"
    shutil.copytree(source, out)
    damage_file(out / run_dir.CHECKPOINT)
    with pytest.raises(UserError) as caught:
        train(resume=True, **_files(catalog_dir, out, config))
    message = str(caught.value)
    assert "\n" not in message, message
    assert message.startswith(f"--resume {out / run_dir.CHECKPOINT}: not a usable checkpoint"), message
    assert re.search(re.escape(why), message), message
    assert message.endswith("--overwrite instead of --resume"), message


def test_an_interrupted_run_resumes_from_its_checkpoint(interrupted_runs, catalog_dir, tmp_path):
    # The undamaged copies resume (what they give is checked against uninterrupted runs in test_training).
    for stage, (source, config) in interrupted_runs.items():
        out = tmp_path / stage.replace(" ", "_")
        shutil.copytree(source, out)
        train(resume=True, **_files(catalog_dir, out, config))
        assert run_dir.run_state(out) == "finished" and not (out / run_dir.CHECKPOINT).exists(), stage
