"""Artifacts are used only when their bytes match the manifest; nothing is unpickled.

A model, statistics or index file changed in the store (corruption or
tampering) stops the matching run with IntegrityError before the bytes
reach torch or FAISS, and the run is recorded as failed. ``torch.load``
appears in the code only with ``weights_only=True``.
"""

from __future__ import annotations

import ast
import json
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


def test_a_broken_index_pointer_is_a_clear_error_and_a_rebuild_repairs_it(tmp_path, s3_server, s3_bucket,
                                                                          monkeypatch, capsys):
    """Hardening item 13: on S3, a damaged indexes/MODEL/CURRENT stops matching with a message naming it and
    the rebuild (command and DAG); the CLI exits 1 without a traceback; `index build` repairs it."""
    from review_support import s3_pipeline

    from moderation import cli
    from moderation.embedding import FolderSource
    from moderation.errors import ModerationError
    from moderation.jobs import build_reference_index, run_matching

    with s3_pipeline(tmp_path / "home", s3_server, s3_bucket) as (p, env, samples):
        model = p.current_model().version
        key = f"indexes/{model}/CURRENT"
        good = p.store.get(key)
        p.store.put(key, good[:-7])  # a truncated write
        with pytest.raises(ModerationError) as info:
            run_matching(p, FolderSource(samples.queries), "broken-pointer")
        msg = str(info.value)
        assert key in msg and "moderation index build" in msg and "reference_index_nightly" in msg
        assert p.db.run("broken-pointer") is None  # nothing started

        for name, value in env.items():
            monkeypatch.setenv(name, value)
        assert cli.main(["--quiet", "match", "--images", str(samples.queries)]) == 1
        err = capsys.readouterr().err
        assert f"moderation: error: {key}" in err and "Traceback" not in err

        index = build_reference_index(p, FolderSource(samples.references))
        assert json.loads(p.store.get(key))["version"] == index.version
        assert run_matching(p, FolderSource(samples.queries), "repaired").n_queries > 0
