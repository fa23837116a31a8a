"""PDQ matching: speed at 1M hashes, and what it adds to the descriptor on bench-dev.

1. Synthetic: ``--n-refs`` random 256-bit hashes plus planted near
   duplicates (a reference with 0..40 bits flipped) among ``--n-queries``
   queries; time per 10k queries of a radius-31 range search for the flat
   and the multi-index-hashing FAISS binary indexes, and recall of the
   planted copies within 31 bits (must be 1.0: both are exact).
2. bench-dev (``--bench DIR``): PDQ of references/ and queries/, matches
   within ``--max-distance`` bits (both qualities >= ``--min-quality``); with
   ``--candidates CSV`` (a descriptor run's candidates, e.g. ``moderation
   match --candidates-out``) and ``--threshold``: how many true copies PDQ
   finds that the descriptor misses at that threshold, and the combined
   recall.
3. ``--pipeline`` (with ``--bench``): the library's jobs at their defaults,
   as a user runs them, in a throwaway home (local-folder store, SQLite):
   background statistics on background/, the reference index on
   references/, ``calibrate_labelled`` on extra/ (its 90 %-precision
   threshold and combiner are stored and used), then ``run_matching`` of
   queries/. The flagged pairs are read back from the review database and
   counted by their ``match_source`` (sscd, pdq, both) against queries/'
   ground truth; section 2 is then rerun on that run's candidates and
   threshold as a cross-check of the standalone hashing.

Usage: .venv/bin/python benchmarks/pdq_bench.py [--n-refs 1000000] [--n-queries 10000]
       [--bench /work/shared/bench-dev] [--candidates FILE --threshold T] [--skip-synthetic]
       [--repeats N] [--pipeline [--home DIR]]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from moderation.pdq import BYTES, PdqHash, PdqIndex, compute_pdq  # noqa: E402


def synthetic(n_refs: int, n_queries: int, planted: int, radius: int, repeats: int = 1, seed: int = 0) -> dict:
    """Build both FAISS binary indexes over the same hashes, then time their searches in alternation.

    Each of ``repeats`` rounds searches every query in both indexes, the
    order swapped every round, so that a change in the machine's load hits
    both; the figure is each index's fastest round (every round is kept).
    """
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 256, (n_refs, BYTES), dtype=np.uint8)
    queries = rng.integers(0, 256, (n_queries, BYTES), dtype=np.uint8)
    targets = rng.choice(n_refs, planted, replace=False)
    flips = rng.integers(0, 41, planted)  # 0..40 bits: some inside the radius, some outside
    for q, (t, f) in enumerate(zip(targets, flips)):
        bits = np.unpackbits(codes[t])
        bits[rng.choice(256, f, replace=False)] ^= 1
        queries[q] = np.packbits(bits)
    ids = [str(i) for i in range(n_refs)]
    quality = np.full(n_refs, 100, np.int16)
    qs = [(str(q), PdqHash(queries[q].tobytes(), 100)) for q in range(n_queries)]
    inside = [(q, int(t)) for q, (t, f) in enumerate(zip(targets, flips)) if f <= radius]
    out = {"n_refs": n_refs, "n_queries": n_queries, "planted": planted, "radius": radius, "repeats": repeats}
    indexes = {}
    for name, flat_below in (("flat", n_refs + 1), ("multihash", 0)):
        indexes[name] = PdqIndex(ids, codes, quality)
        t0 = time.perf_counter()
        indexes[name].faiss_index(flat_below=flat_below)
        out[name] = {"build_s": round(time.perf_counter() - t0, 2), "rounds_s": []}
    for round_ in range(repeats):
        for name in (("flat", "multihash") if round_ % 2 == 0 else ("multihash", "flat")):
            t0 = time.perf_counter()
            hits = indexes[name].search(qs, radius, 50)
            secs = time.perf_counter() - t0
            found = {(int(m.query_id), int(m.reference_id)) for m in hits}
            r = out[name]
            r["rounds_s"].append(round(secs, 2))
            r["load_1min"] = os.getloadavg()[0]
            r.update({"search_s": min(r["rounds_s"]),
                      "s_per_10k_queries": round(min(r["rounds_s"]) * 10_000 / n_queries, 2),
                      "planted_within_radius": len(inside),
                      "recall_at_radius": sum(1 for pair in inside if pair in found) / max(1, len(inside)),
                      "matches": len(hits)})
            print(name, json.dumps(r), flush=True)
    return out


def hashes(folder: Path) -> dict[str, PdqHash]:
    from PIL import Image

    out = {}
    for path in sorted(folder.glob("*.jpg")):
        with Image.open(path) as img:
            out[path.stem] = compute_pdq(img.convert("RGB"))
    return out


def bench_dev(bench: Path, max_distance: int, min_quality: int, candidates: Path | None,
              threshold: float | None) -> dict:
    from moderation.metrics import read_ground_truth

    gt = {q: r for q, r in read_ground_truth(bench / "ground_truth.csv").items() if r}
    t0 = time.perf_counter()
    refs, queries = hashes(bench / "references"), hashes(bench / "queries")
    hash_s = time.perf_counter() - t0
    index = PdqIndex.from_hashes(refs.items())
    hits = index.search(list(queries.items()), max_distance, min_quality)
    pdq_pairs = {(m.query_id, m.reference_id) for m in hits}
    true_pairs = {(q, r) for q, r in gt.items()}
    out = {"references": len(refs), "queries": len(queries), "copies": len(true_pairs),
           "hash_s_per_image": round(hash_s / max(1, len(refs) + len(queries)), 4),
           "low_quality_queries": sum(1 for h in queries.values() if not h.usable(min_quality)),
           "pdq_matches": len(pdq_pairs), "pdq_true": len(pdq_pairs & true_pairs),
           "pdq_false": len(pdq_pairs - true_pairs),
           "pdq_recall": round(len(pdq_pairs & true_pairs) / max(1, len(true_pairs)), 4)}
    if candidates is not None and threshold is not None:
        with open(candidates, newline="") as fh:
            flagged = {(r["query_id"], r["reference_id"]) for r in csv.DictReader(fh)
                       if float(r["score"]) >= threshold}
        sscd_true = flagged & true_pairs
        both = (flagged | pdq_pairs) & true_pairs
        out.update({"threshold": threshold, "sscd_true": len(sscd_true), "sscd_false": len(flagged - true_pairs),
                    "sscd_recall": round(len(sscd_true) / max(1, len(true_pairs)), 4),
                    "pdq_finds_sscd_misses": len((pdq_pairs & true_pairs) - flagged),
                    "sscd_finds_pdq_misses": len(sscd_true - pdq_pairs),
                    "combined_recall": round(len(both) / max(1, len(true_pairs)), 4),
                    "combined_false": len((flagged | pdq_pairs) - true_pairs)})
    print("bench-dev", json.dumps(out), flush=True)
    return out


def source_counts(pairs: Iterable[tuple[str, str, str]], truth: set[tuple[str, str]]) -> dict:
    """Counts of flagged (query, reference, match_source) pairs against the true (query, reference) pairs.

    ``match_source`` is 'sscd', 'pdq' or 'both' (``flagged_pairs.match_source``);
    the descriptor flagged a pair when it is 'sscd' or 'both', PDQ when 'pdq'
    or 'both'. Recall is over ``truth``; precision is None when nothing was
    flagged. Raises ValueError on another source or a pair flagged twice.
    """
    by_source: dict[str, set[tuple[str, str]]] = {"sscd": set(), "pdq": set(), "both": set()}
    seen: set[tuple[str, str]] = set()
    for q, r, source in pairs:
        if source not in by_source:
            raise ValueError(f"unknown match_source {source!r} for pair ({q}, {r})")
        if (q, r) in seen:
            raise ValueError(f"pair ({q}, {r}) flagged twice in one run")
        seen.add((q, r))
        by_source[source].add((q, r))

    def rates(flagged: set[tuple[str, str]]) -> dict:
        true = len(flagged & truth)
        return {"flagged": len(flagged), "true": true, "false": len(flagged) - true,
                "recall": round(true / len(truth), 4) if truth else None,
                "precision": round(true / len(flagged), 4) if flagged else None}

    descriptor = by_source["sscd"] | by_source["both"]
    pdq = by_source["pdq"] | by_source["both"]
    return {"copies": len(truth),
            "by_source": {k: {"flagged": len(v), "true": len(v & truth)} for k, v in by_source.items()},
            "descriptor": rates(descriptor), "pdq": rates(pdq),
            "pdq_finds_descriptor_misses": rates(by_source["pdq"]),
            "descriptor_finds_pdq_misses": len(by_source["sscd"] & truth),
            "combined": rates(descriptor | pdq)}


def pipeline(bench: Path, home: Path) -> dict:
    """Run the default pipeline on bench-dev in ``home`` and count its flagged pairs by match source."""
    from moderation.config import Settings
    from moderation.embedding import FolderSource
    from moderation.jobs import (Pipeline, build_reference_index, calibrate_labelled, refresh_stats,
                                 run_folder_of, run_matching)
    from moderation.metrics import read_ground_truth

    # Settings from this dict alone: the library's defaults, not whatever MODERATION_* the shell holds.
    settings = Settings.from_env({"MODERATION_HOME": str(home), "MODERATION_PROGRESS": "false"})
    p = Pipeline.open(settings)
    seconds = {}
    t0 = time.perf_counter()
    refresh_stats(p, FolderSource(bench / "background"))
    seconds["stats"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    build_reference_index(p, FolderSource(bench / "references"))
    seconds["index"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    calibration, fit_metrics = calibrate_labelled(p, FolderSource(bench / "extra" / "queries"),
                                                  bench / "extra" / "ground_truth.csv")
    seconds["calibrate_extra"] = time.perf_counter() - t0
    candidates = home / "candidates.csv"
    t0 = time.perf_counter()
    batch = "bench-dev-queries"
    summary = run_matching(p, FolderSource(bench / "queries"), batch, candidates_out=candidates)
    seconds["match_queries"] = time.perf_counter() - t0
    if summary.threshold_source != f"calibration {calibration.version}":
        raise RuntimeError(f"the run did not flag at the extra/ calibration: {summary.threshold_source}")
    truth = {(q, r) for q, r in read_ground_truth(bench / "ground_truth.csv").items() if r}
    rows = p.db.pairs(summary.run_id)
    pdq_info = json.loads(p.store.get(f"{run_folder_of(batch)}/pdq.json"))
    out = {"threshold": summary.threshold, "threshold_source": summary.threshold_source,
           "calibration_version": calibration.version, "model_version": summary.model_version,
           "fit_on_extra": {k: fit_metrics.get(k) for k in ("uap", "rp90", "n_positives", "n_queries")},
           "queries": summary.n_queries, "failed": summary.n_failed, "candidates": summary.n_candidates,
           "pdq_run": pdq_info,
           **source_counts(((r.query_id, r.reference_id, r.match_source) for r in rows), truth),
           "pdq_only_true_ranked_by_descriptor": sum(
               1 for r in rows if r.match_source == "pdq" and (r.query_id, r.reference_id) in truth and r.rank > 0),
           "seconds": {k: round(v, 1) for k, v in seconds.items()}}
    print("pipeline", json.dumps(out), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-refs", type=int, default=1_000_000)
    ap.add_argument("--n-queries", type=int, default=10_000)
    ap.add_argument("--planted", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=1, help="timed rounds per index, alternating their order")
    ap.add_argument("--max-distance", type=int, default=31)
    ap.add_argument("--min-quality", type=int, default=50)
    ap.add_argument("--bench", type=Path)
    ap.add_argument("--candidates", type=Path, help="candidates.csv of a descriptor run on --bench queries/")
    ap.add_argument("--threshold", type=float)
    ap.add_argument("--skip-synthetic", action="store_true")
    ap.add_argument("--pipeline", action="store_true",
                    help="with --bench: run the default pipeline (fit on extra/, match queries/) and count its pairs")
    ap.add_argument("--home", type=Path, help="with --pipeline: keep the run's home here (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "pdq_bench.json")
    args = ap.parse_args()
    if args.pipeline and not args.bench:
        ap.error("--pipeline needs --bench DIR (bench-dev: references/, background/, extra/, queries/)")
    if args.pipeline and (args.candidates or args.threshold is not None):
        ap.error("--pipeline makes its own candidates and threshold; leave out --candidates/--threshold")
    result: dict = {"command": " ".join(sys.argv), "load_before": os.getloadavg()}
    if not args.skip_synthetic:
        result["synthetic"] = synthetic(args.n_refs, args.n_queries, args.planted, args.max_distance, args.repeats)
    if args.bench and args.pipeline:
        with tempfile.TemporaryDirectory() as tmp:
            home = args.home or Path(tmp)
            result["pipeline"] = pipeline(args.bench, home)
            result["bench_dev"] = bench_dev(args.bench, args.max_distance, args.min_quality,
                                            home / "candidates.csv", result["pipeline"]["threshold"])
    elif args.bench:
        result["bench_dev"] = bench_dev(args.bench, args.max_distance, args.min_quality, args.candidates,
                                        args.threshold)
    result["load_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
