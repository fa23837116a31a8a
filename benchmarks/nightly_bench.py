"""Nightly index cost: a nightly rebuild with 1 % new references as a ratio to a full build.

Side by side in one run, on one store of synthetic JPEGs (generated here:
random shapes on random backgrounds, no photo collections):

1. ``full_cold``: the first build of ``--n`` references (empty caches:
   every image read, hashed, embedded, PDQ-hashed, described).
2. ``nightly``: ``--new-fraction`` (default 1 %) new references are added
   and the index is built again as the nightly job does (listing compared
   with the previous manifest, only the new images read, index updated in
   place).
3. ``full_warm``: the same set rebuilt with ``full=True`` (``--full``): every
   image read and hashed again, vectors from the cache, index built from
   every vector. What every night cost before change detection.

Reported per step: wall seconds, image objects and bytes read from the
store (a counting wrapper around the real store), and the ratios
nightly / full_cold and nightly / full_warm. The store is a local folder
(``file://``) and the database SQLite, so that what is measured is the
job, not a server; decoding runs in the job's process (MODERATION_WORKERS=0)
so that every read passes the counter. The model is the shipped default
descriptor registered at ``--image-size`` px (both sides use it).

Usage: nice -n 5 .venv/bin/python benchmarks/nightly_bench.py --n 10000 [--image-size 64] [--no-full-warm] [--out FILE]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from PIL import Image, ImageDraw  # noqa: E402

from moderation import embedding  # noqa: E402
from moderation.config import Settings  # noqa: E402
from moderation.embedding import FolderSource, StoreSource  # noqa: E402
from moderation.jobs import Pipeline, build_reference_index, refresh_stats  # noqa: E402
from moderation.model_versions import SHIPPED_DIR, import_torchscript  # noqa: E402
from moderation.store import open_store  # noqa: E402
from store_wrappers import PassThrough  # noqa: E402


class CountingStore(PassThrough):
    """The real store, counting what is fetched: image objects under ``references/`` and everything."""

    def __init__(self, inner):
        super().__init__(inner)
        self.reset()

    def reset(self):
        self.image_reads = self.image_bytes = self.all_reads = self.all_bytes = 0

    def get(self, key):
        data = self.inner.get(key)
        self.all_reads += 1
        self.all_bytes += len(data)
        if key.startswith("references/"):
            self.image_reads += 1
            self.image_bytes += len(data)
        return data


def synthetic_jpeg(seed: int, size: tuple[int, int]) -> bytes:
    """A random composition of shapes: distinct per seed, cheap to make."""
    rng = random.Random(seed)
    img = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    w, h = size
    for _ in range(12):
        x0, y0 = rng.randrange(w), rng.randrange(h)
        x1, y1 = x0 + rng.randrange(4, w // 2), y0 + rng.randrange(4, h // 2)
        colour = tuple(rng.randrange(256) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return buf.getvalue()


def timed_build(p: Pipeline, store: CountingStore, source, **kwargs) -> dict:
    store.reset()
    t0 = time.perf_counter()
    version = build_reference_index(p, source, **kwargs)
    secs = time.perf_counter() - t0
    return {"seconds": round(secs, 2), "version": version.version, "count": version.count,
            "build": version.info.get("build"), "changes": version.info.get("changes"),
            "image_objects_read": store.image_reads, "image_bytes_read": store.image_bytes,
            "store_objects_read": store.all_reads, "store_bytes_read": store.all_bytes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000, help="references in the full build")
    ap.add_argument("--new-fraction", type=float, default=0.01, help="new references the night brings")
    ap.add_argument("--image-size", type=int, default=64, help="descriptor input size (both sides)")
    ap.add_argument("--width", type=int, default=128, help="width of the generated JPEGs (height 3/4 of it)")
    ap.add_argument("--background", type=int, default=200)
    ap.add_argument("--no-full-warm", action="store_true",
                    help="skip step 3 (the full re-read): at 100k it costs nearly as much as step 1")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="nightly-bench-") as tmp:
        home = Path(tmp)
        env = {"MODERATION_HOME": str(home), "MODERATION_WORKERS": "0", "MODERATION_PROGRESS": "false",
               "MODERATION_DEVICE": "cpu", "MODERATION_VERIFY_WORKERS": "0", "MODERATION_BATCH_SIZE": "64"}
        settings = Settings.from_env(env)
        store = CountingStore(open_store(settings))
        embedding._STORES[settings.store_url] = store  # the source's reads pass the counter too
        from moderation.db import connect

        p = Pipeline(settings, store, connect(settings.database_url))
        import_torchscript(p.registry, SHIPPED_DIR / "default.pt", name=f"bench-default-{args.image_size}px",
                           image_size=args.image_size, backbone="mobilenet_v2")
        size = (args.width, args.width * 3 // 4)
        bg = home / "background"
        bg.mkdir()
        for i in range(args.background):
            (bg / f"B{i}.jpg").write_bytes(synthetic_jpeg(10_000_000 + i, size))
        refresh_stats(p, FolderSource(bg))
        t0 = time.perf_counter()
        for i in range(args.n):
            store.inner.put(f"references/R{i:07d}.jpg", synthetic_jpeg(i, size))
        generated = time.perf_counter() - t0
        source = StoreSource(settings, "references/")
        full_cold = timed_build(p, store, source)
        n_new = max(1, round(args.n * args.new_fraction))
        for i in range(args.n, args.n + n_new):
            store.inner.put(f"references/R{i:07d}.jpg", synthetic_jpeg(i, size))
        nightly = timed_build(p, store, source)
        full_warm = None if args.no_full_warm else timed_build(p, store, source, full=True)
        p.db.engine.dispose()
    out = {"n_references": args.n, "new": n_new, "image_size": args.image_size, "jpeg_size": list(size),
           "generate_seconds": round(generated, 1), "full_cold": full_cold, "nightly": nightly,
           "full_warm": full_warm,
           "ratio_nightly_to_full_cold": round(nightly["seconds"] / full_cold["seconds"], 4),
           "ratio_nightly_to_full_warm": None if full_warm is None else round(nightly["seconds"] / full_warm["seconds"], 4),
           "loadavg_before": [round(x, 2) for x in load_before],
           "loadavg_after": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count(),
           "command": " ".join(["benchmarks/nightly_bench.py", *sys.argv[1:]])}
    print(json.dumps(out, indent=2))
    path = args.out or ROOT / "benchmarks" / "results" / f"nightly_bench_{args.n}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    warm = out["ratio_nightly_to_full_warm"]
    print(f"nightly / full build (cold caches): {out['ratio_nightly_to_full_cold']:.2%}; "
          f"nightly / full re-read (warm caches): {'skipped' if warm is None else f'{warm:.2%}'}; "
          f"image bytes read by the nightly run: {nightly['image_bytes_read']}", file=sys.stderr)


if __name__ == "__main__":
    main()
