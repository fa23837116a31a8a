"""What the fault tests did and what survived it, for ``benchmarks/fault_injection.py``'s table.

A fault test calls :func:`record` with counts it measured itself (before its assertions, so a
failing test still reports what it saw). Nothing is written unless ``MODERATION_FAULT_LEDGER``
names a file: a plain ``pytest`` run is unaffected.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable


def record(category: str, scenario: str, *, tried: int, survived: int, lost: int = 0,
           duplicated: int = 0) -> None:
    """Append one row: ``tried`` faults injected, ``survived`` of them ended in a correct state,
    ``lost`` rows/items that should exist and do not, ``duplicated`` rows that exist twice."""
    path = os.environ.get("MODERATION_FAULT_LEDGER")
    if not path:
        return
    row = {"category": category, "scenario": scenario, "tried": int(tried), "survived": int(survived),
           "lost": int(lost), "duplicated": int(duplicated)}
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def lost_and_duplicated(expected: Iterable, got: list) -> tuple[int, int]:
    """(how many of ``expected`` are missing from ``got``, how many entries of ``got`` repeat)."""
    return len(set(expected) - set(got)), len(got) - len(set(got))
