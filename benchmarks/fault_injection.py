"""Fault injection: kills, services down, hostile files and concurrent review, in one table.

Runs the fault tests (real Postgres, the S3 server, real matching runs, moderator processes)
with ``MODERATION_FAULT_LEDGER`` set; each test records what it injected and what it measured
afterwards (``tests/fault_ledger.py``): faults tried, how many ended in a correct state, rows
lost and rows duplicated. A failing test still reports what it saw, and the table says which
tests failed.

    .venv/bin/python benchmarks/fault_injection.py            # about 2 minutes on 2 cores

Prints one Markdown table (per category, then per scenario) and writes
benchmarks/out/fault_injection.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TESTS = ["tests/test_faults_kill.py", "tests/test_faults_services.py", "tests/test_faults_concurrency.py",
         "tests/test_faults_hostile.py", "tests/test_bad_input_hardening.py"]
FIELDS = ("tried", "survived", "lost", "duplicated")


def run_tests(ledger: Path) -> tuple[int, str]:
    env = {**os.environ, "MODERATION_FAULT_LEDGER": str(ledger)}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS],
                          cwd=REPO, env=env, capture_output=True, text=True)
    return proc.returncode, proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-500:]


def table(rows: list[dict]) -> str:
    by_cat: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(FIELDS, 0))
    for r in rows:
        for f in FIELDS:
            by_cat[r["category"]][f] += r[f]
    lines = ["| category | tried | survived | lost | duplicated |", "|---|---|---|---|---|"]
    for cat, t in by_cat.items():
        lines.append(f"| {cat} | {t['tried']} | {t['survived']} | {t['lost']} | {t['duplicated']} |")
    lines += ["", "| scenario | tried | survived | lost | duplicated |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['category']}: {r['scenario']} | {r['tried']} | {r['survived']} | {r['lost']} | "
                     f"{r['duplicated']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "fault_injection.json")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        ledger = Path(tmp) / "ledger.jsonl"
        rc, summary = run_tests(ledger)
        rows = [json.loads(x) for x in ledger.read_text().splitlines()] if ledger.exists() else []
    print(table(rows))
    print(f"\npytest: {summary}" + ("" if rc == 0 else "  (SOME FAULT TESTS FAILED)"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "pytest": summary, "returncode": rc}, indent=2) + "\n")
    return rc


if __name__ == "__main__":
    sys.exit(main())
