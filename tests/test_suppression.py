"""False-positive suppression on Postgres, through the real matching job: a rejected pair is not flagged
again (rerun, other batch, same bytes under another name), a reference's strict / suppress policy, and
nothing disappears silently (suppressed.csv)."""

from __future__ import annotations

import csv
import io
import shutil

from review_support import fresh_pg_database, local_pipeline, settings_from, torch_single_thread  # noqa: F401

from moderation import reference_controls as rc
from moderation import review
from moderation.embedding import FolderSource
from moderation.jobs import Pipeline, run_folder_of, run_matching

QUERIES = {"Q00006": "R00007", "Q00009": "R00003", "Q00001": "R00000"}  # copies and their source


def _pending(p, batch: str) -> set[tuple[str, str]]:
    run_id = p.db.run(batch).id
    return {(x["query_id"], x["reference_id"]) for x in review.pending(p.db, limit=1000) if x["run_id"] == run_id}


def _suppressed(p, batch: str) -> dict[tuple[str, str], str]:
    rows = csv.DictReader(io.StringIO(p.store.get(f"{run_folder_of(batch)}/suppressed.csv").decode()))
    return {(r["query_id"], r["reference_id"]): r["reason"] for r in rows}


def test_a_rejected_pair_is_not_flagged_again_and_policies_apply(tmp_path):
    with fresh_pg_database() as url:
        # A fixed threshold: this test is about suppression, not about calibration.
        env, samples = local_pipeline(tmp_path / "home", url, MODERATION_EVIDENCE="false",
                                      MODERATION_VERIFY_WORKERS="0", MODERATION_THRESHOLD="0.25")
        day1, day2 = tmp_path / "day1", tmp_path / "day2"
        day1.mkdir(), day2.mkdir()
        for q in QUERIES:
            shutil.copy(samples.queries / f"{q}.jpg", day1 / f"{q}.jpg")
            shutil.copy(samples.queries / f"{q}.jpg", day2 / f"renamed-{q}.jpg")  # same bytes, other name
        p = Pipeline.open(settings_from(env))
        try:
            run_matching(p, FolderSource(day1), "day-1")
            run_matching(p, FolderSource(day2), "day-2")
            assert _pending(p, "day-1") == set(QUERIES.items())
            assert ("renamed-Q00006", "R00007") in _pending(p, "day-2")

            [pair] = [x for x in review.pending(p.db, limit=100)
                      if (x["batch"], x["query_id"]) == ("day-1", "Q00006")]
            review.claim_pair(p.db, "mo", pair["pair_id"])
            review.decide(p.db, pair["pair_id"], "mo", "rejected", note="same layout, different picture")
            assert pair["bank"] == "default" and review.pair_details(p.db, pair["pair_id"])["bank"] == "default"

            # Rerun of the batch that was decided: the rejected pair stays as it was, nothing new comes.
            run_matching(p, FolderSource(day1), "day-1")
            assert _pending(p, "day-1") == {("Q00009", "R00003"), ("Q00001", "R00000")}
            assert review.pair_details(p.db, pair["pair_id"])["state"] == "rejected"
            assert _suppressed(p, "day-1") == {("Q00006", "R00007"): "rejected_before"}
            # Rerun of another batch holding the same bytes: its undecided pair goes.
            run_matching(p, FolderSource(day2), "day-2")
            assert ("renamed-Q00006", "R00007") not in _pending(p, "day-2")
            assert _suppressed(p, "day-2") == {("renamed-Q00006", "R00007"): "rejected_before"}
            # A later batch with the same bytes: not flagged either.
            summary = run_matching(p, FolderSource(day2), "day-3")
            assert ("renamed-Q00006", "R00007") not in _pending(p, "day-3") and summary.n_suppressed == 1

            # The references with rejections, for the operator to decide on.
            [worst] = rc.reference_rejections(p.db)
            assert (worst["reference_id"], worst["rejected"], worst["policy"]) == ("R00007", 1, "normal")

            # Policies: suppress drops every pair of a reference, strict needs the inliers.
            rc.set_reference_policy(p.db, "R00003", rc.Policy.SUPPRESS, "a meme frame", by="ops")
            rc.set_reference_policy(p.db, "R00000", rc.Policy.STRICT, "a template", min_inliers=100_000, by="ops")
            run_matching(p, FolderSource(day2), "day-3")
            assert _pending(p, "day-3") == set()
            reasons = _suppressed(p, "day-3")
            assert reasons == {("renamed-Q00006", "R00007"): "rejected_before",
                               ("renamed-Q00009", "R00003"): "reference_suppressed",
                               ("renamed-Q00001", "R00000"): "strict_reference"}
            rc.set_reference_policy(p.db, "R00000", rc.Policy.STRICT, "a template, sane bar", min_inliers=8,
                                    by="ops")
            rc.set_reference_policy(p.db, "R00003", rc.Policy.NORMAL, "not a meme after all", by="ops")
            run_matching(p, FolderSource(day2), "day-3")
            assert _pending(p, "day-3") == {("renamed-Q00009", "R00003"), ("renamed-Q00001", "R00000")}

            # Undoing the rejection lifts it at the next run.
            review.undo(p.db, "mo")
            review.release(p.db, "mo")
            run_matching(p, FolderSource(day2), "day-3")
            assert ("renamed-Q00006", "R00007") in _pending(p, "day-3")
            by_bank = {b["bank"]: b for b in rc.bank_summaries(p.db)}
            assert by_bank["default"]["flagged"] >= 6 and by_bank["default"]["rejected"] == 0
        finally:
            p.db.engine.dispose()
