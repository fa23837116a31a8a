"""The training loop: one function for CPU, one GPU and torchrun's several processes.

``train(config, settings, env)`` builds the model and data, initialises or
resumes from ``OUT/checkpoint.pt``, runs ``config.steps`` optimiser steps
(or until ``time_limit_min``), and returns the trained descriptor (unwrapped,
on the CPU, in eval mode, its head folded into one linear layer) with its
training log. Every
``checkpoint_every`` steps it saves a checkpoint; rank 0 appends one JSON
row per ``log_every`` steps to ``OUT/train_log.jsonl`` (step, loss, InfoNCE,
entropy term, learning rates, images/s). "Images" in throughput figures
are network inputs, i.e. augmented views.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from moderation.descriptor import SSCDModel
from trainer import distributed as D
from trainer.augment import Augmenter
from trainer.checkpoint import check_compatible, load_checkpoint, save_checkpoint
from trainer.config import TrainConfig
from trainer.data import (ImagePool, MultiViewCollate, StepBatchSampler, TrainDataset, validation_hashes,
                          worker_init)
from trainer.loss import SSCDLoss
from trainer.model import (build_training_model, finalise_head, frozen_blocks_for, init_projection,
                           param_groups, pooled_features, resolve_backbone, set_train_mode)
from trainer.optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)
LOG_NAME = "train_log.jsonl"
INIT_KEY_OFFSET = 10**12  # draws used for PCA initialisation never coincide with training draws


@dataclass
class TrainResult:
    model: SSCDModel
    config: TrainConfig  # with the backbone resolved
    steps_done: int
    seconds: float
    images_per_s: float
    stopped_early: bool
    log_rows: list[dict[str, Any]] = field(default_factory=list)
    pool_counts: dict[str, int] = field(default_factory=dict)
    projection_init: str = ""


def build_data(config: TrainConfig, settings, env: D.DistEnv, start_step: int):
    """The pool, the dataset and this process's DataLoader from ``start_step`` on."""
    excluded = validation_hashes(config.val_dir) if config.val_dir else None
    pool = ImagePool.build(config.images, config.images_prefix, config.generated, settings,
                           config.seed, config.max_side, excluded)
    symmetric = config.anchor_preset in ("", "same")
    anchor = None if symmetric else Augmenter(config.anchor_preset, config.crop_size)
    dataset = TrainDataset(pool, Augmenter(config.preset, config.crop_size), config.views, config.seed,
                           anchor)
    sampler = StepBatchSampler(len(pool), config.batch_size, config.steps, start_step, config.seed,
                               env.rank, env.world_size)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=config.workers,
                        collate_fn=MultiViewCollate(config.mixup, config.cutmix, config.seed),
                        worker_init_fn=worker_init if config.workers else None,
                        pin_memory=env.device.type == "cuda",
                        prefetch_factor=4 if config.workers else None,
                        persistent_workers=False)
    return pool, dataset, loader


def _init_features(model: SSCDModel, dataset: TrainDataset, n: int, device: torch.device,
                   workers: int = 0, batch: int = 32) -> torch.Tensor:
    """Pooled trunk features of ``n`` augmented views (two per draw), for the PCA projection init."""
    keys = list(range(INIT_KEY_OFFSET, INIT_KEY_OFFSET + (n + 1) // 2))
    loader = DataLoader(dataset, sampler=keys, batch_size=max(1, batch // 2), num_workers=workers,
                        collate_fn=MultiViewCollate(), worker_init_fn=worker_init if workers else None)
    feats = []
    model.eval()
    for b in loader:
        feats.append(pooled_features(model, b.images.to(device)).float().cpu())
    return torch.cat(feats)[:n]


def _autocast(config: TrainConfig, device: torch.device):
    precision = config.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision != "fp32":
        raise ValueError(f"unknown precision {precision!r}; one of auto, bf16, fp32")
    return nullcontext()


def train(config: TrainConfig, settings=None, env: D.DistEnv | None = None) -> TrainResult:
    """Train (or resume) per ``config``; see the module doc. Rank 0 writes logs and checkpoints."""
    t_start = time.perf_counter()
    env = env or D.init_distributed(config.device)
    out = Path(config.out_dir)
    backbone = resolve_backbone(config.backbone, env.device)
    config = replace(config, backbone=backbone.value,
                     freeze_stages=frozen_blocks_for(backbone, config.freeze_stages))
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)

    model = build_training_model(backbone, config.dim, config.pretrained, config.freeze_stages,
                                 config.projection_init)
    saved = load_checkpoint(out) if config.resume else None
    start_step = 0
    init_used = "resumed"
    if saved is not None:
        check_compatible(saved["config"], config.to_dict())
        model.load_state_dict(saved["model"])
        start_step = int(saved["step"])
        init_used = saved.get("extra", {}).get("projection_init", "resumed")
    pool, dataset, loader = build_data(config, settings, env, start_step)
    model.to(env.device)
    if saved is None and env.is_main:  # other ranks get rank 0's weights from DDP
        feats = None
        if config.projection_init == "pca":
            feats = _init_features(model, dataset, config.init_views, env.device, config.workers)
        init_used = init_projection(model, config.projection_init, feats)
    elif saved is None:
        init_used = "broadcast-from-rank-0"

    net: torch.nn.Module = model
    if env.distributed:
        if not config.freeze_bn and env.device.type == "cuda":
            net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
        # DDP broadcasts rank 0's parameters (and so its PCA projection) to every rank.
        net = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    groups = param_groups(model, config.lr, config.trunk_lr_mult, config.weight_decay)
    optimizer = build_optimizer(config.optimizer, groups, config.lr, config.weight_decay)
    scheduler = build_scheduler(optimizer, config.steps, config.warmup_steps)
    if saved is not None:
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
    criterion = SSCDLoss(config.temperature, config.entropy_weight)

    rows = _read_log(out, start_step) if env.is_main else []
    bar = None
    if env.is_main and config.progress:
        from tqdm import tqdm

        bar = tqdm(total=config.steps, initial=start_step, desc="training", unit="step",
                   file=sys.stderr, dynamic_ncols=True)
    step = start_step
    window = _LogWindow()
    total_images, t_loop = 0, time.perf_counter()
    stopped_early = False
    extra = {"projection_init": init_used, "backbone": backbone.value}
    for batch in loader:
        set_train_mode(net, config.freeze_bn)
        images = batch.images.to(env.device, non_blocking=True)
        with _autocast(config, env.device):
            z_local = net(images)
        # The loss sees every process's embeddings: cross-process negatives.
        z = D.gather_with_grad(z_local.float())
        parts = criterion(z, D.gather(batch.instances.to(env.device)))
        optimizer.zero_grad(set_to_none=True)
        parts.total.backward()
        if config.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(net.parameters(), config.clip_grad)
        optimizer.step()
        scheduler.step()
        step += 1
        n_images = images.shape[0] * env.world_size
        total_images += n_images
        window.add(parts, n_images)
        if step % config.log_every == 0 or step == config.steps:
            row = window.row(step, optimizer.param_groups[-1]["lr"], config.trunk_lr_mult, t_start)
            if env.is_main:
                rows.append(row)
                _append_log(out, row)
            if bar is not None:
                bar.set_postfix(loss=f"{row['loss']:.3f}", ent=f"{row['entropy']:.3f}",
                                img_s=f"{row['images_per_s']:.1f}")
        if bar is not None:
            bar.update(1)
        if step % config.checkpoint_every == 0 and step < config.steps and env.is_main:
            save_checkpoint(out, model=model, optimizer=optimizer, scheduler=scheduler, step=step,
                            config=config.to_dict(), extra=extra)
        if config.time_limit_min > 0 and _over_time(t_start, config.time_limit_min, env.device):
            stopped_early = step < config.steps
            break
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t_loop
    if env.is_main and step > start_step:
        save_checkpoint(out, model=model, optimizer=optimizer, scheduler=scheduler, step=step,
                        config=config.to_dict(), extra=extra)
    D.barrier()
    model = finalise_head(model.cpu().eval())
    return TrainResult(model, config, step, seconds, total_images / max(seconds, 1e-9), stopped_early,
                       rows, pool.counts(), init_used)


class _LogWindow:
    """Loss terms and image counts since the last log row (summed on the device: no sync per step)."""

    def __init__(self):
        self._reset()

    def _reset(self) -> None:
        self.sums: dict[str, torch.Tensor | float] = {"loss": 0.0, "infonce": 0.0, "entropy": 0.0}
        self.steps, self.images, self.t = 0, 0, time.perf_counter()

    def add(self, parts, n_images: int) -> None:
        self.sums["loss"] = self.sums["loss"] + parts.total.detach()
        self.sums["infonce"] = self.sums["infonce"] + parts.infonce.detach()
        self.sums["entropy"] = self.sums["entropy"] + parts.entropy.detach()
        self.steps += 1
        self.images += n_images

    def row(self, step: int, lr: float, trunk_lr_mult: float, t_start: float) -> dict[str, Any]:
        """The log row for the window, then start a new window."""
        now = time.perf_counter()
        n = max(self.steps, 1)
        row = {"step": step, **{k: float(v) / n for k, v in self.sums.items()},
               "lr": lr, "lr_trunk": lr * trunk_lr_mult,
               "images_per_s": self.images / max(now - self.t, 1e-9), "elapsed_s": now - t_start}
        self._reset()
        return row


def _over_time(t_start: float, limit_min: float, device: torch.device) -> bool:
    """Whether the time limit is reached, decided by rank 0 for every rank (they stop together)."""
    over = torch.tensor([1 if time.perf_counter() - t_start > limit_min * 60 else 0], device=device)
    if D.world_size() > 1:
        import torch.distributed as dist

        dist.broadcast(over, src=0)
    return bool(over.item())


def _read_log(out: Path, upto_step: int) -> list[dict[str, Any]]:
    """Log rows of earlier attempts up to ``upto_step``; rewrites the file without later rows."""
    path = out / LOG_NAME
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("step", 0) <= upto_step]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _append_log(out: Path, row: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOG_NAME, "a") as fh:
        fh.write(json.dumps(row) + "\n")
