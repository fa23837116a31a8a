"""Retroactive matching against a full rematch of the window, side by side, on synthetic vectors.

    python benchmarks/retro_bench.py                         # 100k references, 1% new, 30 days x 1000 queries
    python benchmarks/retro_bench.py --refs 20000 --per-day 200   # quick

Synthetic descriptors (``--dim``, default 512) stand in for cached vectors:
references, background images (statistics fitted on them), and 30 days of
queries, some of which are noisy copies of old or new references. Both
sides use the library's own steps (``Postprocessor``, ``build_index``,
``matching.search`` with score normalisation, the combiner's bound):

- full rematch: whiten all references, build the index, search every
  window query, top ``k``; every candidate is one the match job would verify;
- retroactive: diff the id -> sha lists of the old and new index, whiten the
  new references, build a small index, search every window query, keep the
  candidates above the query's k-th best score of its daily run and whose
  best possible fused score reaches the threshold (what
  ``moderation.retroactive`` sends to verification).

Not timed: making the data, fitting the statistics, the daily runs' top-k
(an artifact the daily job already wrote). Verification itself is not run
(it would dominate both sides in proportion to the candidates: the
candidate ratio is its figure). Prints a Markdown table and writes
benchmarks/out/retro_bench.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from moderation.config import Postprocess  # noqa: E402
from moderation.fusion import DEFAULT_RULE  # noqa: E402
from moderation.index import build_index  # noqa: E402
from moderation.jobs import UNCALIBRATED_THRESHOLD  # noqa: E402
from moderation.matching import MatchParams, search  # noqa: E402
from moderation.retroactive import best_possible  # noqa: E402
from moderation.statistics import BackgroundIndex, fit_postprocessor  # noqa: E402


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_data(args, rng: np.random.Generator) -> dict:
    refs = unit(rng.standard_normal((args.refs, args.dim)))
    n_new = max(1, round(args.refs * args.new_fraction))
    n_queries = args.days * args.per_day
    queries = unit(rng.standard_normal((n_queries, args.dim)))
    # copies: a share of the queries are noisy versions of references, new ones included
    n_copies = round(n_queries * args.copy_fraction)
    rows = rng.choice(n_queries, n_copies, replace=False)
    sources = rng.integers(0, args.refs, n_copies)
    sources[: n_copies // 4] = rng.integers(args.refs - n_new, args.refs, n_copies // 4)
    queries[rows] = unit(refs[sources] + 0.6 * unit(rng.standard_normal((n_copies, args.dim))))
    return {"refs": refs, "ids": [f"R{i:07d}" for i in range(args.refs)], "n_new": n_new,
            "queries": queries, "qids": [f"Q{i:07d}" for i in range(n_queries)],
            "background": unit(rng.standard_normal((args.background, args.dim)))}


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--refs", type=int, default=100_000)
    ap.add_argument("--new-fraction", type=float, default=0.01)
    ap.add_argument("--days", type=int, default=30)
    ap.add_argument("--per-day", type=int, default=1000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--background", type=int, default=5000)
    ap.add_argument("--copy-fraction", type=float, default=0.02)
    ap.add_argument("--k", type=int, default=10, help="candidates per query (max of topk and verify_topk)")
    ap.add_argument("--threshold", type=float, default=UNCALIBRATED_THRESHOLD)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    d = make_data(args, rng)
    post = fit_postprocessor(d["background"], Postprocess.WHITEN)
    bg = BackgroundIndex(post.apply(d["background"]))
    params = MatchParams(k=args.k)
    n_old = args.refs - d["n_new"]
    ids, qids, queries = d["ids"], d["qids"], d["queries"]
    shas = {rid: f"{i:064x}" for i, rid in enumerate(ids)}  # the two index versions' id -> sha lists
    old_shas = {rid: shas[rid] for rid in ids[:n_old]}

    # what the daily runs left: each query's top-k against the index of the day (old references)
    old_index = build_index(post.apply(d["refs"][:n_old]), ids[:n_old])
    daily = search(queries, qids, old_index, post, bg, params)
    bars: dict[str, float] = {}
    for c in daily:
        if c.rank == args.k:
            bars[c.query_id] = c.score
    del old_index, daily

    def full():
        index = build_index(post.apply(d["refs"]), ids)
        return search(queries, qids, index, post, bg, params)

    def retro():
        new_ids = sorted(rid for rid, sha in shas.items() if old_shas.get(rid) != sha)
        pos = [int(r[1:]) for r in new_ids]
        small = build_index(post.apply(d["refs"][pos]), new_ids)
        cands = search(queries, qids, small, post, bg, params)
        cands = [c for c in cands if c.score >= bars.get(c.query_id, -np.inf)]
        reach = best_possible(DEFAULT_RULE, np.array([c.score for c in cands]), 1000)
        return cands, [c for c, r in zip(cands, reach) if r >= args.threshold], len(new_ids)

    full_cands, full_s = timed(full)
    (retro_searched, retro_verify, n_new), retro_s = timed(retro)
    # the retro pass must find what a full rematch would rank among a query's top k for a new reference
    new = set(ids[n_old:])
    full_new = {(c.query_id, c.reference_id) for c in full_cands if c.reference_id in new}
    retro_pairs = {(c.query_id, c.reference_id) for c in retro_searched}
    full_verify = [c for c, r in zip(full_cands, best_possible(DEFAULT_RULE, np.array([c.score for c in full_cands]),
                                                                1000)) if r >= args.threshold]
    result = {
        "refs": args.refs, "new_refs": n_new, "queries": len(qids), "dim": args.dim, "k": args.k,
        "full_seconds": round(full_s, 3), "retro_seconds": round(retro_s, 3),
        "time_ratio": round(retro_s / full_s, 4),
        "full_candidates": len(full_cands), "retro_candidates": len(retro_searched),
        "full_to_verify": len(full_verify), "retro_to_verify": len(retro_verify),
        "candidate_ratio": round(len(retro_verify) / max(1, len(full_verify)), 4),
        "full_rematch_pairs_with_new_refs": len(full_new),
        "of_those_found_by_retro": len(full_new & retro_pairs),
        "machine": f"{platform.machine()}, {platform.processor() or platform.system()}",
    }
    print("| side | seconds | candidates | sent to verification |\n|---|---|---|---|")
    print(f"| full rematch | {full_s:.2f} | {len(full_cands)} | {len(full_verify)} |")
    print(f"| retroactive ({n_new} new of {args.refs}) | {retro_s:.2f} | {len(retro_searched)} | "
          f"{len(retro_verify)} |")
    print(f"| ratio | {result['time_ratio']:.4f} | | {result['candidate_ratio']:.4f} |")
    print(f"full-rematch pairs with a new reference in a query's top {args.k}: {len(full_new)}, "
          f"found by the retroactive pass: {len(full_new & retro_pairs)}")
    out = REPO / "benchmarks" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "retro_bench.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
