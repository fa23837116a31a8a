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

Usage: .venv/bin/python benchmarks/pdq_bench.py [--n-refs 1000000] [--n-queries 10000]
       [--bench /work/shared/bench-dev] [--candidates FILE --threshold T] [--skip-synthetic]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from moderation.pdq import BYTES, PdqHash, PdqIndex, compute_pdq  # noqa: E402


def synthetic(n_refs: int, n_queries: int, planted: int, radius: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 256, (n_refs, BYTES), dtype=np.uint8)
    queries = rng.integers(0, 256, (n_queries, BYTES), dtype=np.uint8)
    targets = rng.choice(n_refs, planted, replace=False)
    flips = rng.integers(0, 41, planted)  # 0..40 bits: some inside the radius, some outside
    for q, (t, f) in enumerate(zip(targets, flips)):
        bits = np.unpackbits(codes[t])
        bits[rng.choice(256, f, replace=False)] ^= 1
        queries[q] = np.packbits(bits)
    index = PdqIndex([str(i) for i in range(n_refs)], codes, np.full(n_refs, 100, np.int16))
    qs = [(str(q), PdqHash(queries[q].tobytes(), 100)) for q in range(n_queries)]
    out = {"n_refs": n_refs, "n_queries": n_queries, "planted": planted, "radius": radius}
    for name, flat_below in (("flat", n_refs + 1), ("multihash", 0)):
        index._index = None
        t0 = time.perf_counter()
        index.faiss_index(flat_below=flat_below)
        built = time.perf_counter() - t0
        t0 = time.perf_counter()
        hits = index.search(qs, radius, 50)
        secs = time.perf_counter() - t0
        found = {(int(m.query_id), int(m.reference_id)) for m in hits}
        inside = [(q, int(t)) for q, (t, f) in enumerate(zip(targets, flips)) if f <= radius]
        recall = sum(1 for pair in inside if pair in found) / max(1, len(inside))
        out[name] = {"build_s": round(built, 2), "search_s": round(secs, 2),
                     "s_per_10k_queries": round(secs * 10_000 / n_queries, 2),
                     "planted_within_radius": len(inside), "recall_at_radius": recall,
                     "matches": len(hits)}
        print(name, json.dumps(out[name]), flush=True)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-refs", type=int, default=1_000_000)
    ap.add_argument("--n-queries", type=int, default=10_000)
    ap.add_argument("--planted", type=int, default=1000)
    ap.add_argument("--max-distance", type=int, default=31)
    ap.add_argument("--min-quality", type=int, default=50)
    ap.add_argument("--bench", type=Path)
    ap.add_argument("--candidates", type=Path, help="candidates.csv of a descriptor run on --bench queries/")
    ap.add_argument("--threshold", type=float)
    ap.add_argument("--skip-synthetic", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "pdq_bench.json")
    args = ap.parse_args()
    result = {}
    if not args.skip_synthetic:
        result["synthetic"] = synthetic(args.n_refs, args.n_queries, args.planted, args.max_distance)
    if args.bench:
        result["bench_dev"] = bench_dev(args.bench, args.max_distance, args.min_quality, args.candidates,
                                        args.threshold)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
