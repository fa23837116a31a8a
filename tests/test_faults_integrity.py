"""Artifacts are used only when their bytes match the manifest; nothing is unpickled.

A model, statistics or index file changed in the store (corruption or
tampering) stops the matching run with IntegrityError before the bytes
reach torch or FAISS, and the run is recorded as failed. ``torch.load``
appears in the code only with ``weights_only=True``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from review_support import (fresh_pg_database, local_pipeline, settings_from,
                            torch_single_thread)  # noqa: F401 (autouse)

from moderation.errors import IntegrityError

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("kind,name", [("models", "model.pt"), ("indexes", "index.faiss"),
                                       ("stats", "stats.npz")])
def test_tampered_artifact_is_refused_before_loading(tmp_path, monkeypatch, kind, name):
    import torch

    from moderation.embedding import FolderSource
    from moderation.jobs import Pipeline, run_matching

    with fresh_pg_database() as url:
        env, samples = local_pipeline(tmp_path / "home", url)
        p = Pipeline.open(settings_from(env))
        try:
            [target] = [k for k in p.store.list(f"{kind}/") if k.endswith("/" + name)]
            data = bytearray(p.store.get(target))
            data[len(data) // 2] ^= 0xFF  # one flipped byte
            p.store.put(target, bytes(data))
            loaded = []
            real_load = torch.jit.load
            monkeypatch.setattr(torch.jit, "load", lambda *a, **k: loaded.append(a) or real_load(*a, **k))
            with pytest.raises(IntegrityError, match="sha256 does not match"):
                run_matching(p, FolderSource(samples.queries), "tampered")
            run = p.db.run("tampered")
            assert run.status == "failed" and "IntegrityError" in run.failures["error"]
            assert p.db.pairs() == []
            if kind == "models":
                assert loaded == []  # the tampered bytes never reached the deserialiser
        finally:
            p.db.engine.dispose()


def _calls(tree: ast.AST, module: str, func: str):
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == func
                and isinstance(node.func.value, ast.Name) and node.func.value.id == module):
            yield node


def test_torch_load_only_with_weights_only_and_no_pickle():
    offenders = []
    for folder in ("moderation", "trainer", "dags", "benchmarks"):
        for path in sorted((REPO / folder).rglob("*.py")) if (REPO / folder).is_dir() else []:
            tree = ast.parse(path.read_text(), filename=str(path))
            for call in _calls(tree, "torch", "load"):
                kw = {k.arg: k.value for k in call.keywords}
                ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                if not ok:
                    offenders.append(f"{path.relative_to(REPO)}:{call.lineno} torch.load without weights_only=True")
            for mod, fn in (("pickle", "load"), ("pickle", "loads")):
                offenders += [f"{path.relative_to(REPO)}:{c.lineno} {mod}.{fn}" for c in _calls(tree, mod, fn)]
            for call in _calls(tree, "np", "load"):
                kw = {k.arg: k.value for k in call.keywords}
                if isinstance(kw.get("allow_pickle"), ast.Constant) and kw["allow_pickle"].value is True:
                    offenders.append(f"{path.relative_to(REPO)}:{call.lineno} np.load(allow_pickle=True)")
    assert offenders == []
