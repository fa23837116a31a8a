"""Training checkpoints: atomic save, resume.

``OUT/checkpoint.pt`` holds the model and optimiser state, the scheduler,
the step reached and the config. It is written to a temporary file and
renamed, so a crash while saving leaves the previous checkpoint intact.
Data order and augmentations are functions of (seed, step) (see
``trainer.data``), so a resumed run continues with the batches the
uninterrupted run would have seen.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from moderation.errors import ModerationError

NAME = "checkpoint.pt"


def save_checkpoint(out_dir: Path, *, model: torch.nn.Module, optimizer, scheduler, step: int,
                    config: dict[str, Any], extra: dict[str, Any] | None = None) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / NAME
    tmp = out_dir / (NAME + ".tmp")
    core = model.module if hasattr(model, "module") else model
    torch.save({"model": core.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "step": step, "config": config,
                "extra": extra or {}}, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(out_dir: Path) -> dict[str, Any] | None:
    """The last checkpoint under ``out_dir``, or None if there is none."""
    path = Path(out_dir) / NAME
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModerationError(f"checkpoint {path} is unreadable ({exc}); delete it to start afresh") from None


def check_compatible(saved: dict[str, Any], config: dict[str, Any]) -> None:
    """Refuse to resume a run whose model or data layout differs from the saved one."""
    keys = ("backbone", "dim", "batch_size", "views", "steps", "seed", "generated", "crop_size")
    diff = {k: (saved.get(k), config.get(k)) for k in keys if saved.get(k) != config.get(k)}
    if diff:
        raise ModerationError(
            "the checkpoint in the output folder comes from a different run "
            f"({json.dumps(diff)}); use another --out folder or --no-resume")
