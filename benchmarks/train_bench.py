"""Training figures on ../shared/bench-dev: the starting model, the CPU-trained model, PDQ.

1. PDQ baseline (``pipeline_bench.pdq_metrics``: same metric code).
2. The starting model: ImageNet MobileNetV2 trunk + GeM (1280-d), whitened on
   background, with SN, at the inference size of the trained model.
3. A CPU training run of at most ``--minutes`` (default 30) on bench-dev's
   ``background/`` images plus generated ones - never on its references or
   queries - launched as ``python -m trainer`` with the recipe below, which
   evaluates the result on bench-dev and exports TorchScript + manifest.
4. With ``--shipped``: the shipped default model (``moderation/models/default.pt``)
   evaluated as it is, at its manifest's image size: the trained row without training.
5. A table (Markdown) and ``benchmarks/out/train_bench.json`` (or ``--out``); with
   ``--ship`` the trained model becomes the shipped default
   (``moderation/models/default.pt`` and ``default.json``).

Every evaluation is ``moderation.evaluation.evaluate_labelled_set``, the
protocol the trainer and the pipeline share.

Usage::

    .venv/bin/python benchmarks/train_bench.py [--bench ../shared/bench-dev] [--minutes 30]
        [--ship] [--skip-train] [--skip-start] [--skip-pdq] [--shipped] [--out FILE]

Training throughput (images/s = augmented views through the network per
second, data loading included) comes from the run's log.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "benchmarks" / "out"
DEFAULT_BENCH = REPO.parent / "shared" / "bench-dev"

# The recipe of the shipped default model (MobileNetV2, CPU). BENCH is replaced by the
# bench-dev folder; only its background/ images are trained on.
RECIPE = [
    "--images", "BENCH/background", "--generated", "1000", "--max-side", "256",
    "--backbone", "mobilenet_v2", "--dim", "512", "--projection-init", "pca", "--init-views", "1024",
    "--freeze-stages", "10", "--preset", "wide", "--anchor-preset", "light", "--crop-size", "160",
    "--views", "2", "--batch-size", "32", "--steps", "800", "--optimizer", "adamw", "--lr", "6e-4",
    "--trunk-lr-mult", "0.3", "--weight-decay", "1e-6", "--warmup-steps", "20",
    "--temperature", "0.05", "--entropy-weight", "10", "--seed", "0", "--threads", "1",
    "--train-workers", "2", "--eval-size", "224", "--eval-resize-mode", "square",
]


def recipe_args(bench: Path, minutes: float, out_dir: Path, export: Path) -> list[str]:
    args = [a.replace("BENCH", str(bench)) for a in RECIPE]
    return args + ["--time-limit-min", str(minutes), "--val-dir", str(bench), "--out", str(out_dir),
                   "--no-resume", "--no-publish", "--export", str(export), "--no-progress"]


def eval_size() -> int:
    return int(RECIPE[RECIPE.index("--eval-size") + 1])


def evaluated(model, bench: Path, size: int, resize_mode: str | None = None) -> dict:
    """``model``'s figures on bench-dev with the one evaluation protocol, at ``size``."""
    import torch

    from moderation.config import Settings
    from moderation.evaluation import ValidationSet, evaluate_labelled_set

    torch.set_num_threads(1)
    settings = Settings.from_env(progress=False, workers=2)
    t0 = time.perf_counter()
    m = evaluate_labelled_set(model, ValidationSet.from_dir(bench), settings, image_size=size,
                              resize_mode=resize_mode).metrics
    m["seconds"] = round(time.perf_counter() - t0, 1)
    return m


def start_metrics(bench: Path, size: int) -> dict:
    from moderation.descriptor import build_model

    return evaluated(build_model("mobilenet_v2", projection_dim=0, pretrained=True).eval(), bench, size)


def shipped_metrics(bench: Path) -> dict:
    """The shipped default model, evaluated now at its manifest's size and resize mode."""
    from moderation.descriptor import load_torchscript

    dest = REPO / "moderation" / "models"
    manifest = json.loads((dest / "default.json").read_text())
    m = evaluated(load_torchscript(dest / "default.pt"), bench, manifest["image_size"], manifest["resize_mode"])
    return dict(m, model_version=manifest["version"])


def train(bench: Path, minutes: float) -> dict:
    out_dir = OUT / "train_run"
    export = OUT / "trained.pt"
    cmd = [sys.executable, "-m", "trainer", *recipe_args(bench, minutes, out_dir, export)]
    print("training:", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO)
    manifest = json.loads(export.with_suffix(".json").read_text())
    rows = [json.loads(line) for line in (out_dir / "train_log.jsonl").read_text().splitlines()]
    return {"manifest": manifest, "wall_seconds": round(time.perf_counter() - t0, 1), "log": rows,
            "command": " ".join(cmd)}


def table(results: dict) -> str:
    lines = ["| model | μAP | μAP SN | RP90 | RP90 SN | recall@1 |", "|---|---|---|---|---|---|"]

    def f(x):
        return "–" if x is None else f"{x:.3f}"

    if "pdq" in results:
        p = results["pdq"]
        lines.append(f"| PDQ (256-bit, Hamming) | {f(p['uap'])} | – | {f(p['rp90'])} | – "
                     f"| {f(p['recall_at_1'])} |")
    for key, label in (("start", "starting model: ImageNet MobileNetV2 + GeM, 1280-d"),
                       ("trained", "trained (CPU, ≤30 min), 512-d"),
                       ("shipped", "the shipped default, 512-d (evaluated now)")):
        if key in results:
            m = results[key]
            lines.append(f"| {label} | {f(m['uap'])} | {f(m['uap_sn'])} | {f(m['rp90'])} | "
                         f"{f(m['rp90_sn'])} | {f(m['recall_at_1'])} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", type=Path, default=DEFAULT_BENCH)
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--ship", action="store_true", help="install the trained model as the shipped default")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--skip-start", action="store_true")
    ap.add_argument("--skip-pdq", action="store_true")
    ap.add_argument("--shipped", action="store_true", help="also evaluate the shipped default model as it is")
    ap.add_argument("--out", type=Path, default=OUT / "train_bench.json", help="where the JSON goes")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO / "benchmarks"))
    OUT.mkdir(parents=True, exist_ok=True)
    results: dict = {"bench": str(args.bench), "eval_size": eval_size()}
    if not args.skip_pdq:
        from pipeline_bench import pdq_metrics

        results["pdq"] = pdq_metrics(args.bench)
        print("PDQ:", json.dumps(results["pdq"]), flush=True)
    if not args.skip_start:
        results["start"] = start_metrics(args.bench, eval_size())
        print("start:", json.dumps(results["start"]), flush=True)
    if args.shipped:
        results["shipped"] = shipped_metrics(args.bench)
        print("shipped:", json.dumps(results["shipped"]), flush=True)
    if not args.skip_train:
        run = train(args.bench, args.minutes)
        m = run["manifest"]
        results["trained"] = m["metrics"]
        results["incumbent"] = m["info"].get("incumbent", {})
        log = run["log"]
        steady = [r["images_per_s"] for r in log[1:]] or [r["images_per_s"] for r in log]
        results["training"] = {
            "command": run["command"], "wall_seconds": run["wall_seconds"],
            "train_seconds": m["info"]["train_seconds"], "steps": m["info"]["steps"],
            "stopped_early": m["info"]["stopped_early"],
            "images_per_s_mean": m["info"]["images_per_s"],
            "images_per_s_median_window": sorted(steady)[len(steady) // 2],
            "final_loss": m["info"]["final_loss"], "first_loss": log[0]["loss"] if log else None,
        }
        print("trained:", json.dumps(results["trained"]), flush=True)
        if args.ship:
            dest = REPO / "moderation" / "models"
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(OUT / "trained.pt", dest / "default.pt")
            manifest = dict(m, source="shipped-default")
            manifest["info"] = dict(m["info"], reproduce="python benchmarks/train_bench.py --ship")
            (dest / "default.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            print(f"shipped {dest / 'default.pt'} ({(dest / 'default.pt').stat().st_size / 1e6:.1f} MB)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print()
    print(table(results))
    if "training" in results:
        t = results["training"]
        print(f"\ntraining: {t['steps']} steps in {t['train_seconds']} s, "
              f"{t['images_per_s_mean']:.1f} images/s (median window {t['images_per_s_median_window']:.1f})")


if __name__ == "__main__":
    main()
