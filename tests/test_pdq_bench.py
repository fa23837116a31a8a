"""benchmarks/pdq_bench.py counts a run's flagged pairs by match source the way the README reports them."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def pdq_bench(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import pdq_bench

    yield pdq_bench
    del sys.modules["pdq_bench"]


def test_source_counts_splits_descriptor_pdq_and_combined(pdq_bench):
    truth = {("q1", "r1"), ("q2", "r2"), ("q3", "r3"), ("q4", "r4"), ("q5", "r5")}
    pairs = [("q1", "r1", "sscd"),   # true, descriptor only
             ("q2", "r2", "both"),   # true, both signals
             ("q3", "r3", "pdq"),    # true, PDQ only: a copy the descriptor missed
             ("q6", "r1", "sscd"),   # false, descriptor
             ("q7", "r7", "pdq")]    # false, PDQ only
    c = pdq_bench.source_counts(pairs, truth)
    assert c["copies"] == 5
    assert c["descriptor"] == {"flagged": 3, "true": 2, "false": 1, "recall": 0.4, "precision": 0.6667}
    assert c["pdq"] == {"flagged": 3, "true": 2, "false": 1, "recall": 0.4, "precision": 0.6667}
    assert c["pdq_finds_descriptor_misses"] == {"flagged": 2, "true": 1, "false": 1, "recall": 0.2,
                                                "precision": 0.5}
    assert c["descriptor_finds_pdq_misses"] == 1
    assert c["combined"] == {"flagged": 5, "true": 3, "false": 2, "recall": 0.6, "precision": 0.6}
    assert c["by_source"]["both"] == {"flagged": 1, "true": 1}


def test_source_counts_with_nothing_flagged_has_no_precision(pdq_bench):
    c = pdq_bench.source_counts([], {("q1", "r1")})
    assert c["combined"] == {"flagged": 0, "true": 0, "false": 0, "recall": 0.0, "precision": None}


@pytest.mark.parametrize("pairs, message", [
    ([("q1", "r1", "hash")], "unknown match_source"),
    ([("q1", "r1", "sscd"), ("q1", "r1", "pdq")], "flagged twice"),
])
def test_source_counts_refuses_what_a_run_cannot_flag(pdq_bench, pairs, message):
    with pytest.raises(ValueError, match=message):
        pdq_bench.source_counts(pairs, {("q1", "r1")})


def test_pipeline_mode_needs_the_bench_folder(pdq_bench, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["pdq_bench.py", "--pipeline", "--skip-synthetic"])
    with pytest.raises(SystemExit):
        pdq_bench.main()
    assert "--pipeline needs --bench DIR" in capsys.readouterr().err
