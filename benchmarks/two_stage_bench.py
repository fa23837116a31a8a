"""Two-stage matching figures on bench-dev, fitted on extra/ and reported on queries/.

Everything that is chosen (the score combiner, the 90 % and 99 % precision
thresholds of each stage) is fitted on ``bench-dev/extra/`` (642 labelled
queries) and reported on ``bench-dev/queries/`` (214 queries), which are
never used for fitting. Stages, each measured in this one run:

- ``global``: the whole query only, global descriptor + whitening + SN;
- ``views``: + query views, merged per reference by best normalised score;
- ``verify``: global stage + local-feature verification + fitted combiner;
- ``two_stage``: views + verification + fitted combiner (the default pipeline).

Printed per stage: μAP, RP90, recall@1, recall@10, recall@50 (the
candidate ceilings), precision and recall of the flagged pairs at the
threshold fitted on extra/, recall@1 by edit type, and PDQ beside them.
Costs: per query (views embedding, local features) and per verified pair,
with CPU time measured in one process.

Usage: .venv/bin/python benchmarks/two_stage_bench.py [--bench DIR] [--views SPEC] [--out FILE]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from moderation.config import DEFAULT_VIEWS, Settings  # noqa: E402
from moderation.embedding import FolderSource  # noqa: E402

ALL_VIEWS = "full,mirror,grid2,grid3,center,trim,proposals"


def edit_types(path: Path) -> dict[str, list[str]]:
    with open(path, newline="") as fh:
        return {row["query_id"]: row["ops"].split("|") for row in csv.DictReader(fh)}


def stage_report(evaluation, every, ops) -> dict:
    """A stage's figures from its evaluation (:func:`moderation.evaluation.evaluate_matches`).

    ``every`` holds all of the stage's candidates with final scores (not only
    the top 10 the evaluation scores): recall@10 and recall@50 are computed on it.
    """
    from moderation.metrics import recall_at_1, recall_at_k

    m, gt = evaluation.metrics, evaluation.ground_truth
    preds = [c.prediction() for c in every if c.query_id in gt]
    out = {"uap": round(m["uap_sn"], 4), "rp90": round(m["rp90_sn"], 4), "recall_at_1": round(m["recall_at_1"], 4),
           "recall_at_10": round(recall_at_k(preds, gt, 10), 4),
           "recall_at_50": round(recall_at_k(preds, gt, 50), 4),
           "n_positives": m["n_positives"], "n_failed": m["n_failed"],
           "threshold": round(evaluation.fit.threshold, 5), "n_flagged": m["n_flagged"],
           "flagged_precision": _round(m["flagged_precision"]), "flagged_recall": _round(m["flagged_recall"])}
    if evaluation.fit.high_threshold is not None:
        out["p99_threshold"] = round(evaluation.fit.high_threshold, 5)
        out["p99_precision"] = _round(m["high_flagged_precision"])
        out["p99_recall"] = _round(m["high_flagged_recall"])
    top10 = [c.prediction() for c in evaluation.candidates]
    by_op = {}
    for op in sorted({o for q in gt for o in ops.get(q, [])}):
        sub = {q: r for q, r in gt.items() if r is not None and op in ops.get(q, [])}
        if sub:
            by_op[op] = round(recall_at_1([p for p in top10 if p.query_id in sub], sub), 3)
    out["recall_at_1_by_edit"] = by_op
    return out


def _round(x, digits: int = 4):
    return None if x is None else round(x, digits)


def save_analysis(path: Path, a, timing: dict) -> None:
    """A QueryAnalysis as plain arrays (no pickle), to rerun the cheap stages without re-embedding."""
    import numpy as np

    feats = {}
    for tag, items in (("f", a.features), ("m", a.mirrored)):
        counts = np.array([len(f) for f in items], np.int64)
        feats[f"{tag}_counts"] = counts
        feats[f"{tag}_points"] = np.concatenate([f.points for f in items]) if items else np.zeros((0, 2))
        feats[f"{tag}_desc"] = np.concatenate([f.descriptors for f in items]) if items else np.zeros((0, 128))
        feats[f"{tag}_sizes"] = np.array([(f.width, f.height) for f in items], np.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, vectors=a.vectors, owner=a.owner, view_names=np.array(a.view_names), full=a.full,
             ids=np.array([r.image_id for r in a.refs]), locations=np.array([r.location for r in a.refs]),
             shas=np.array([r.sha256 for r in a.refs]), timing=np.array(json.dumps(timing)), **feats)


def load_analysis(path: Path):
    import numpy as np

    from moderation.images import ImageRef
    from moderation.local_features import LocalFeatures
    from moderation.query_analysis import QueryAnalysis

    z = np.load(path, allow_pickle=False)
    refs = [ImageRef(str(i), str(loc), str(s)) for i, loc, s in zip(z["ids"], z["locations"], z["shas"])]
    lists = {}
    for tag in ("f", "m"):
        ends = np.cumsum(z[f"{tag}_counts"])
        starts = ends - z[f"{tag}_counts"]
        lists[tag] = [LocalFeatures(z[f"{tag}_points"][a:b].astype(np.float32), z[f"{tag}_desc"][a:b].astype(np.uint8),
                                    int(w), int(h)) for a, b, (w, h) in zip(starts, ends, z[f"{tag}_sizes"])]
    analysis = QueryAnalysis(refs, z["vectors"], z["owner"], [str(n) for n in z["view_names"]], z["full"],
                             lists["f"], lists["m"], [])
    return analysis, json.loads(str(z["timing"]))


def ablation(analysis, gt, ms, full, index, post, bg, refs_feats, memo) -> dict:
    """View sets and verification budgets, fitted and measured on extra/ alone (model selection)."""
    from moderation.evaluation import evaluate_matches
    from moderation.metrics import Prediction, recall_at_k
    from moderation.two_stage import match_analysis
    from moderation.views import ViewConfig

    specs = ["full", "full,mirror", "full,mirror,grid2", "full,mirror,grid2,center",
             "full,mirror,grid2,center,trim", "full,mirror,grid2,center,proposals",
             "full,mirror,grid2,center,trim,proposals", "full,grid2,center,trim,proposals",
             "full,mirror,grid2,grid3", ALL_VIEWS, full.views.spec]
    rows = {}
    variants = [(spec, 10, full.crop_penalty) for spec in dict.fromkeys(specs)]
    variants += [(full.views.spec, 20, full.crop_penalty)]
    variants += [(full.views.spec, 10, pen) for pen in (0.0, 0.03, 0.06, 0.1) if pen != full.crop_penalty]
    for spec, topk, penalty in variants:
        cfg = replace(full, views=ViewConfig.parse(spec), verify_topk=topk, crop_penalty=penalty)
        res = match_analysis(analysis, ms, cfg, index, post, bg, reference_features=refs_feats.get,
                             keep_all=True, memo=memo)
        fused = evaluate_matches(res, gt, cfg)
        views = sum(1 for n in analysis.view_names if n.split("_", 1)[0] in spec.split(",")) / len(analysis.refs)
        key = f"{spec} | verify top-{topk} | crop penalty {penalty}"
        rows[key] = {
            "views_per_query": round(views, 2),
            "recall_at_10_global": round(recall_at_k([Prediction(c.query_id, c.reference_id, c.global_score)
                                                      for c in res.candidates], gt, 10), 4),
            "uap": round(fused.metrics["uap_sn"], 4), "rp90": round(fused.metrics["rp90_sn"], 4),
            "recall_at_1": round(fused.metrics["recall_at_1"], 4),
            "recall_at_10_final": round(recall_at_k([c.prediction() for c in fused.candidates], gt, 10), 4)}
        print("ablation:", key, json.dumps(rows[key]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", type=Path, default=ROOT.parent / "shared" / "bench-dev")
    ap.add_argument("--views", default=DEFAULT_VIEWS, help="the views of the two-stage pipeline measured")
    ap.add_argument("--analyse-views", default=ALL_VIEWS,
                    help="the views computed once per query (a superset of --views; the ablation uses them)")
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    ap.add_argument("--skip-pdq", action="store_true")
    ap.add_argument("--cache", type=Path, help="keep the query analyses (views' vectors, local features) in "
                    "this folder and reuse them on the next run with the same --views")
    ap.add_argument("--ablation", action="store_true", help="also compare view sets and candidate budgets, "
                    "fitted and measured on extra/ only (how the defaults were chosen)")
    args = ap.parse_args()
    bench = args.bench
    if not (bench / "extra" / "queries").is_dir():
        sys.exit(f"bench-dev with extra/ not found at {bench}; pass --bench DIR")

    from moderation.evaluation import evaluate_matches
    from moderation.jobs import Pipeline, build_reference_index, refresh_stats
    from moderation.local_features import FeatureCache
    from moderation.metrics import read_ground_truth
    from moderation.query_analysis import analyse_queries
    from moderation.reference_features import ReferenceFeatures
    from moderation.two_stage import TwoStageConfig, match_analysis, rescore
    from moderation.verification import verify_many, QueryTask
    from moderation.views import ViewConfig

    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings.from_env({"MODERATION_HOME": tmp, "MODERATION_PROGRESS": "false",
                                      "MODERATION_VIEWS": args.views})
        p = Pipeline.open(settings)
        t0 = time.perf_counter()
        refresh_stats(p, FolderSource(bench / "background"))
        t_stats = time.perf_counter() - t0
        t0 = time.perf_counter()
        index_record = build_reference_index(p, FolderSource(bench / "references"))
        t_index = time.perf_counter() - t0
        from moderation.jobs import pin

        pinned = pin(p)
        loaded = p.load(pinned.model)
        post, bg = p.load_stats(pinned.stats)
        index, locations = p.load_index(pinned.index)
        full = TwoStageConfig.from_settings(settings)
        ms = loaded.settings_for(settings)
        refs_feats = ReferenceFeatures(FeatureCache(p.store, full.features), p.index_shas(pinned.index), locations)
        n_refs = len(locations)
        feat_bytes = sum(len(p.store.get(k)) for k in p.store.list(f"features/{full.features.key()}/"))
        out["setup"] = {"stats_s": round(t_stats, 1), "index_with_features_s": round(t_index, 1),
                        "references": n_refs, "features_bytes_per_reference": round(feat_bytes / n_refs),
                        "views": args.views, "model": pinned.model.version,
                        "index_info": {k: v for k, v in index_record.info.items() if k != "failures"}}
        print("setup:", json.dumps(out["setup"]), flush=True)

        analyses, timing = {}, {}
        for name, folder in (("extra", bench / "extra" / "queries"), ("queries", bench / "queries")):
            analysed_views = ViewConfig.parse(args.analyse_views)
            cached = args.cache / f"analysis-{name}-{analysed_views.spec}-{full.features.key()}.npz" \
                if args.cache else None
            if cached is not None and cached.exists():
                analyses[name], timing[name] = load_analysis(cached)
                print(f"analysis of {name} from {cached}", flush=True)
                continue
            t0 = time.perf_counter()
            analyses[name] = analyse_queries(loaded.module, FolderSource(folder), ms, analysed_views, full.features)
            timing[name] = {"wall_s": time.perf_counter() - t0, "n": len(analyses[name].refs),
                            "views_per_query": round(analyses[name].views_per_query(), 2),
                            "views": analysed_views.spec}
            print(f"analysed {name}:", json.dumps(timing[name]), flush=True)
            if cached is not None:
                save_analysis(cached, analyses[name], timing[name])
        gts = {"extra": read_ground_truth(bench / "extra" / "ground_truth.csv"),
               "queries": read_ground_truth(bench / "ground_truth.csv")}
        ops = edit_types(bench / "ground_truth_ops.csv")

        stages = {
            "global": replace(full, views=ViewConfig(), verify=False, k=50),
            "views": replace(full, verify=False, k=50),
            "verify": replace(full, views=ViewConfig()),
            "two_stage": full,
        }
        memo = {"extra": {}, "queries": {}}
        results: dict = {}
        for stage, cfg in stages.items():
            res = {}
            for name in ("extra", "queries"):
                res[name] = match_analysis(analyses[name], ms, cfg, index, post, bg,
                                           reference_features=refs_feats.get, keep_all=True, memo=memo[name])
            # Fitted on extra/ (combiner, 90 % and 99 % thresholds), applied to and reported on queries/.
            fitted = evaluate_matches(res["extra"], gts["extra"], cfg, k=10)
            report = evaluate_matches(res["queries"], gts["queries"], cfg, k=10, fit=fitted.fit)
            every = {name: rescore(res[name].candidates, fitted.fit.combiner) if cfg.verify else res[name].candidates
                     for name in ("extra", "queries")}
            combiner = fitted.fit.combiner.to_dict() if cfg.verify else None
            report_cands = every["queries"]
            results[stage] = stage_report(report, every["queries"], ops)
            results[stage]["fit_on_extra"] = {k: v for k, v in stage_report(fitted, every["extra"], {}).items()
                                              if k != "recall_at_1_by_edit"}
            if combiner:
                results[stage]["combiner"] = combiner
            print(f"{stage}:", json.dumps(results[stage]), flush=True)
        out["stages"] = results

        if args.ablation:
            out["ablation_on_extra"] = ablation(analyses["extra"], gts["extra"], ms, full, index, post, bg,
                                                refs_feats, memo["extra"])

        # Costs: CPU time of one process, on the report queries.
        a = analyses["queries"]
        out["cost"] = {}
        import resource

        def cpu_s() -> float:
            own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
            return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

        # Per-query cost of the query side, side by side in this run: the whole image alone
        # (global stage) against the pipeline's views with local features.
        for label, views, feats in (("global_only", ViewConfig(), None), ("two_stage", full.views, full.features)):
            t0, c0 = time.perf_counter(), cpu_s()
            done = analyse_queries(loaded.module, FolderSource(bench / "queries"), ms, views, feats)
            n = len(done.refs)
            out["cost"][f"{label}_query_side_wall_ms"] = round(1000 * (time.perf_counter() - t0) / n, 1)
            out["cost"][f"{label}_query_side_cpu_ms"] = round(1000 * (cpu_s() - c0) / n, 1)
            out["cost"][f"{label}_views_per_query"] = round(done.views_per_query(), 2)
        from moderation.local_features import extract
        from moderation.images import decode_image

        files = sorted((bench / "queries").glob("*.jpg"))[:40]
        imgs = [decode_image(f.read_bytes()) for f in files]
        c0 = time.process_time()
        for img in imgs:
            extract(img, full.features)
            extract(img, full.features, mirror=True)
        out["cost"]["query_features_cpu_ms"] = round(1000 * (time.process_time() - c0) / len(imgs), 1)
        from moderation.reference_features import features_of_bytes

        ref_files = sorted((bench / "references").glob("*.jpg"))[:40]
        c0 = time.process_time()
        for f in ref_files:
            features_of_bytes(f.read_bytes(), full.features, settings.max_image_pixels, settings.max_file_bytes)
        out["cost"]["reference_features_cpu_ms"] = round(1000 * (time.process_time() - c0) / len(ref_files), 1)
        cands = [c for c in report_cands if c.rank <= full.verify_topk]
        pos = {r.image_id: i for i, r in enumerate(a.refs)}
        by_q: dict = {}
        for c in cands:
            by_q.setdefault(c.query_id, []).append(c.reference_id)
        tasks = [QueryTask(q, a.features[pos[q]], a.mirrored[pos[q]], tuple((r, refs_feats.get(r)) for r in rs))
                 for q, rs in list(by_q.items())[:60]]
        c0 = time.process_time()
        verify_many(tasks, full.features, full.verifier, workers=0)
        cpu = time.process_time() - c0
        n_pairs = sum(len(t.references) for t in tasks)
        out["cost"]["verify_cpu_ms_per_query"] = round(1000 * cpu / len(tasks), 1)
        out["cost"]["verify_cpu_ms_per_pair"] = round(1000 * cpu / n_pairs, 2)
        print("cost:", json.dumps(out["cost"]), flush=True)

        if not args.skip_pdq:
            from benchmarks.pipeline_bench import pdq_metrics

            out["pdq"] = pdq_metrics(bench)
            print("PDQ:", json.dumps(out["pdq"]), flush=True)
    text = json.dumps(out, indent=2, default=str)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
