"""Model versions: the default model, TorchScript import, loading, and no unsafe unpickling."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

import moderation
from conftest import fast_env
from moderation.config import ResizeMode, Settings
from moderation.descriptor import build_model, export_torchscript
from moderation.errors import IntegrityError, ModerationError
from moderation.model_versions import MODEL_FILE, ensure_current_model, import_torchscript, load_model
from moderation.registry import Kind, ModelVersion, Registry
from moderation.store import LocalStore

SIZE = 64


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("mobilenet_v2", projection_dim=64, pretrained=False).eval()
    path = tmp_path_factory.mktemp("tiny") / "tiny.sscd.pt"
    path.write_bytes(export_torchscript(model))
    return path, model


@pytest.fixture
def registry(tmp_path):
    return Registry(LocalStore(tmp_path / "store"))


def test_default_model_registered_once(tmp_path):
    settings = Settings.from_env(fast_env(tmp_path / "home"))
    reg = Registry(LocalStore(tmp_path / "store"))
    first = ensure_current_model(reg, settings)
    assert first.source in ("shipped-default", "imagenet-default")
    assert first.files.keys() == {MODEL_FILE}
    manifest_key = f"models/{first.version}/manifest.json"
    manifest_before = reg.store.get(manifest_key)
    second = ensure_current_model(reg, settings)
    assert second == first
    assert reg.store.get(manifest_key) == manifest_before  # not rewritten
    assert [r.version for r in reg.versions(Kind.MODEL)] == [first.version]
    assert reg.current(Kind.MODEL) == first
    loaded = load_model(reg, first)
    assert loaded.version == first.version
    with torch.inference_mode():
        out = loaded.module(torch.rand(1, 3, SIZE, SIZE))
    assert out.shape == (1, first.dim)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(1))
    if first.source == "imagenet-default":
        assert first.dim == 1280 and first.image_size == 128  # from the settings


def _publish_tiny(registry, path):
    """Register the tiny model without the probe run (for tests that only need a record)."""
    rec = ModelVersion(version="tiny", backbone="mobilenet_v2", dim=64, image_size=SIZE,
                       resize_mode="square", source="trained")
    return registry.publish(Kind.MODEL, rec, {MODEL_FILE: path.read_bytes()})


def test_default_is_not_registered_over_an_existing_model(registry, tiny_file, tmp_path):
    path, _ = tiny_file
    rec = _publish_tiny(registry, path)
    settings = Settings.from_env(fast_env(tmp_path / "home"))
    assert ensure_current_model(registry, settings) == rec
    assert len(registry.versions(Kind.MODEL)) == 1


def test_import_torchscript(registry, tiny_file):
    path, model = tiny_file
    data = path.read_bytes()
    rec = import_torchscript(registry, path, image_size=SIZE, resize_mode=ResizeMode.SHORT_EDGE,
                             backbone="mobilenet_v2")
    from moderation.images import sha256_hex

    digest = sha256_hex(data)
    assert rec.version == f"tiny-sscd-{digest[:8]}"
    assert (rec.dim, rec.image_size, rec.resize_mode, rec.source) == (64, SIZE, "short_edge", "torchscript-import")
    assert rec.info == {"file": "tiny.sscd.pt", "sha256": digest}
    assert rec.files[MODEL_FILE] == digest
    assert registry.current(Kind.MODEL) == rec
    loaded = load_model(registry, rec)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.inference_mode():
        torch.testing.assert_close(loaded.module(x), model(x), rtol=1e-5, atol=1e-6)
    s = loaded.settings_for(Settings.from_env({"MODERATION_HOME": str(path.parent)}))
    assert s.image_size == SIZE and s.resize_mode is ResizeMode.SHORT_EDGE
    raw = json.loads(registry.store.get(f"models/{rec.version}/manifest.json"))
    assert raw["version"] == rec.version and raw["files"] == rec.files
    named = import_torchscript(registry, path, name="my-model", image_size=SIZE, make_current=False)
    assert named.version == "my-model" and registry.current(Kind.MODEL) == rec


def test_load_model_checks_integrity(registry, tiny_file):
    path, _ = tiny_file
    rec = _publish_tiny(registry, path)
    registry.store.put(registry.key_of(Kind.MODEL, rec, MODEL_FILE), path.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(IntegrityError):
        load_model(registry, rec)


def test_import_rejects_non_torchscript(registry, tiny_file, tmp_path):
    _, model = tiny_file
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model at all")
    with pytest.raises(ModerationError, match="not a loadable TorchScript model"):
        import_torchscript(registry, junk)
    ckpt = tmp_path / "checkpoint.pt"
    torch.save(model.state_dict(), ckpt)  # a plain weights file
    with pytest.raises(ModerationError, match="not a loadable TorchScript model"):
        import_torchscript(registry, ckpt)
    assert registry.versions(Kind.MODEL) == []  # nothing half-registered
    assert list(registry.store.list()) == []


class _Payload:
    """Unpickling this object creates a marker file: proof that a pickle was executed."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_import_never_unpickles_untrusted_files(registry, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": _Payload(str(marker))}, evil)
    assert not marker.exists()
    with pytest.raises(ModerationError):
        import_torchscript(registry, evil)
    assert not marker.exists()


# -- static check: no unsafe deserialisation anywhere in the package --------------------------------


def _unsafe_loads(source: str, filename: str = "<src>") -> list[str]:
    """torch.load without weights_only=True, np.load with allow_pickle=True, pickle.load(s)."""
    bad = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        kw = {k.arg: k.value for k in node.keywords}
        if name == "torch.load" or name.endswith(".torch.load"):
            wo = kw.get("weights_only")
            if not (isinstance(wo, ast.Constant) and wo.value is True):
                bad.append(f"{filename}:{node.lineno}: {name} without weights_only=True")
        elif name in ("np.load", "numpy.load"):
            ap = kw.get("allow_pickle")
            if ap is not None and not (isinstance(ap, ast.Constant) and ap.value is False):
                bad.append(f"{filename}:{node.lineno}: {name} with allow_pickle")
        elif name in ("pickle.load", "pickle.loads", "dill.load", "joblib.load"):
            bad.append(f"{filename}:{node.lineno}: {name}")
    return bad


def test_the_unsafe_load_checker_can_fail():
    assert _unsafe_loads("import torch\ntorch.load(f)\n")
    assert _unsafe_loads("torch.load(f, weights_only=False)")
    assert _unsafe_loads("np.load(f, allow_pickle=True)")
    assert _unsafe_loads("import pickle\npickle.loads(b)")
    assert _unsafe_loads("torch.load(f, map_location='cpu', weights_only=True)") == []
    assert _unsafe_loads("np.load(f, allow_pickle=False)") == []


def test_package_has_no_unsafe_deserialisation():
    root = Path(moderation.__file__).parent
    files = sorted(root.rglob("*.py"))
    assert len(files) >= 10
    bad = []
    for f in files:
        src = f.read_text()
        bad += _unsafe_loads(src, str(f.relative_to(root.parent)))
    assert bad == [], "\n".join(bad)
    # torch.jit.load is the only way model files are read, through load_torchscript
    jit_users = [f.name for f in files if "torch.jit.load(" in f.read_text()]
    assert jit_users == ["descriptor.py"]



def test_promote_by_hand_refuses_a_never_evaluated_model(tiny_file, pg_url, s3_server, s3_bucket, tmp_path,
                                                        monkeypatch, capsys):
    """`moderation model promote` on the object store and review database of production."""
    from conftest import s3_env
    from moderation import cli
    from moderation.store import open_store

    env = {**fast_env(tmp_path / "home"), **s3_env(s3_server, s3_bucket), "MODERATION_DATABASE_URL": pg_url}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings.from_env(env)
    registry = Registry(open_store(settings))
    path, _ = tiny_file
    evaluated = registry.publish(Kind.MODEL, ModelVersion(
        version="evaluated", backbone="mobilenet_v2", dim=64, image_size=SIZE, resize_mode="square",
        source="trained", metrics={"uap": 0.5}, threshold=0.4), {MODEL_FILE: path.read_bytes()})
    bare = registry.publish(Kind.MODEL, ModelVersion(
        version="bare", backbone="mobilenet_v2", dim=64, image_size=SIZE, resize_mode="square",
        source="trained"), {MODEL_FILE: path.read_bytes()}, make_current=False)

    assert cli.main(["--quiet", "model", "promote", bare.version]) == 1
    assert "never evaluated" in capsys.readouterr().err
    assert registry.current(Kind.MODEL).version == evaluated.version
    assert cli.main(["--quiet", "model", "promote", bare.version, "--without-metrics"]) == 0
    assert registry.current(Kind.MODEL).version == bare.version
    assert cli.main(["--quiet", "model", "promote", evaluated.version]) == 0
    assert '"threshold": 0.4' in capsys.readouterr().out
    assert registry.current(Kind.MODEL).version == evaluated.version
    assert cli.main(["--quiet", "model", "promote", "no-such-version"]) == 1
    assert "no-such-version" in capsys.readouterr().err
