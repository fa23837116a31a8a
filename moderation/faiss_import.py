"""Import FAISS once, refusing a broken install (faiss-cpu and faiss-gpu together)."""

from __future__ import annotations

import importlib.metadata as md

from moderation.errors import ConfigError


def load_faiss():
    """Return the ``faiss`` module. Raises ConfigError with the fix if it is missing or doubled."""
    present = []
    for dist in ("faiss-cpu", "faiss-gpu", "faiss-gpu-cu12", "faiss-gpu-cu11"):
        try:
            md.distribution(dist)
            present.append(dist)
        except md.PackageNotFoundError:
            pass
    if len(present) > 1:
        raise ConfigError(
            f"both {' and '.join(present)} are installed; they overwrite each other's `faiss` module. "
            "Uninstall all of them and install exactly one extra: `pip install .[cpu]` or `.[gpu]`.")
    try:
        import faiss
    except ImportError:
        raise ConfigError("FAISS is not installed: `pip install .[cpu]` (or `.[gpu]` on a CUDA machine)") from None
    return faiss
