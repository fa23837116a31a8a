"""Figures for the core pipeline (printed; copy them into the README).

1. Accuracy on ../shared/bench-dev: μAP, μAP with SN, RP90, recall@1 of the
   default pipeline (and of the ImageNet starting model), beside a PDQ
   baseline scored by the same metric code.
2. Embedding throughput from JPEG files, as a ratio to a bare batched
   forward pass of the same model on already-decoded tensors, same run.
3. Matching time for 10,000 queries against 1,000,000 x 512 synthetic
   references, as a ratio to a bare FAISS search of the same vectors, and
   peak memory.

Usage: .venv/bin/python benchmarks/pipeline_bench.py [--bench DIR] [--skip-accuracy]
       [--skip-embedding] [--skip-matching] [--n-refs 1000000] [--n-queries 10000] [--out FILE]

The accuracy figures go through ``jobs.calibrate_labelled`` (the one
evaluation protocol, ``moderation/evaluation.py``), global stage only.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from moderation.config import Settings  # noqa: E402
from moderation.embedding import FolderSource  # noqa: E402


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024


def pipeline_metrics(bench: Path, home: Path, model: str) -> dict:
    """Run stats -> index -> calibrate on bench-dev with ``model`` (imagenet | default), global stage only."""
    from moderation.jobs import Pipeline, build_reference_index, calibrate_labelled, refresh_stats
    from moderation.model_versions import MODEL_FILE, imagenet_default
    from moderation.registry import Kind

    # The global stage alone (the README's first accuracy table); benchmarks/two_stage_bench.py
    # measures the default two-stage pipeline.
    settings = Settings.from_env({"MODERATION_HOME": str(home), "MODERATION_PROGRESS": "false",
                                  "MODERATION_VERIFY": "false", "MODERATION_VIEWS": "full"})
    p = Pipeline.open(settings)
    if model == "imagenet":
        record, data = imagenet_default(settings)
        p.registry.publish(Kind.MODEL, record, {MODEL_FILE: data})
    t0 = time.perf_counter()
    refresh_stats(p, FolderSource(bench / "background"))
    build_reference_index(p, FolderSource(bench / "references"))
    _, metrics = calibrate_labelled(p, FolderSource(bench / "queries"), bench / "ground_truth.csv",
                                    store=False)
    metrics["model_version"] = p.current_model().version
    metrics["seconds"] = round(time.perf_counter() - t0, 1)
    return metrics


def pdq_metrics(bench: Path, k: int = 10) -> dict:
    """PDQ hashes, score = 1 - hamming/256, top-k references per query, the same evaluation function."""
    import pdqhash
    from PIL import Image

    from moderation.evaluation import evaluate_matches
    from moderation.images import Failure, ImageRef
    from moderation.matching import Candidate
    from moderation.metrics import read_ground_truth
    from moderation.two_stage import TwoStageConfig, TwoStageResult
    from moderation.views import ViewConfig

    def hashes(folder: Path):
        refs, bits, failures = [], [], []
        for path in sorted(folder.glob("*.jpg")):
            try:
                arr = np.asarray(Image.open(path).convert("RGB"))
            except OSError as exc:  # an undecodable query stays in N as a missed positive
                failures.append(Failure(path.stem, str(path), "unreadable", str(exc)))
                continue
            h, _quality = pdqhash.compute(arr)
            refs.append(ImageRef(path.stem, str(path), ""))
            bits.append(h.astype(bool))
        return refs, np.stack(bits), failures

    rrefs, rbits, _ = hashes(bench / "references")
    qrefs, qbits, qfail = hashes(bench / "queries")
    dist = (qbits[:, None, :] != rbits[None, :, :]).sum(-1)
    cands = []
    for i, q in enumerate(qrefs):
        for rank, j in enumerate(np.argsort(dist[i], kind="stable")[:k], 1):
            score = 1.0 - dist[i, j] / 256.0
            cands.append(Candidate(q.image_id, rrefs[j].image_id, score, score, rank))
    matched = TwoStageResult(qrefs, np.zeros((len(qrefs), 0), np.float32), cands, qfail)
    m = evaluate_matches(matched, read_ground_truth(bench / "ground_truth.csv"),
                         TwoStageConfig(views=ViewConfig(), verify=False, k=k)).metrics
    return {"uap": m["uap"], "rp90": m["rp90"], "recall_at_1": m["recall_at_1"],
            "n_positives": m["n_positives"], "n_failed": m["n_failed"]}


def embedding_throughput(bench: Path, home: Path, n_images: int = 256, repeats: int = 2) -> dict:
    """Full pipeline embed (JPEG -> vectors) vs bare forward on pre-decoded tensors."""
    import torch

    from moderation.embedding import embed
    from moderation.images import decode_image, preprocess
    from moderation.jobs import Pipeline

    settings = Settings.from_env({"MODERATION_HOME": str(home), "MODERATION_PROGRESS": "false"})
    p = Pipeline.open(settings)
    loaded = p.load(p.current_model())
    s = loaded.settings_for(settings)
    files = sorted((bench / "references").glob("*.jpg"))[:n_images]
    source = FolderSource(bench / "references")
    wanted = set(files)
    refs = [r for r in source.refs() if Path(r.location) in wanted]
    tensors = [preprocess(decode_image(f.read_bytes()), s.image_size, s.resize_mode) for f in files]
    model = loaded.module
    with torch.inference_mode():  # warm-up
        model(torch.stack(tensors[: s.batch_size]))
    bare, full = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        with torch.inference_mode():
            for i in range(0, len(tensors), s.batch_size):
                model(torch.stack(tensors[i:i + s.batch_size]))
        bare.append(len(tensors) / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        embed(model, source, s, refs=refs, cache=None)
        full.append(len(refs) / (time.perf_counter() - t0))
    return {"images": len(files), "image_size": s.image_size, "batch_size": s.batch_size,
            "workers": s.workers, "torch_threads": torch.get_num_threads(),
            "pipeline_img_per_s": round(max(full), 2), "bare_forward_img_per_s": round(max(bare), 2),
            "ratio": round(max(full) / max(bare), 3)}


def matching_time(n_refs: int, n_queries: int, dim: int = 512, n_bg: int = 10_000, k: int = 10) -> dict:
    """Our search (post-processing + top-k + SN + candidate records) vs a bare FAISS search."""
    from moderation.faiss_import import load_faiss
    from moderation.index import build_index
    from moderation.matching import MatchParams, search
    from moderation.statistics import BackgroundIndex, fit_postprocessor, l2n
    from moderation.config import Postprocess

    faiss = load_faiss()
    rng = np.random.default_rng(0)
    refs = l2n(rng.standard_normal((n_refs, dim), dtype=np.float32))
    queries = l2n(rng.standard_normal((n_queries, dim), dtype=np.float32))
    post = fit_postprocessor(l2n(rng.standard_normal((n_bg, dim), dtype=np.float32)), Postprocess.WHITEN)
    bg = BackgroundIndex(post.apply(l2n(rng.standard_normal((n_bg, dim), dtype=np.float32))))
    ref_ids = [f"R{i:07d}" for i in range(n_refs)]
    q_ids = [f"Q{i:06d}" for i in range(n_queries)]
    rss_before = peak_rss_gib()
    index = build_index(refs, ref_ids, "Flat")
    bare_index = faiss.IndexFlatIP(dim)
    bare_index.add(refs)
    times = {"bare": [], "ours": []}
    for _ in range(2):
        t0 = time.perf_counter()
        bare_index.search(queries, k)
        times["bare"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        cands = search(queries, q_ids, index, post, bg, MatchParams(k=k))
        times["ours"].append(time.perf_counter() - t0)
    assert len(cands) == n_queries * k
    bare, ours = min(times["bare"]), min(times["ours"])
    return {"n_refs": n_refs, "n_queries": n_queries, "dim": dim, "k": k,
            "bare_faiss_s": round(bare, 2), "ours_s": round(ours, 2), "ratio": round(ours / bare, 3),
            "peak_rss_gib": round(peak_rss_gib(), 2), "rss_before_index_gib": round(rss_before, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", type=Path, default=ROOT.parent / "shared" / "bench-dev")
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--skip-embedding", action="store_true")
    ap.add_argument("--skip-matching", action="store_true")
    ap.add_argument("--n-refs", type=int, default=1_000_000)
    ap.add_argument("--n-queries", type=int, default=10_000)
    ap.add_argument("--out", type=Path, help="also write the JSON here (e.g. benchmarks/results/...)")
    args = ap.parse_args()
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_accuracy:
            if not args.bench.is_dir():
                sys.exit(f"benchmark set not found at {args.bench}; pass --bench DIR")
            out["pdq"] = pdq_metrics(args.bench)
            print("PDQ:", json.dumps(out["pdq"]), flush=True)
            out["imagenet_start"] = pipeline_metrics(args.bench, Path(tmp) / "imagenet", "imagenet")
            print("ImageNet MobileNetV2 (starting model):", json.dumps(out["imagenet_start"]), flush=True)
            out["default"] = pipeline_metrics(args.bench, Path(tmp) / "default", "default")
            print("default pipeline:", json.dumps(out["default"]), flush=True)
        if not args.skip_embedding:
            out["embedding"] = embedding_throughput(args.bench, Path(tmp) / "emb")
            print("embedding:", json.dumps(out["embedding"]), flush=True)
        if not args.skip_matching:
            out["matching"] = matching_time(args.n_refs, args.n_queries)
            print("matching:", json.dumps(out["matching"]), flush=True)
    text = json.dumps(out, indent=2, default=str)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
