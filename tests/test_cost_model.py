"""The cost model's projection rules (benchmarks/cost_model.py): linear in what each figure counts."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cost_model():
    spec = importlib.util.spec_from_file_location("cost_model", ROOT / "benchmarks" / "cost_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


COSTS = {"cpu_seconds": {"reference_embed": 0.2, "reference_pdq": 0.01, "reference_features": 0.09,
                         "query_analysis": 1.0, "verify_pair": 0.02},
         "bytes_per_reference": {"vector": 2048, "local_features": 30000, "pdq": 34},
         "verify_topk": 10, "views_per_query": 7.0}
INDEX = {"references": 10_000_000, "index_bytes_per_reference": 520.0, "factory": "IVF4096_HNSW32,SQ8",
         "exact_cpu_s_per_search": 0.5, "ivf_cpu_s_per_search": 0.004}


def test_projection_scales_each_figure_by_what_it_counts(cost_model):
    rows = cost_model.project(COSTS, INDEX, None, queries_per_day=100_000, new_fraction=0.01, flat_max=2_000_000)
    by_n = {r["references"]: r for r in rows}
    one, ten = by_n[1_000_000], by_n[10_000_000]
    assert one["full_build_cpu_hours"] == pytest.approx(1_000_000 * 0.3 / 3600)
    assert one["nightly_cpu_hours"] == pytest.approx(one["full_build_cpu_hours"] * 0.01)
    # Query-side work does not depend on the reference count; exact search does, linearly.
    assert one["queries_cpu_hours_per_day"] == ten["queries_cpu_hours_per_day"] == pytest.approx(
        100_000 * (1.0 + 10 * 0.02) / 3600)
    # Below the Flat limit the exact index is searched, above it the IVF; each search of every view.
    assert one["index"] == "Flat" and ten["index"] == "IVF4096_HNSW32,SQ8"  # what `auto` builds at each size
    assert one["search_cpu_hours_per_day"] == pytest.approx(100_000 * 7 * 0.5 / 10 / 3600)
    assert ten["search_cpu_hours_per_day"] == pytest.approx(100_000 * 7 * 0.004 / 3600)
    assert by_n[100_000_000]["search_cpu_hours_per_day"] == pytest.approx(ten["search_cpu_hours_per_day"] * 10)
    assert one["index_gb"] == pytest.approx(1_000_000 * 2048 / 1e9)
    assert ten["index_gb"] == pytest.approx(10_000_000 * 520 / 1e9)
    assert ten["cache_gb"] == pytest.approx(10_000_000 * (2048 + 30000 + 34) / 1e9)


def test_unmeasured_figures_are_not_invented(cost_model):
    rows = cost_model.project(COSTS, None, None, queries_per_day=1000, new_fraction=0.01)
    assert all("index_gb" not in r and "full_build_gpu_hours_descriptor" not in r for r in rows)
    dry = {"dry_run": True, "gpu_decode_ips": 30.0, "cpu_decode_ips": 40.0}
    rows = cost_model.project(COSTS, None, dry, queries_per_day=1000, new_fraction=0.01)
    assert all("full_build_gpu_hours_descriptor" not in r for r in rows)
    real = {"dry_run": False, "gpu_decode_ips": 6000.0, "cpu_decode_ips": 4000.0}
    rows = cost_model.project(COSTS, None, real, queries_per_day=1000, new_fraction=0.01)
    assert rows[0]["full_build_gpu_hours_descriptor"] == pytest.approx(1_000_000 / 6000 / 3600)
