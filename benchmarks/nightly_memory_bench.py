"""Peak memory of the nightly index job at a large reference count (synthetic state, the real job code).

Building the state of a deployment with ``--n`` references by embedding
``--n`` images would take days on a CPU, so the state is made directly and
the job is then run as it runs every night:

1. ``prepare``: the shipped descriptor registered at 64 px, background
   statistics from 200 generated images, and a reference vector cache
   (and PDQ hash cache) holding ``--n`` synthetic unit vectors (hashes)
   under made-up sha256s, in parts of ``--part-size``, as the embedding
   writes them. The references are listed by a synthetic source
   (key, fingerprint) that generates a JPEG only when one is read.
2. ``full``: :func:`moderation.jobs.build_reference_index` given every
   reference's sha (the way the DAG's shards hand theirs over), so nothing
   is read: the first index version is built from the vector cache,
   streamed part by part, and published with its manifest. This is also a
   full rebuild's memory.
3. ``nightly``: ``--new-fraction`` new references appear in the listing;
   the nightly build compares the listing with the manifest, reads and
   embeds only the new ones and updates the index in place.

Each step runs in its own process, which reports its peak resident memory
(``ru_maxrss``) and wall time. Local-feature verification is off
(MODERATION_VERIFY=0): its feature cache needs about 32 KB per reference,
more disk than this machine has at 10M; PDQ is on.

Usage: nice -n 5 .venv/bin/python benchmarks/nightly_memory_bench.py --n 1000000 [--out FILE]
       (at 10M, in stages: --home DIR --steps prepare, then --home DIR --steps full,nightly)
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

IMAGE_SIZE = 64
PREFIX = "synthetic/"


def env_for(home: Path) -> dict[str, str]:
    return {"MODERATION_HOME": str(home), "MODERATION_WORKERS": "0", "MODERATION_PROGRESS": "false",
            "MODERATION_DEVICE": "cpu", "MODERATION_VERIFY": "false", "MODERATION_PDQ": "true",
            "MODERATION_BATCH_SIZE": "64"}


def fake_sha(i: int) -> str:
    return hashlib.sha256(f"reference-{i}".encode()).hexdigest()


@dataclass(frozen=True)
class SyntheticSource:
    """``n`` listed references with stable fingerprints; bytes are generated only when read."""

    n: int

    def listed(self):
        from moderation.images import ImageRef

        return [ImageRef(f"R{i:08d}", f"{PREFIX}R{i:08d}.jpg", fingerprint=f"{1000 + i % 977}:v1")
                for i in range(self.n)]

    def refs(self):
        return [r.__class__(r.image_id, r.location) for r in self.listed()]

    def read(self, location: str) -> bytes:
        from nightly_bench import synthetic_jpeg

        return synthetic_jpeg(int(Path(location).stem[1:]), (128, 96))


class SyntheticHints(Mapping):
    """location -> (fingerprint, sha256) of every listed reference, computed on demand.

    What the DAG's shards hand the build after reading every reference; a
    dict of 10M entries would add about 3 GB to the measured job, which the
    DAG's first build does hold, but a nightly build does not.
    """

    def __init__(self, n: int):
        self.n = n

    def __getitem__(self, location: str) -> tuple[str, str]:
        name = Path(location).name
        if not (location.startswith(PREFIX) and name.startswith("R") and name.endswith(".jpg")):
            raise KeyError(location)
        i = int(name[1:-4])
        if not 0 <= i < self.n:
            raise KeyError(location)
        return f"{1000 + i % 977}:v1", sys.intern(fake_sha(i))  # as the caches hold it: one string

    def __iter__(self):
        return (f"{PREFIX}R{i:08d}.jpg" for i in range(self.n))

    def __len__(self) -> int:
        return self.n


def pipeline(home: Path):
    from moderation.config import Settings
    from moderation.db import connect
    from moderation.jobs import Pipeline
    from moderation.store import open_store

    settings = Settings.from_env(env_for(home))
    return Pipeline(settings, open_store(settings), connect(settings.database_url))


def step_prepare(home: Path, n: int, part_size: int) -> dict:
    import numpy as np

    from moderation.embedding import FolderSource
    from moderation.jobs import refresh_stats
    from moderation.model_versions import SHIPPED_DIR, import_torchscript
    from moderation.pdq import CACHE_MODEL
    from moderation.vector_cache import Namespace, write_part
    from nightly_bench import synthetic_jpeg

    p = pipeline(home)
    import_torchscript(p.registry, SHIPPED_DIR / "default.pt", name=f"bench-default-{IMAGE_SIZE}px",
                       image_size=IMAGE_SIZE, backbone="mobilenet_v2")
    bg = home / "background"
    bg.mkdir()
    for i in range(200):
        (bg / f"B{i}.jpg").write_bytes(synthetic_jpeg(10_000_000 + i, (128, 96)))
    refresh_stats(p, FolderSource(bg))
    model = p.current_model()
    dim = p.load(model).module(__import__("torch").zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)).shape[1]
    rng = np.random.default_rng(0)
    for s in range(0, n, part_size):
        ids = range(s, min(n, s + part_size))
        shas = [fake_sha(i) for i in ids]
        vectors = rng.standard_normal((len(shas), dim), dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        write_part(p.store, model.version, Namespace.REFERENCES, shas, vectors)
        bits = rng.integers(0, 256, (len(shas), 32)).astype(np.float32)
        rows = np.concatenate([bits, np.full((len(shas), 1), 100, np.float32)], axis=1)
        write_part(p.store, CACHE_MODEL, Namespace.REFERENCES, shas, rows)
        print(f"prepare: {min(n, s + part_size)}/{n} cached", file=sys.stderr, flush=True)
    p.db.engine.dispose()
    return {"dim": int(dim)}


def step_build(home: Path, n: int, hinted: bool) -> dict:
    from moderation.jobs import build_reference_index

    p = pipeline(home)
    source = SyntheticSource(n)
    hints = SyntheticHints(n) if hinted else None
    version = build_reference_index(p, source, hints=hints)
    del hints
    p.db.engine.dispose()
    return {"version": version.version, "count": version.count, "factory": version.factory,
            "build": version.info.get("build"), "changes": version.info.get("changes"),
            "read": version.info.get("read")}


def run_step(args, home: Path, step: str, n: int) -> dict:
    """One step in its own process: its peak RSS is its own."""
    cmd = [sys.executable, __file__, "--child", step, "--home", str(home), "--n", str(n),
           "--part-size", str(args.part_size)]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, env={**os.environ, **env_for(home)})
    out = json.loads(done.stdout.decode().strip().splitlines()[-1])
    out["wall_seconds"] = round(time.perf_counter() - t0, 1)
    print(f"{step}: {out}", file=sys.stderr, flush=True)
    return out


def trace_memory(every: float = 1.0) -> None:
    """BENCH_TRACE=1: print the resident set size and where the job is (its innermost library frame) each second."""
    import threading
    import traceback

    main_id = threading.main_thread().ident

    def sample():
        while True:
            time.sleep(every)
            rss = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
            frame = sys._current_frames().get(main_id)
            where = [f"{Path(f.filename).name}:{f.lineno}:{f.name}" for f in traceback.extract_stack(frame)
                     if "/moderation/" in f.filename][-3:] if frame else []
            print(f"trace {rss:.2f} GiB {' < '.join(reversed(where))}", file=sys.stderr, flush=True)

    threading.Thread(target=sample, daemon=True).start()


def child(args) -> None:
    t0 = time.perf_counter()
    if os.environ.get("BENCH_TRACE"):
        trace_memory()
    home = Path(args.home)
    if args.child == "prepare":
        out = step_prepare(home, args.n, args.part_size)
    else:
        out = step_build(home, args.n, hinted=args.child == "full")
    out["seconds"] = round(time.perf_counter() - t0, 1)
    out["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000, help="references already indexed")
    ap.add_argument("--new-fraction", type=float, default=0.001, help="new references the night brings")
    ap.add_argument("--part-size", type=int, default=50_000, help="vectors per cache part")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--home", type=Path, default=None,
                    help="keep the state in this folder (created) instead of a temporary one; with --steps, "
                         "a later run can take up where an earlier one stopped")
    ap.add_argument("--steps", default="prepare,full,nightly", help="which steps to run, in order")
    ap.add_argument("--child", choices=["prepare", "full", "nightly"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    load_before = os.getloadavg()
    n_new = max(1, round(args.n * args.new_fraction))
    steps = args.steps.split(",")
    with contextlib.ExitStack() as stack:
        if args.home is None:
            home = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="nightly-memory-",
                                                                        dir=os.environ.get("BENCH_TMP"))))
        else:
            home = args.home
            home.mkdir(parents=True, exist_ok=True)
        out = {"n_references": args.n, "new": n_new, "verify": False, "pdq": True}
        for step in steps:
            out[step] = run_step(args, home, step, args.n + n_new if step == "nightly" else args.n)
        out["home_bytes"] = sum(f.stat().st_size for f in home.rglob("*") if f.is_file())
    out.update({"loadavg_before": [round(x, 2) for x in load_before],
                "loadavg_after": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count(),
                "command": " ".join(["benchmarks/nightly_memory_bench.py", *sys.argv[1:]])})
    print(json.dumps(out, indent=2))
    path = args.out or ROOT / "benchmarks" / "results" / f"nightly_memory_{args.n}_{'_'.join(steps)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
