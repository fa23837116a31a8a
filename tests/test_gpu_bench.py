"""The GPU benchmark runs end to end on the CPU (``--dry-run``), so it is ready when a GPU is lent."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_gpu_bench_dry_run_reports_every_path(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import gpu_bench

    out = tmp_path / "gpu.json"
    assert gpu_bench.main(["--dry-run", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["dry_run"] is True
    for key in ("bare_forward_ips", "gpu_decode_ips", "cpu_decode_ips"):
        assert report[key] > 0, key
    assert report["best_end_to_end"] in ("gpu_decode", "cpu_decode")
    assert report["faiss"]["refs"] == 20_000 and report["faiss"]["s_per_10k_queries"] > 0
    del sys.modules["gpu_bench"]


def test_gpu_bench_refuses_a_full_run_without_cuda(tmp_path, monkeypatch):
    import torch

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import gpu_bench

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_bench.main(["--out", str(tmp_path / "x.json")]) == 2
    assert not (tmp_path / "x.json").exists()
