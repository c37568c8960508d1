"""The runtime packages chosen by install extra: exactly one of onnxruntime / onnxruntime-gpu (and of faiss-cpu /
faiss-gpu), checked before any work starts."""

import importlib
import importlib.metadata

import pytest

from xmctag import UserError
from xmctag.backend import runtime


class FakeDistribution:
    def __init__(self, name):
        self.metadata = {"Name": name}


def test_both_runtimes_installed_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(importlib.metadata, "distributions",
                        lambda path: [FakeDistribution("onnxruntime"), FakeDistribution("onnxruntime-gpu")])
    with pytest.raises(UserError, match=r"both onnxruntime and onnxruntime-gpu are installed .*pip uninstall -y "
                                        r"onnxruntime onnxruntime-gpu"):
        runtime.check_runtime_packages()


def test_no_runtime_installed_is_a_clear_error(monkeypatch):
    real_import = importlib.import_module

    def without_faiss(name, *args):
        if name == "faiss":
            raise ImportError("No module named 'faiss'")
        return real_import(name, *args)

    monkeypatch.setattr(importlib, "import_module", without_faiss)
    with pytest.raises(UserError, match=r"faiss is not importable .* pip install 'xmctag\[cpu\]'"):
        runtime.check_runtime_packages()


def test_one_runtime_set_passes(monkeypatch):
    # This environment has one runtime set (the cpu extra): the check reads the real installed distributions, finds
    # exactly one of each pair, and lets it through.
    seen = []
    distributions = importlib.metadata.distributions

    def recorded(**kwargs):
        found = list(distributions(**kwargs))
        seen.extend(d.metadata["Name"].lower().replace("_", "-") for d in found if d.metadata["Name"])
        return found

    monkeypatch.setattr(importlib.metadata, "distributions", recorded)
    runtime.check_runtime_packages()
    assert len({"onnxruntime", "onnxruntime-gpu"} & set(seen)) == 1, seen
    assert len({"faiss-cpu", "faiss-gpu", "faiss-gpu-cu12", "faiss-gpu-cu11"} & set(seen)) == 1, seen
    assert "CPUExecutionProvider" in runtime.onnxruntime().get_available_providers()
    assert runtime.resolve_device("cpu") == "cpu"
