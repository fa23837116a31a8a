"""Reference banks and the operators' switches: banks from keys and the manifest, the removal list at
search time, the operator role on Postgres, and the end-to-end effect through the matching DAG's call."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from review_support import fresh_pg_database, login_role, s3_pipeline, seed_run, torch_single_thread, url_for  # noqa: F401
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from moderation import reference_controls as rc
from moderation.banks import BankError, BankRules
from moderation.db import Database
from moderation.errors import NotFoundError
from moderation.index import build_index
from moderation.review import ReviewInputError, ReviewPermissionError

# -- bank rules ---------------------------------------------------------------------------------


def test_bank_is_the_first_folder_or_default_and_the_manifest_overrides():
    plain = BankRules()
    assert plain.bank_of("x.jpg") == "default"
    assert plain.bank_of("partner-a/x.jpg") == "partner-a"
    assert plain.bank_of("partner-a/deeper/x.jpg") == "partner-a"
    rules = BankRules.parse("prefix,bank\npartner-a/,alpha\npartner-a/logos/,logos\nloose.jpg,alpha\n")
    assert rules.bank_of("partner-a/x.jpg") == "alpha"
    assert rules.bank_of("partner-a/logos/x.jpg") == "logos"  # the longest prefix wins
    assert rules.bank_of("loose.jpg") == "alpha"
    assert rules.bank_of("other/x.jpg") == "other"
    for bad in ("bank,prefix\nx,y\n", "prefix,bank\nx/,bad name\n", "prefix,bank\nx/,a\nx/,b\n"):
        with pytest.raises(BankError):
            BankRules.parse(bad)


# -- the removal list at search time ------------------------------------------------------------


@pytest.mark.parametrize("factory", ["Flat", "IVF2,Flat", "HNSW8"])
def test_removed_references_are_never_returned_and_the_rest_keep_their_order(factory):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = [f"r{i}" for i in range(60)]
    index = build_index(x, ids, factory)
    removed = {f"r{i}" for i in range(0, 60, 3)}
    _, full = index.search(x[:5], 60)
    _, got = index.without(removed).search(x[:5], 10)
    for row_full, row in zip(full, got):
        assert not set(row) & removed
        assert row == [r for r in row_full if r not in removed][:10]
    # Added back later (a reference re-enabled after the build held it out): searchable again.
    extra = rng.normal(size=(1, 8)).astype(np.float32)
    index.add(extra / np.linalg.norm(extra), ["new"])
    assert index.search(extra / np.linalg.norm(extra), 1)[1][0] == ["new"]


# -- the operator's role on Postgres ------------------------------------------------------------


@pytest.fixture(scope="module")
def admin_db():
    with fresh_pg_database() as url:
        d = Database(url)
        seed_run(d, "day-1", [("q1", "r1", 0.9)])
        rc.register_banks(d, {"default": 10, "partner": 3}, "i1")
        yield d
        d.engine.dispose()


def _as(admin_db: Database, user: str) -> Database:
    from sqlalchemy.engine import make_url

    return Database(url_for(make_url(admin_db.url).database, user=user))


def test_only_operators_switch_banks_and_every_change_is_logged(admin_db):
    with login_role("moderation_moderator") as user:
        mod = _as(admin_db, user)
        try:
            with pytest.raises(ReviewPermissionError):
                rc.set_bank_enabled(mod, "partner", False, "not mine to decide")
            with pytest.raises(ReviewPermissionError):
                rc.set_reference_policy(mod, "r1", rc.Policy.SUPPRESS, "nor this")
            with mod.engine.connect() as conn:  # but a moderator sees the banks and how they fare
                assert {r.bank for r in conn.execute(text("SELECT * FROM review_bank_summary"))} >= {"partner"}
        finally:
            mod.engine.dispose()
    with login_role("moderation_operator") as user:
        op = _as(admin_db, user)
        try:
            entry = rc.set_bank_enabled(op, "partner", False, "licence expired")
            assert (entry["changed_by"], entry["action"], entry["reason"]) == (user, "disable", "licence expired")
            assert rc.read_controls(op).disabled_banks == {"partner"}
            rc.set_reference_enabled(op, "r1", False, "takedown request")
            rc.set_reference_policy(op, "r1", rc.Policy.STRICT, "a logo", min_inliers=40)
            with pytest.raises(NotFoundError, match="no reference bank"):
                rc.set_bank_enabled(op, "partnr", False, "typo")
            with pytest.raises(ReviewInputError, match="reason"):
                rc.set_bank_enabled(op, "partner", True, "  ")
            with pytest.raises(ReviewPermissionError, match="may not act as"):
                rc.set_bank_enabled(op, "partner", True, "someone else", by="alice")
            rc.set_bank_enabled(op, "partner", True, "renewed")
            controls = rc.read_controls(op)
            assert controls.disabled_banks == set() and controls.disabled_references == {"r1"}
            assert controls.policies["r1"] == rc.ReferencePolicy(rc.Policy.STRICT, 40)
            with op.engine.connect() as conn:
                assert [r.target for r in conn.execute(text("SELECT * FROM reference_disabled"))] == ["r1"]
                state = {r.bank: r.enabled for r in conn.execute(text("SELECT * FROM reference_bank_state"))}
                assert state == {"default": True, "partner": True}
        finally:
            op.engine.dispose()
    log = rc.control_log(admin_db)
    assert [e["action"] for e in log] == ["enable", "strict", "disable", "disable"]
    # Append-only, for the owner too.
    for sql in ("UPDATE reference_control_log SET reason = 'x'", "DELETE FROM reference_control_log",
                "TRUNCATE reference_control_log"):
        with pytest.raises(DBAPIError, match="append-only"):
            with admin_db.engine.begin() as conn:
                conn.execute(text(sql))


# -- end to end on Postgres + S3, through the matching DAG's library call ------------------------

QUERIES = {"Q00006": "R00007", "Q00009": "R00003", "Q00001": "R00000"}  # copies and their source


def _flagged(p, batch: str) -> dict[str, str]:
    """reference id -> bank of the pairs the batch's run has now."""
    return {x.reference_id: x.bank for x in p.db.pairs(p.db.run(batch).id)}


def test_disabled_reference_and_bank_stop_matching_at_the_next_run_and_come_back(tmp_path, s3_server, s3_bucket):
    from moderation import orchestration
    from moderation.embedding import StoreSource
    from moderation.jobs import build_reference_index, run_folder_of
    from moderation.registry import Kind

    # A fixed threshold: this test is about which references are searched, not about calibration.
    with s3_pipeline(tmp_path / "home", s3_server, s3_bucket, MODERATION_EVIDENCE="false",
                     MODERATION_VERIFY_WORKERS="0", MODERATION_THRESHOLD="0.25") as (p, _, samples):
        # references/R00007 in bank "partner" (its folder), R00003 in "policy-x" (the manifest), the rest default.
        for f in sorted(samples.references.iterdir()):
            folder = {"R00007": "partner/", "R00003": "special/"}.get(f.stem, "")
            p.store.put(f"references/{folder}{f.name}", f.read_bytes())
        p.store.put("references/banks.csv", b"prefix,bank\nspecial/,policy-x\n")
        for q in QUERIES:
            p.store.put(f"queries/2024-01-01/{q}.jpg", (samples.queries / f"{q}.jpg").read_bytes())
        built = build_reference_index(p, StoreSource(p.settings, "references/"))
        model = built.model_version
        batch = "queries/2024-01-01/"

        def run() -> dict[str, str]:
            orchestration.match_batch(p.settings, batch, model)
            return _flagged(p, batch)

        assert run() == {"R00007": "partner", "R00003": "policy-x", "R00000": "default"}
        assert {b["bank"]: b["n_references"] for b in rc.bank_summaries(p.db)} == \
            {"default": 10, "partner": 1, "policy-x": 1}

        t0 = time.perf_counter()
        rc.set_reference_enabled(p.db, "R00000", False, "takedown request", by="ops")
        rc.set_bank_enabled(p.db, "partner", False, "licence expired", by="ops")
        command_s = time.perf_counter() - t0
        after = run()
        effect_s = time.perf_counter() - t0
        assert after == {"R00003": "policy-x"}
        candidates = p.store.get(p.db.run(batch).candidates_key).decode()
        assert "R00000" not in candidates and "R00007" not in candidates
        matching = json.loads(p.store.get(f"{run_folder_of(batch)}/matching.json"))
        assert matching["controls"]["disabled_banks"] == ["partner"] and matching["n_removed_references"] == 2
        print(f"\nFIGURE disable: command {command_s * 1000:.0f} ms; next run (3 queries) done "
              f"{effect_s:.1f} s after the command, with no pair from the disabled reference or bank")

        # The next index build folds the removal list in: the disabled references leave the index proper.
        rebuilt = build_reference_index(p, StoreSource(p.settings, "references/"))
        assert rebuilt.version != built.version
        held = json.loads(p.registry.load(Kind.INDEX, rebuilt, "held_out.json"))
        ids = json.loads(p.registry.load(Kind.INDEX, rebuilt, "ids.json"))["ids"]
        assert sorted(held) == ["R00000", "R00007"] and not set(held) & set(ids)
        assert run() == {"R00003": "policy-x"}

        t0 = time.perf_counter()
        rc.set_reference_enabled(p.db, "R00000", True, "takedown withdrawn", by="ops")
        rc.set_bank_enabled(p.db, "partner", True, "licence renewed", by="ops")
        assert run() == {"R00007": "partner", "R00003": "policy-x", "R00000": "default"}  # no rebuild needed
        print(f"FIGURE enable after a rebuild held them out: back {time.perf_counter() - t0:.1f} s after the "
              "command (the next run)")
        summary = {b["bank"]: b for b in rc.bank_summaries(p.db)}
        assert summary["partner"]["enabled"] and summary["partner"]["flagged"] == 1
        assert [e["action"] for e in rc.control_log(p.db)] == ["enable", "enable", "disable", "disable"]


def test_embedded_sqlite_has_the_same_controls_through_the_cli(tmp_path, monkeypatch, capsys):
    from moderation.cli import main
    from moderation.db import connect

    monkeypatch.setenv("MODERATION_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MODERATION_DATABASE_URL", raising=False)
    monkeypatch.delenv("MODERATION_STORE_URL", raising=False)
    (tmp_path / "home").mkdir(exist_ok=True)
    db = connect(f"sqlite:///{tmp_path / 'home' / 'moderation.db'}")
    rc.register_banks(db, {"default": 2, "partner": 1}, "i1")
    assert main(["bank", "disable", "partner", "--why", "licence expired", "--by", "ops"]) == 0
    assert main(["reference", "policy", "r1", "strict", "--min-inliers", "30", "--why", "a logo", "--by", "ops"]) == 0
    assert main(["bank", "disable", "nope", "--why", "typo", "--by", "ops"]) == 1  # unknown bank
    assert main(["bank", "enable", "partner", "--why", "", "--by", "ops"]) == 1  # no reason
    capsys.readouterr()
    assert main(["bank", "list"]) == 0
    listed = {b["bank"]: b["enabled"] for b in json.loads(capsys.readouterr().out)}
    assert listed == {"default": True, "partner": False}
    controls = rc.read_controls(db)
    assert controls.disabled_banks == {"partner"}
    assert controls.policies == {"r1": rc.ReferencePolicy(rc.Policy.STRICT, 30)}
    assert controls.removed({"a": "partner", "b": "default"}) == {"a"}
    db.engine.dispose()
