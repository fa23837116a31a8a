"""Shared helpers of the trainer tests (no tests here): a tiny CPU config, a tiny labelled set."""

from __future__ import annotations

import csv
import random
from dataclasses import replace

import pytest
import torch

from trainer.augment import Augmenter, Context
from trainer.config import TrainConfig
from trainer.synthetic import synthetic_image

STEPS = 16


@pytest.fixture(autouse=True, scope="module")
def keep_torch_threads():
    """Training sets torch's thread count (config.threads); give other tests theirs back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def tiny_config(folder, out, **kw) -> TrainConfig:
    base = TrainConfig(
        images=(str(folder),), generated=16, max_side=96, backbone="mobilenet_v2", dim=32,
        pretrained=True, projection_init="pca", init_views=96, freeze_stages=16, freeze_bn=True,
        preset="light", crop_size=64, views=2, batch_size=8, steps=STEPS, optimizer="adamw", lr=1e-3,
        trunk_lr_mult=0.1, warmup_steps=2, workers=0, device="cpu", out_dir=str(out),
        checkpoint_every=8, log_every=4, progress=False, seed=7, resume=True, threads=1)
    return replace(base, **kw)


def make_validation_set(root):
    """20 references, 10 lightly edited copies as queries, 4 unmatched queries, 24 background."""
    aug = Augmenter("light", 72)
    for sub in ("references", "queries", "background"):
        (root / sub).mkdir(parents=True)
    rows = []
    for i in range(20):
        img = synthetic_image(2000 + i, max_side=80)
        img.save(root / "references" / f"R{i:03d}.png")
        if i < 10:
            aug(img, random.Random(i), Context()).save(root / "queries" / f"Q{i:03d}.png")
            rows.append((f"Q{i:03d}", f"R{i:03d}"))
    for j in range(4):
        synthetic_image(3000 + j, max_side=80).save(root / "queries" / f"Q{100 + j:03d}.png")
        rows.append((f"Q{100 + j:03d}", ""))
    for k in range(24):
        synthetic_image(4000 + k, max_side=80).save(root / "background" / f"B{k:03d}.png")
    with open(root / "ground_truth.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["query_id", "reference_id"])
        w.writerows(rows)
    return root
