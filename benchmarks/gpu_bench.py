"""GPU throughput in one go: ResNet-50 SSCD end to end from JPEG files, and faiss-gpu search.

Run on a GPU machine (one script, a few minutes; it prints a table and writes JSON):

    .venv/bin/python benchmarks/gpu_bench.py                       # ResNet-50, 320 px, bf16, 10M refs
    .venv/bin/python benchmarks/gpu_bench.py --dry-run             # CPU, tiny sizes (tests run this)

What it measures, all on the same generated JPEG files (made in code, no photo collection):

1. **bare forward**: the model on a batch already on the device (random pixels): the ceiling;
2. **GPU decode**: file bytes read by a thread pool, decoded in batches by
   ``torchvision.io.decode_jpeg(..., device="cuda")``, resized and normalised on the GPU, forward;
3. **CPU decode**: DataLoader workers decode and resize (Pillow), pinned memory, forward;

each as images/s and as a ratio to the bare forward (the end-to-end target is >= 5,000 images/s
on one H200-class GPU). The model is the published SSCD architecture (ResNet-50 trunk, GeM p=3,
512-d projection, L2) with random weights: throughput does not depend on the weights, and no
ResNet-50 checkpoint is available offline. bf16 autocast and channels_last on CUDA.

4. **FAISS**: exact inner-product search (``IndexFlatIP``; on the GPU when faiss has GPUs) of
   ``--queries`` against ``--refs`` random unit vectors (512-d), k=10, time per 10,000 queries.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def make_jpegs(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` JPEGs of photo-like size (about 512 x 384, varied), smooth gradients plus noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        w, h = int(rng.integers(400, 640)), int(rng.integers(300, 480))
        base = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] * rng.random(3)[None, None, :]
        img = np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
        path = folder / f"img{i:06d}.jpg"
        Image.fromarray(img).save(path, format="JPEG", quality=90)
        paths.append(path)
    return paths


def build(device):
    import torch

    from moderation.descriptor import build_model

    model = build_model("resnet50", projection_dim=512, pretrained=False).eval().to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def _forward(model, x, device):
    import torch

    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return model(x)
    return model(x)


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def bare_forward(model, device, size: int, batch: int, iters: int) -> float:
    import torch

    x = torch.rand(batch, 3, size, size, device=device)
    with torch.inference_mode():
        for _ in range(2):
            _forward(model, x, device)
        _sync(device)
        t = time.perf_counter()
        for _ in range(iters):
            _forward(model, x, device)
        _sync(device)
    return batch * iters / (time.perf_counter() - t)


def gpu_decode(model, device, paths: list[Path], size: int, batch: int, readers: int) -> float:
    """Bytes by a thread pool, batched nvJPEG decode (CPU decode in a dry run), resize, forward."""
    import torch
    import torch.nn.functional as F
    from torchvision.io import decode_jpeg

    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1)

    def read(p: Path):
        return torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8)

    chunks = [paths[i:i + batch] for i in range(0, len(paths), batch)]
    with ThreadPoolExecutor(readers) as pool, torch.inference_mode():
        pending = pool.map(lambda c: [read(p) for p in c], chunks)
        _sync(device)
        t = time.perf_counter()
        done = 0
        for raw in pending:
            images = decode_jpeg(raw, device=device.type if device.type == "cuda" else "cpu")
            x = torch.stack([F.interpolate(im.unsqueeze(0).float(), size=(size, size), mode="bilinear",
                                           antialias=True, align_corners=False)[0] for im in images])
            x = ((x / 255.0).to(device) - mean) / std
            _forward(model, x, device)
            done += len(images)
        _sync(device)
    return done / (time.perf_counter() - t)


class _Files:
    def __init__(self, paths, size):
        self.paths, self.size = paths, size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        import torch
        from PIL import Image

        with Image.open(self.paths[i]) as im:
            im = im.convert("RGB").resize((self.size, self.size), Image.BILINEAR)
            a = np.asarray(im, dtype=np.float32) / 255.0
        a = (a - MEAN) / STD
        return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1), dtype=np.float32))


def cpu_decode(model, device, paths: list[Path], size: int, batch: int, workers: int) -> float:
    import torch
    from torch.utils.data import DataLoader

    loader = DataLoader(_Files(paths, size), batch_size=batch, num_workers=workers,
                        pin_memory=device.type == "cuda", persistent_workers=False)
    with torch.inference_mode():
        _sync(device)
        t = time.perf_counter()
        done = 0
        for x in loader:
            _forward(model, x.to(device, non_blocking=True), device)
            done += len(x)
        _sync(device)
    return done / (time.perf_counter() - t)


def faiss_search(n_refs: int, n_queries: int, dim: int = 512, chunk: int = 1_000_000) -> dict:
    from moderation.faiss_import import load_faiss

    faiss = load_faiss()
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    index = faiss.IndexFlatIP(dim)
    if gpus:
        index = faiss.index_cpu_to_all_gpus(index)
    rng = np.random.default_rng(1)
    t = time.perf_counter()
    for start in range(0, n_refs, chunk):
        x = rng.standard_normal((min(chunk, n_refs - start), dim), dtype=np.float32)
        faiss.normalize_L2(x)
        index.add(x)
    add_s = time.perf_counter() - t
    q = rng.standard_normal((n_queries, dim), dtype=np.float32)
    faiss.normalize_L2(q)
    index.search(q[: min(100, n_queries)], 10)  # warm-up
    t = time.perf_counter()
    index.search(q, 10)
    search_s = time.perf_counter() - t
    return {"refs": n_refs, "queries": n_queries, "gpus": gpus, "add_s": round(add_s, 2),
            "search_s": round(search_s, 3), "s_per_10k_queries": round(search_s * 10_000 / n_queries, 3)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: checks the script end to end")
    ap.add_argument("--images", type=int, default=8192)
    ap.add_argument("--size", type=int, default=320, help="square input side (SSCD: 288-320)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    ap.add_argument("--refs", type=int, default=10_000_000)
    ap.add_argument("--queries", type=int, default=10_000)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "gpu_bench.json")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.images, args.size, args.batch, args.workers = 16, 64, 8, 0
        args.refs, args.queries = 20_000, 200

    import torch

    device = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.dry_run:
        print("no CUDA device: use --dry-run on a CPU machine", file=sys.stderr)
        return 2
    report = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "python": platform.python_version(), "dry_run": args.dry_run,
              "images": args.images, "size": args.size, "batch": args.batch}
    with tempfile.TemporaryDirectory() as tmp:
        print(f"making {args.images} JPEGs ...", file=sys.stderr, flush=True)
        paths = make_jpegs(Path(tmp), args.images)
        model = build(device)
        bare = bare_forward(model, device, args.size, args.batch, iters=2 if args.dry_run else 20)
        report["bare_forward_ips"] = round(bare, 1)
        for name, fn, extra in (("gpu_decode", gpu_decode, max(4, args.workers)),
                                ("cpu_decode", cpu_decode, args.workers)):
            ips = fn(model, device, paths, args.size, args.batch, extra)
            report[f"{name}_ips"] = round(ips, 1)
            report[f"{name}_ratio"] = round(ips / bare, 3)
    best = max(("gpu_decode", "cpu_decode"), key=lambda k: report[f"{k}_ips"])
    report["best_end_to_end"] = best
    print("FAISS ...", file=sys.stderr, flush=True)
    report["faiss"] = faiss_search(args.refs, args.queries)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"| path | images/s | ratio to bare forward |\n|---|---|---|\n"
          f"| bare forward ({report['device']}, {args.size} px, batch {args.batch}) | {report['bare_forward_ips']} | 1.0 |\n"
          f"| end to end, GPU decode | {report['gpu_decode_ips']} | {report['gpu_decode_ratio']} |\n"
          f"| end to end, CPU workers decode | {report['cpu_decode_ips']} | {report['cpu_decode_ratio']} |")
    f = report["faiss"]
    print(f"\nFAISS IndexFlatIP, {f['refs']:,} x 512, {f['queries']:,} queries, k=10, GPUs {f['gpus']}: "
          f"{f['s_per_10k_queries']} s per 10k queries (add {f['add_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
