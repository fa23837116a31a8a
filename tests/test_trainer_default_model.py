"""The shipped default model: a TorchScript file of at most 20 MB with a complete manifest."""

import json
from pathlib import Path

import pytest
import torch

from moderation.descriptor import load_torchscript

MODELS = Path(__file__).resolve().parent.parent / "moderation" / "models"
PT, MANIFEST = MODELS / "default.pt", MODELS / "default.json"

pytestmark = pytest.mark.skipif(not PT.exists(), reason="no shipped default model in this checkout")


def test_size_and_manifest():
    assert PT.stat().st_size <= 20 * 1024 * 1024
    m = json.loads(MANIFEST.read_text())
    assert m["backbone"] == "mobilenet_v2" and m["dim"] == 512
    assert m["resize_mode"] in ("square", "short_edge") and m["image_size"] > 0
    for key in ("uap", "uap_sn", "rp90", "recall_at_1", "rp90_threshold_raw"):
        assert isinstance(m["metrics"][key], float)
    assert m["threshold"] == m["metrics"]["rp90_threshold_raw"]
    info = m["info"]
    assert "trainer" in info["training_command"] and info["reproduce"]
    assert info["data"]["generated"] > 0 and info["data"]["folders"]
    assert not any("references" in f or "queries" in f for f in info["data"]["folders"])
    import hashlib

    assert m["files"]["model.pt"] == hashlib.sha256(PT.read_bytes()).hexdigest()


def test_loads_and_embeds():
    m = json.loads(MANIFEST.read_text())
    model = load_torchscript(PT)
    size = m["image_size"]
    with torch.inference_mode():
        out = model(torch.zeros(2, 3, size, size))
    assert out.shape == (2, m["dim"])
    assert torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-4)


def test_registry_reads_it_as_the_shipped_default():
    model_versions = pytest.importorskip("moderation.model_versions")
    found = model_versions.shipped_default()
    assert found is not None
    record, data = found
    assert record.dim == 512 and record.image_size == json.loads(MANIFEST.read_text())["image_size"]
    assert data == PT.read_bytes()
