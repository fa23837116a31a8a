"""The calibration that ships with the default model: fitted on bench-dev/extra/, reported on queries/.

A match run with no calibration of its own flags at a threshold that ships
with the model, if one was fitted for its matching settings and the
statistics' post-processing (``moderation/thresholds.py``). This script fits
it with the pipeline's own jobs and the one evaluation protocol:

1. background statistics on ``bench-dev/background/``, the reference index
   on ``bench-dev/references/`` (a throwaway home, the shipped default model);
2. the 90 % (and 99 %) precision thresholds, fitted on ``bench-dev/extra/``
   (642 labelled queries) with the matching settings of ``--stage``;
3. that fit applied to ``bench-dev/queries/`` (214 queries, never used for
   fitting): how many pairs it flags and at what precision, beside what an
   uncalibrated run flagged there before ``moderation/thresholds.py``: the
   fixed 0.25 on the global stage's normalised score, or on the default
   rule's fused score (global + 0.01 per inlier) with verification; for the
   global stage also the model manifest's own 90 % point on queries/
   (``metrics.rp90_threshold_sn``, fitted there, in-sample, by the trainer).

Prints JSON; ``--out FILE`` writes it; ``--write`` also records the fit as a
``calibrations`` entry of ``moderation/models/default.json`` (replacing an
entry for the same stage).

Usage: .venv/bin/python benchmarks/shipped_calibration.py [--bench DIR] [--stage global|two_stage]
       [--out FILE] [--write]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from moderation.config import Settings  # noqa: E402
from moderation.embedding import FolderSource  # noqa: E402

MANIFEST = ROOT / "moderation" / "models" / "default.json"
OLD_FALLBACK = 0.25
STAGES = {"global": {"MODERATION_VERIFY": "false", "MODERATION_VIEWS": "full"}, "two_stage": {}}


def flagged(evaluation) -> dict:
    """How many pairs an evaluation's threshold flags, and their precision and recall."""
    m = evaluation.metrics
    return {"threshold": round(evaluation.fit.threshold, 5), "n_flagged": m["n_flagged"],
            "precision": None if m["flagged_precision"] is None else round(m["flagged_precision"], 4),
            "recall": round(m["flagged_recall"], 4)}


def fit_and_report(bench: Path, stage: str) -> dict:
    from moderation.evaluation import Fit, evaluate_matches, evaluate_queries
    from moderation.fusion import DEFAULT_RULE
    from moderation.jobs import Pipeline, build_reference_index, pin, refresh_stats, search_space
    from moderation.metrics import read_ground_truth

    with tempfile.TemporaryDirectory() as home:
        settings = Settings.from_env({"MODERATION_HOME": home, "MODERATION_PROGRESS": "false", **STAGES[stage]})
        p = Pipeline.open(settings)
        t0 = time.perf_counter()
        refresh_stats(p, FolderSource(bench / "background"))
        build_reference_index(p, FolderSource(bench / "references"))
        pinned = pin(p)
        space, config, _, loaded, _ = search_space(p, pinned)
        ms = loaded.settings_for(settings)
        fitted = evaluate_queries(loaded.module, FolderSource(bench / "extra" / "queries"),
                                  read_ground_truth(bench / "extra" / "ground_truth.csv"), space, ms, config)
        gt = read_ground_truth(bench / "ground_truth.csv")
        report = evaluate_queries(loaded.module, FolderSource(bench / "queries"), gt, space, ms, config,
                                  fit=fitted.fit)
        fit, m = fitted.fit, report.metrics

        def at(threshold: float, combiner=None):
            return flagged(evaluate_matches(report.matched, gt, config, fit=Fit(combiner, threshold, None, True)))

        in_sample = pinned.model.metrics.get("rp90_threshold_sn")
        compared = {"shipped_threshold": flagged(report),
                    "shipped_high_threshold": at(fit.high_threshold, fit.combiner) if fit.high_threshold else None,
                    "old_fallback_0.25": at(OLD_FALLBACK, DEFAULT_RULE if config.verify else None)}
        if not config.verify and in_sample:
            compared["manifest_rp90_threshold_sn_in_sample"] = at(in_sample)
        entry = {
            "stage": stage, "matching": config.as_dict(), "postprocess": pinned.stats.postprocess,
            "threshold": fit.threshold, "high_threshold": fit.high_threshold,
            "combiner": fit.combiner.to_dict() if fit.combiner else {}, "target_precision": 0.9,
            "target_reached": fit.reached,
            "fitted_on": f"bench-dev/extra ({fitted.metrics['n_queries']} queries), statistics on "
                         f"bench-dev/background ({pinned.stats.n_background} images)",
            "reproduce": f"python benchmarks/shipped_calibration.py --stage {stage} --write",
        }
        return {
            "model": pinned.model.version, "stage": stage, "seconds": round(time.perf_counter() - t0, 1),
            "entry": entry,
            "fit_on_extra": {k: fitted.metrics[k] for k in ("n_queries", "n_positives", "n_failed", "uap_sn",
                                                            "rp90_sn", "n_flagged", "flagged_precision",
                                                            "flagged_recall")},
            "report_on_queries": {k: m[k] for k in ("n_queries", "n_positives", "n_failed", "uap", "uap_sn",
                                                    "rp90", "rp90_sn", "recall_at_1")},
            "flagged_on_queries": compared,
        }


def write_entry(entry: dict) -> None:
    manifest = json.loads(MANIFEST.read_text())
    kept = [c for c in manifest.get("calibrations", []) if c.get("stage") != entry["stage"]]
    manifest["calibrations"] = kept + [entry]
    MANIFEST.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", type=Path, default=ROOT.parent / "shared" / "bench-dev")
    ap.add_argument("--stage", choices=sorted(STAGES), default="global")
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    ap.add_argument("--write", action="store_true", help=f"record the fit in {MANIFEST.relative_to(ROOT)}")
    args = ap.parse_args()
    if not (args.bench / "extra" / "queries").is_dir():
        sys.exit(f"bench-dev with extra/ not found at {args.bench}; pass --bench DIR")
    out = fit_and_report(args.bench, args.stage)
    text = json.dumps(out, indent=2, default=str)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    if args.write:
        write_entry(out["entry"])
        print(f"recorded in {MANIFEST}", file=sys.stderr)


if __name__ == "__main__":
    main()
