"""Cost model: what a deployment costs at 1M, 10M and 100M references, from measured unit costs.

Two steps, both committed:

    .venv/bin/python benchmarks/cost_model.py measure     # unit costs -> benchmarks/results/unit_costs.json
    .venv/bin/python benchmarks/cost_model.py table       # the README's cost table from the results files

``measure`` runs the library's own code on generated JPEGs (no photo collection) with the model
in force (the shipped default) and records **CPU seconds** per unit of work (process CPU time, all
threads; decoding in the main process so that nothing escapes the count), so that a machine
shared with other jobs changes the figures little:

Images: generated scenes (:func:`make_scenes`); queries are cropped, shrunk, re-encoded copies.

- reference side, per new or changed image: read + sha256 + decode + descriptor (whole image),
  PDQ hash, local features (verification);
- query side, per query: the two-stage analysis (decode once, every view through the descriptor,
  local features plain and mirrored, PDQ), and verification per candidate pair;
- storage per reference: cached vector, local features, PDQ hash.

``table`` combines them with the index figures of ``benchmarks/large_index_bench.py`` (exact and
IVF search time, bytes per reference of the index, at 10M; wall seconds on its machine's cores,
counted as CPU seconds x cores) and, where a GPU run left them
(``benchmarks/gpu_bench.py --out benchmarks/results/gpu_bench.json``), GPU throughput. A figure
that was not measured is printed as such, never guessed. The scaling rules are in
:func:`project`.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
UNIT_COSTS = RESULTS / "unit_costs.json"
LARGE_INDEX = RESULTS / "large_index_10M.json"
GPU = RESULTS / "gpu_bench.json"
SIZES = (1_000_000, 10_000_000, 100_000_000)


def _cpu() -> float:
    return time.process_time()


def make_scenes(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` photo-sized JPEGs full of corners and edges (shapes at several scales, texture, noise).

    Local-feature costs depend on how many keypoints an image has: smooth noise gives few, these
    give as many as photos do (SIFT stops at its cap), so verification is measured at its real load.
    """
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        w, h = int(rng.integers(560, 800)), int(rng.integers(420, 600))
        img = Image.new("RGB", (w, h), tuple(int(c) for c in rng.integers(0, 256, 3)))
        draw = ImageDraw.Draw(img)
        for scale in (0.5, 0.2, 0.08, 0.03):
            for _ in range(int(12 / scale ** 0.5)):
                x, y = rng.uniform(0, w), rng.uniform(0, h)
                r = rng.uniform(0.3, 1.0) * scale * max(w, h)
                colour = tuple(int(c) for c in rng.integers(0, 256, 3))
                kind = rng.integers(0, 3)
                if kind == 0:
                    draw.rectangle([x - r, y - r * rng.uniform(0.3, 1), x + r, y + r], fill=colour)
                elif kind == 1:
                    draw.ellipse([x - r, y - r * rng.uniform(0.3, 1), x + r, y + r], fill=colour)
                else:
                    pts = [(x + r * np.cos(a), y + r * np.sin(a)) for a in rng.uniform(0, 2 * np.pi, 5)]
                    draw.polygon(pts, fill=colour)
        img = img.filter(ImageFilter.GaussianBlur(0.8))
        arr = np.clip(np.asarray(img, np.float32) + rng.normal(0, 6, (h, w, 3)), 0, 255).astype(np.uint8)
        path = folder / f"scene{i:06d}.jpg"
        Image.fromarray(arr).save(path, format="JPEG", quality=88)
        paths.append(path)
    return paths


def _edited(img, rng):
    """A copy-like edit: crop 80-95 %, resize, re-encode at lower quality."""
    w, h = img.size
    f = rng.uniform(0.8, 0.95)
    cw, ch = int(w * f), int(h * f)
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return img.crop((x, y, x + cw, y + ch)).resize((int(cw * 0.8), int(ch * 0.8)))


def measure(n: int, out: Path) -> dict:
    """Measure the unit costs on ``n`` generated JPEGs (references) and ``n`` edited copies (queries)."""
    import os

    # Idle OpenMP threads would spin and be counted as work on a shared machine.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch
    from PIL import Image

    from moderation.config import Settings
    from moderation.embedding import FolderSource, embed
    from moderation.images import decode_image
    from moderation.jobs import Pipeline
    from moderation.local_features import extract
    from moderation.pdq import pdq_cache, safe_pdq
    from moderation.query_analysis import analyse_queries
    from moderation.two_stage import TwoStageConfig
    from moderation.vector_cache import Namespace
    from moderation.verification import verify_pair

    rng = np.random.default_rng(7)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        settings = Settings.from_env({"MODERATION_HOME": str(tmp / "home"), "MODERATION_PROGRESS": "false",
                                      "MODERATION_WORKERS": "0"})
        p = Pipeline.open(settings)
        loaded = p.load(p.current_model())
        s = loaded.settings_for(settings)
        config = TwoStageConfig.from_settings(settings)
        refs = make_scenes(tmp / "refs", n, seed=1)
        (tmp / "queries").mkdir()
        for path in refs:
            _edited(Image.open(path).convert("RGB"), rng).save(tmp / "queries" / path.name, quality=75)
        embed(loaded.module, FolderSource(tmp / "refs"), s, refs=FolderSource(tmp / "refs").refs()[:2])  # warm-up

        t = _cpu()
        result = embed(loaded.module, FolderSource(tmp / "refs"), s)
        embed_cpu = (_cpu() - t) / n
        images = [decode_image(path.read_bytes(), s.max_image_pixels, s.max_file_bytes) for path in refs]
        t = _cpu()
        hashes = [safe_pdq(img) for img in images]
        pdq_cpu = (_cpu() - t) / n
        t = _cpu()
        ref_features = [extract(img, config.features) for img in images]
        features_cpu = (_cpu() - t) / n
        feature_bytes = float(np.mean([len(f.to_bytes()) for f in ref_features]))

        t = _cpu()
        analysis = analyse_queries(loaded.module, FolderSource(tmp / "queries"), s, config.views, config.features,
                                   pdq_cache=pdq_cache(None, Namespace.QUERIES))
        query_cpu = (_cpu() - t) / n
        t = _cpu()
        verified = [verify_pair(q, r, mirrored_query=m, features=config.features, config=config.verifier)
                    for q, m, r in zip(analysis.features, analysis.mirrored, ref_features)]
        verify_cpu = (_cpu() - t) / n
        views_per_query = analysis.views_per_query()

    costs = {
        "images": n, "model": loaded.version, "image_size": s.image_size, "views": config.views.spec,
        "views_per_query": views_per_query, "verify_topk": config.verify_topk,
        "local_features": config.features.key(), "torch_threads": torch.get_num_threads(),
        "cpu_seconds": {"reference_embed": embed_cpu, "reference_pdq": pdq_cpu,
                        "reference_features": features_cpu, "query_analysis": query_cpu,
                        "verify_pair": verify_cpu},
        "bytes_per_reference": {"vector": int(result.vectors.shape[1]) * 4, "local_features": feature_bytes,
                                "pdq": 32 + 2},
        "sanity": {"embedded": len(result.refs), "pdq_hashes": sum(h is not None for h in hashes),
                   "pairs_verified": sum(v.verified for v in verified)},
        "machine": {"cpus": _cpus(), "python": platform.python_version(), "load_before": _load()},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(costs, indent=2) + "\n")
    return costs


def _cpus() -> int:
    import os

    return os.cpu_count() or 1


def _load() -> list[float]:
    import os

    return [round(x, 2) for x in os.getloadavg()]


def project(costs: dict, index: dict | None, gpu: dict | None, *, queries_per_day: int,
            new_fraction: float, flat_max: int = 1_000_000) -> list[dict]:
    """One row per reference count in SIZES.

    Rules (each from a measured figure, scaled linearly in what it counts):
    - nightly reference work = new references x (embed + PDQ + local features) CPU seconds; a full
      build is the same per image over all references;
    - query work per day = queries x (analysis + verify_topk x verification) CPU seconds;
    - search per day = queries x views per query x the per-search CPU seconds of the index ``auto``
      builds at that size (Flat below ``flat_max``, else the IVF default), scaled linearly from the
      large-index benchmark's size: exact search scans every vector, and the IVF default probes
      1/64 of the lists (``max(32, nlist/64)``), so it too scans a fixed share of the vectors;
    - storage: cached vector + local features + PDQ per reference, and the index's bytes per
      reference (Flat: 4 bytes a dimension; IVF: measured).
    GPU: hours of a full build's descriptor pass at ``gpu_bench.py``'s end-to-end images/s, when a
    GPU run left its JSON (not a dry run).
    """
    cpu = costs["cpu_seconds"]
    per_ref = cpu["reference_embed"] + cpu["reference_pdq"] + cpu["reference_features"]
    per_query = cpu["query_analysis"] + costs["verify_topk"] * cpu["verify_pair"]
    b = costs["bytes_per_reference"]
    # gpu_bench.py's end to end (ResNet-50 SSCD from JPEG files), the faster decoding path; a dry run is no figure.
    gpu_ips = 0.0 if not gpu or gpu.get("dry_run") else max(gpu.get("gpu_decode_ips", 0), gpu.get("cpu_decode_ips", 0))
    rows = []
    for n in SIZES:
        row = {"references": n,
               "full_build_cpu_hours": n * per_ref / 3600,
               "nightly_cpu_hours": n * new_fraction * per_ref / 3600,
               "queries_cpu_hours_per_day": queries_per_day * per_query / 3600,
               "cache_gb": n * (b["vector"] + b["local_features"] + b["pdq"]) / 1e9}
        if index:
            from moderation.index_config import auto_factory

            row["index"] = auto_factory(n, flat_max)
            exact = row["index"] == "Flat"
            per_search = index["exact_cpu_s_per_search" if exact else "ivf_cpu_s_per_search"] * n / index["references"]
            row["index_gb"] = n * (b["vector"] if exact else index["index_bytes_per_reference"]) / 1e9
            row["search_cpu_hours_per_day"] = queries_per_day * costs["views_per_query"] * per_search / 3600
        if gpu_ips:
            row["full_build_gpu_hours_descriptor"] = n / gpu_ips / 3600
        rows.append(row)
    return rows


def _index_figures() -> dict | None:
    """Per-search CPU seconds (wall x cores) and bytes per reference at the large-index benchmark's size."""
    if not LARGE_INDEX.exists():
        return None
    data = json.loads(LARGE_INDEX.read_text())
    cores = data.get("cpu_count", 1)
    default = data["configs"]["default"]
    at = default["at"]["auto_nprobe"]  # the nprobe the library uses, not the one tuned on the synthetic data
    exact = data["exact"]
    return {"references": data["n"], "factory": f"{default['factory']} (nprobe {at['nprobe']})",
            "index_bytes_per_reference": default["index_bytes"] / data["n"],
            "exact_cpu_s_per_search": exact["exact_search_s"] / exact["exact_queries"] * cores,
            "ivf_cpu_s_per_search": at["search_s"] / at["queries"] * cores}


def table(queries_per_day: int, new_fraction: float) -> str:
    costs = json.loads(UNIT_COSTS.read_text())
    index = _index_figures()
    gpu = json.loads(GPU.read_text()) if GPU.exists() else None
    rows = project(costs, index, gpu, queries_per_day=queries_per_day, new_fraction=new_fraction)
    cpu = costs["cpu_seconds"]
    lines = [f"Unit costs (CPU seconds; {costs['model']} at {costs['image_size']} px, views "
             f"{costs['views']} = {costs['views_per_query']:.1f} per query, {costs['local_features']}):",
             *(f"- {k}: {v * 1000:.1f} ms" for k, v in cpu.items()),
             *([f"- search at {index['references']:,} references: exact {index['exact_cpu_s_per_search'] * 1000:.0f} ms, "
                f"{index['factory']} {index['ivf_cpu_s_per_search'] * 1000:.2f} ms"] if index else []), "",
             f"| references | full build (CPU-h) | nightly, {new_fraction:.0%} new (CPU-h) | "
             f"{queries_per_day:,} queries/day: analysis + verification (CPU-h) | index (`auto`) | "
             "search/day (CPU-h) | vectors + features + PDQ (GB) | index (GB) | full build on GPU (h) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def f(key, fmt="{:,.1f}"):
            return fmt.format(r[key]) if key in r else "not measured"
        lines.append(f"| {r['references']:,} | {f('full_build_cpu_hours', '{:,.0f}')} | {f('nightly_cpu_hours')} | "
                     f"{f('queries_cpu_hours_per_day')} | {f('index', '`{}`')} | {f('search_cpu_hours_per_day')} | "
                     f"{f('cache_gb', '{:,.0f}')} | {f('index_gb')} | {f('full_build_gpu_hours_descriptor', '{:,.2f}')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure", help="measure unit costs on generated images")
    m.add_argument("--images", type=int, default=48)
    m.add_argument("--out", type=Path, default=UNIT_COSTS)
    t = sub.add_parser("table", help="print the cost table from the results files")
    t.add_argument("--queries-per-day", type=int, default=100_000)
    t.add_argument("--new-fraction", type=float, default=0.01)
    args = ap.parse_args(argv)
    if args.cmd == "measure":
        print(json.dumps(measure(args.images, args.out), indent=2))
    else:
        print(table(args.queries_per_day, args.new_fraction))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
