"""Large reference indexes: build and search N x 512 synthetic vectors without holding them in memory.

For the default large-index configuration (``auto``, which is IVF + SQ8 at
these sizes; see moderation/index_config.py) and one alternative (IVF + PQ64,
a tenth of the memory), it measures: build time (the generator's own time
subtracted), index file size, peak RSS of the build process (a subprocess of
its own, ru_maxrss), recall@10 against exact search and recall@1 of the
planted copy on a sample of queries, and the time of 10,000 queries beside
exact search time.

The data (``Synthetic``): every chunk of CHUNK rows is generated from
(seed, chunk number) alone, so any pass regenerates the same vectors and no
pass holds more than one chunk. A reference is a point of a mixture of
CLUSTERS Gaussian clusters in a LATENT-dimensional subspace (a random
orthonormal basis of R^512), plus isotropic noise in all 512 dimensions,
L2-normalised: low intrinsic dimension with neighbourhoods, as descriptors
of images have, where isotropic random vectors would make every point
equidistant and ANN recall meaningless. A query is a planted copy: a
reference (the source) plus noise, renormalised (cosine about 0.8 to its
source, as an edited copy's descriptor). Sources are drawn uniformly from
the rows of a few randomly chosen chunks (chunks are identically
distributed, so this is a uniform draw that regenerates few chunks).

Queries: 10,000 evaluation queries (timed); the first --recall-sample of
them carry exact top-10 ground truth for recall. A separate set of tuning
queries (another seed) carries ground truth for the nprobe sweep; the
nprobe picked on them is then reported on the evaluation queries, never
tuned on them. Exact search time: FAISS exact inner-product search (BLAS)
of the ground-truth queries over every chunk, the generator's time
excluded, scaled linearly to 10,000 queries (stated in the output).

Usage (figures in README "Large indexes"):
  nice -n 5 .venv/bin/python benchmarks/large_index_bench.py --n 10000000 \\
      --out benchmarks/results/large_index_10M.json
  nice -n 10 .venv/bin/python benchmarks/large_index_bench.py --n 1000000 --configs default,Flat \\
      --out benchmarks/results/large_index_1M.json   # where `auto` leaves Flat
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# On a shared machine OpenMP threads that spin while waiting steal the cores the others need.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

DIM = 512
CHUNK = 100_000
LATENT = 48
CLUSTERS = 4_096
CLUSTER_SPREAD = 0.6  # within-cluster spread relative to the spread of the cluster centres
NOISE = 0.35  # norm of the isotropic noise relative to the latent part's
COPY_NOISE = 0.75  # norm of a planted copy's perturbation relative to its unit-norm source
SOURCE_CHUNKS = 8
K = 10

CONFIGS = {"default": "auto", "pq64": None}  # pq64's factory takes the default's coarse quantiser


def _normalise(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


@dataclass
class Synthetic:
    """N unit vectors, regenerated chunk by chunk from a seed."""

    n: int
    seed: int = 0
    gen_seconds: float = 0.0

    def __post_init__(self):
        rng = np.random.default_rng([self.seed, 1 << 40])
        basis, _ = np.linalg.qr(rng.standard_normal((DIM, LATENT)))
        self.basis = np.ascontiguousarray(basis.T, dtype=np.float32)  # (LATENT, DIM), orthonormal rows
        self.centres = (rng.standard_normal((CLUSTERS, LATENT)) / np.sqrt(LATENT)).astype(np.float32)

    @property
    def chunks_count(self) -> int:
        return (self.n + CHUNK - 1) // CHUNK

    def chunk(self, c: int) -> np.ndarray:
        t = time.perf_counter()
        m = min(CHUNK, self.n - c * CHUNK)
        rng = np.random.default_rng([self.seed, c])
        z = self.centres[rng.integers(CLUSTERS, size=m)]
        z += rng.standard_normal((m, LATENT), dtype=np.float32) * np.float32(CLUSTER_SPREAD / np.sqrt(LATENT))
        x = z @ self.basis
        x += rng.standard_normal((m, DIM), dtype=np.float32) * np.float32(
            NOISE * np.sqrt(1 + CLUSTER_SPREAD ** 2) / np.sqrt(DIM))
        x = _normalise(x)
        self.gen_seconds += time.perf_counter() - t
        return x

    def chunks(self):
        """(vectors, ids) chunks: what ``build_index_streaming`` reads."""
        for c in range(self.chunks_count):
            yield self.chunk(c), [f"r{r}" for r in range(c * CHUNK, c * CHUNK + min(CHUNK, self.n - c * CHUNK))]

    def queries(self, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """``count`` planted copies and the row of each one's source."""
        rng = np.random.default_rng([self.seed, seed, 7])
        picked = rng.choice(self.chunks_count, size=min(SOURCE_CHUNKS, self.chunks_count), replace=False)
        rows = np.sort(rng.choice(np.concatenate(
            [np.arange(c * CHUNK, min(self.n, (c + 1) * CHUNK)) for c in picked]), size=count, replace=False))
        src = np.concatenate([self.chunk(c)[rows[(rows // CHUNK) == c] - c * CHUNK] for c in sorted(picked)])
        order = rng.permutation(count)
        rows, src = rows[order], src[order]
        noise = rng.standard_normal(src.shape, dtype=np.float32) * np.float32(COPY_NOISE / np.sqrt(DIM))
        return _normalise(src + noise), rows


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024


def _threads() -> None:
    from moderation.faiss_import import load_faiss

    load_faiss().omp_set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))


def cmd_build(args) -> dict:
    """Subprocess: stream-build one configuration, write it to a file, report time and peak RSS."""
    from moderation.index_config import IndexOptions, plan_index
    from moderation.index_stream import build_index_streaming

    _threads()
    data = Synthetic(args.n, args.seed)
    options = IndexOptions(flat_max=args.flat_max)
    factory = args.factory
    if factory == "pq64":
        coarse = plan_index(args.n, "auto", options).factory.split(",")[0]
        factory = f"{coarse},PQ64"
    t = time.perf_counter()
    index = build_index_streaming(data.chunks, args.n, factory, options)
    total = time.perf_counter() - t
    meta = index.save(args.path)
    Path(args.path + ".ids.json").write_bytes(meta)
    return {"factory": index.factory, "nprobe": index.nprobe, "build_s": round(total - data.gen_seconds, 1),
            "generator_s": round(data.gen_seconds, 1), "index_bytes": os.path.getsize(args.path),
            "build_peak_rss_gib": round(rss_gib(), 2)}


def cmd_truth(args) -> dict:
    """Subprocess: exact top-K of the tuning and sample queries by streaming over every chunk."""
    from moderation.faiss_import import load_faiss

    faiss = load_faiss()
    _threads()
    data = Synthetic(args.n, args.seed)
    qe, rows_e = data.queries(args.queries, seed=1)
    qt, _ = data.queries(args.tune_queries, seed=2)
    q = np.concatenate([qe[:args.recall_sample], qt])
    best_s = np.full((len(q), K), -np.inf, np.float32)
    best_i = np.full((len(q), K), -1, np.int64)
    search_s = 0.0
    for c in range(data.chunks_count):
        x = data.chunk(c)
        t = time.perf_counter()
        s, i = faiss.knn(q, x, K, metric=faiss.METRIC_INNER_PRODUCT)
        s_all, i_all = np.concatenate([best_s, s], 1), np.concatenate([best_i, i + c * CHUNK], 1)
        top = np.argsort(-s_all, axis=1, kind="stable")[:, :K]
        best_s, best_i = np.take_along_axis(s_all, top, 1), np.take_along_axis(i_all, top, 1)
        search_s += time.perf_counter() - t
    np.savez(args.path, eval_ids=best_i[:args.recall_sample], tune_ids=best_i[args.recall_sample:],
             eval_sources=rows_e)
    exact_r1 = float(np.mean(best_i[:args.recall_sample, 0] == rows_e[:args.recall_sample]))
    return {"exact_queries": len(q), "exact_search_s": round(search_s, 2),
            "exact_s_per_10k_queries_scaled": round(search_s * 10_000 / len(q), 1),
            "exact_recall_at_1_planted": round(exact_r1, 4), "generator_s": round(data.gen_seconds, 1)}


def recall_at_k(found: list[list[str]], truth: np.ndarray) -> float:
    hits = sum(len({f"r{j}" for j in t} & set(f)) for f, t in zip(found, truth))
    return hits / truth.size


def cmd_search(args) -> dict:
    """Subprocess: load one index (memory-mapped), sweep nprobe on tuning queries, time evaluation queries."""
    from moderation.faiss_import import load_faiss
    from moderation.index import ReferenceIndex, ivf_of
    from moderation.index_config import auto_nprobe

    _threads()
    data = Synthetic(args.n, args.seed)
    qe, rows_e = data.queries(args.queries, seed=1)
    qt, _ = data.queries(args.tune_queries, seed=2)
    truth = np.load(args.truth)
    t = time.perf_counter()
    index = ReferenceIndex.load(args.path, Path(args.path + ".ids.json").read_bytes(), mmap=args.mmap)
    load_s = time.perf_counter() - t
    ivf = ivf_of(load_faiss(), index.index)
    if ivf is None:  # Flat: exact, nothing to tune; every evaluation query timed once
        t = time.perf_counter()
        _, found = index.search(qe, K)
        search_s = time.perf_counter() - t
        s = args.recall_sample
        return {"load_s": round(load_s, 2), "mmap": args.mmap, "nlist": None, "at": {"exact": {
            "nprobe": None, "queries": len(qe), "search_s": round(search_s, 2),
            "recall_at_10_vs_exact": round(recall_at_k(found[:s], truth["eval_ids"]), 4),
            "recall_at_1_planted": round(float(np.mean([f[0] == f"r{r}" for f, r in zip(found[:s], rows_e[:s])])), 4)}},
            "search_peak_rss_gib": round(rss_gib(), 2)}
    nlist = ivf.nlist
    sweep = {}
    for nprobe in [p for p in (8, 16, 32, 64, 128, 256) if p <= nlist]:
        index.nprobe = nprobe
        t = time.perf_counter()
        _, found = index.search(qt, K)
        sweep[nprobe] = {"tune_recall_at_10": round(recall_at_k(found, truth["tune_ids"]), 4),
                         "s_per_query": (time.perf_counter() - t) / len(qt)}
    best = max(r["tune_recall_at_10"] for r in sweep.values())
    # The smallest nprobe reaching 0.95 on the tuning queries; for a configuration that never does
    # (PQ's codes cap its recall), the smallest within 0.01 of its best.
    tuned = next((p for p, r in sweep.items() if r["tune_recall_at_10"] >= min(0.95, best - 0.01)))
    report = {"load_s": round(load_s, 2), "mmap": args.mmap, "nlist": nlist, "auto_nprobe": auto_nprobe(nlist),
              "tuned_nprobe": tuned, "sweep_on_tuning_queries": sweep, "at": {}}
    s = args.recall_sample
    for label, nprobe in (("auto_nprobe", auto_nprobe(nlist)), ("tuned_nprobe", tuned)):
        # All evaluation queries are timed at the tuned nprobe; the rule's own nprobe, when it differs,
        # on the recall sample only (a second 10,000-query search costs too long on this machine).
        queries = qe if label == "tuned_nprobe" or nprobe == tuned else qe[:s]
        index.nprobe = nprobe
        t = time.perf_counter()
        _, found = index.search(queries, K)
        search_s = time.perf_counter() - t
        report["at"][label] = {
            "nprobe": nprobe, "queries": len(queries), "search_s": round(search_s, 2),
            "recall_at_10_vs_exact": round(recall_at_k(found[:s], truth["eval_ids"]), 4),
            "recall_at_1_planted": round(float(np.mean([f[0] == f"r{r}" for f, r in zip(found[:s], rows_e[:s])])), 4)}
    report["search_peak_rss_gib"] = round(rss_gib(), 2)
    return report


def _sub(argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *argv], check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", nargs="?", default="all", choices=["all", "build", "truth", "search"])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--queries", type=int, default=10_000)
    ap.add_argument("--recall-sample", type=int, default=300)
    ap.add_argument("--tune-queries", type=int, default=200)
    ap.add_argument("--flat-max", type=int, default=1_000_000, help="MODERATION_INDEX_FLAT_MAX for auto")
    ap.add_argument("--configs", default="default,pq64")
    ap.add_argument("--factory")
    ap.add_argument("--path")
    ap.add_argument("--truth")
    ap.add_argument("--mmap", action="store_true")
    ap.add_argument("--workdir", default=None, help="where index files go (default: a temporary folder)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.step != "all":
        print(json.dumps({"build": cmd_build, "truth": cmd_truth, "search": cmd_search}[args.step](args)))
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="large_index_"))
    work.mkdir(parents=True, exist_ok=True)
    common = ["--n", str(args.n), "--seed", str(args.seed), "--queries", str(args.queries),
              "--recall-sample", str(args.recall_sample), "--tune-queries", str(args.tune_queries),
              "--flat-max", str(args.flat_max)]
    result = {"n": args.n, "dim": DIM, "chunk": CHUNK, "cpu_count": os.cpu_count(),
              "generator": {"latent": LATENT, "clusters": CLUSTERS, "cluster_spread": CLUSTER_SPREAD,
                            "noise": NOISE, "copy_noise": COPY_NOISE},
              "load_before": os.getloadavg(), "configs": {}}
    t0 = time.perf_counter()
    truth = str(work / "truth.npz")
    result["exact"] = _sub(["truth", *common, "--path", truth])
    print(json.dumps(result["exact"]), flush=True)
    for name in args.configs.split(","):
        path = str(work / f"{name}.faiss")
        build = _sub(["build", *common, "--factory", CONFIGS.get(name) or name, "--path", path])
        print(name, json.dumps(build), flush=True)
        search = _sub(["search", *common, "--path", path, "--truth", truth, "--mmap"])
        print(name, json.dumps(search), flush=True)
        exact10k = result["exact"]["exact_s_per_10k_queries_scaled"]
        for at in search["at"].values():
            at["time_vs_exact"] = round(at["search_s"] * 10_000 / at["queries"] / exact10k, 4)
        result["configs"][name] = {**build, **search}
        os.remove(path)
        if args.out:  # what is measured so far survives a run cut short
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2) + "\n")
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    result["load_after"] = os.getloadavg()
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
