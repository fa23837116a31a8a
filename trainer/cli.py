"""Command-line options shared by ``moderation train`` and ``torchrun ... -m trainer``.

``add_arguments(parser)`` declares the options; ``config_from_args(args)``
turns them into a TrainConfig; ``run(args, settings)`` trains, evaluates,
publishes into the registry of ``settings``' object store, prints a JSON
summary and returns the process exit code.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

from trainer.config import TrainConfig

_DEFAULTS = TrainConfig()


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    d = _DEFAULTS
    g = parser.add_argument_group("training data")
    g.add_argument("--images", action="append", default=[], metavar="FOLDER",
                   help="local folder of unlabeled training images (repeatable)")
    g.add_argument("--images-prefix", action="append", default=[], metavar="PREFIX",
                   help="object-store prefix of unlabeled training images (repeatable)")
    g.add_argument("--generated", type=int, default=d.generated,
                   help="procedurally generated images added to the pool (default %(default)s)")
    g.add_argument("--max-side", type=int, default=d.max_side,
                   help="shrink decoded images to this long side before augmenting (default %(default)s)")
    g = parser.add_argument_group("model")
    g.add_argument("--backbone", default=d.backbone,
                   help="auto (resnet50 on GPU, mobilenet_v2 on CPU), resnet50, resnext101, mobilenet_v2")
    g.add_argument("--dim", type=int, default=d.dim, help="descriptor dimension (default %(default)s)")
    g.add_argument("--no-pretrained", dest="pretrained", action="store_false",
                   help="start from random weights instead of ImageNet")
    g.add_argument("--projection-init", default=d.projection_init, choices=["pca", "orthogonal", "default"])
    g.add_argument("--init-views", type=int, default=d.init_views,
                   help="augmented views used to fit the PCA projection init (default %(default)s)")
    g.add_argument("--freeze-stages", type=int, default=d.freeze_stages,
                   help="leading trunk blocks kept frozen (default: 10 for mobilenet_v2, 0 for ResNets)")
    g.add_argument("--train-bn", dest="freeze_bn", action="store_false",
                   help="update BatchNorm statistics (SyncBatchNorm across GPUs); default: frozen")
    g = parser.add_argument_group("augmentation")
    g.add_argument("--preset", default=d.preset, choices=["light", "advanced", "wide"])
    g.add_argument("--anchor-preset", default=d.anchor_preset, choices=["same", "light", "advanced", "wide"],
                   help="preset of the first view of each image, the 'reference' side of a pair "
                        "(default %(default)s; same: as --preset, SSCD's symmetric views)")
    g.add_argument("--crop-size", type=int, default=d.crop_size, help="training view size in px")
    g.add_argument("--views", type=int, default=d.views, help="augmented views per image (>= 2)")
    g.add_argument("--mixup", type=float, default=d.mixup, help="fraction of views mixed up")
    g.add_argument("--cutmix", type=float, default=d.cutmix, help="fraction of views cut-mixed")
    g = parser.add_argument_group("objective and optimisation")
    g.add_argument("--temperature", type=float, default=d.temperature)
    g.add_argument("--entropy-weight", type=float, default=d.entropy_weight,
                   help="lambda of the KoLeo entropy term (SSCD paper: 30; default %(default)s)")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="images per step, all processes")
    g.add_argument("--steps", type=int, default=d.steps)
    g.add_argument("--optimizer", default=d.optimizer, choices=["adamw", "sgd", "lars"])
    g.add_argument("--lr", type=float, default=d.lr, help="head learning rate")
    g.add_argument("--trunk-lr-mult", type=float, default=d.trunk_lr_mult)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    g.add_argument("--clip-grad", type=float, default=d.clip_grad, help="max gradient norm, 0: off")
    g.add_argument("--precision", default=d.precision, choices=["auto", "bf16", "fp32"])
    g.add_argument("--seed", type=int, default=d.seed)
    g = parser.add_argument_group("run")
    g.add_argument("--train-workers", dest="workers", type=int, default=d.workers,
                   help="DataLoader worker processes for decoding and augmentation")
    g.add_argument("--threads", type=int, default=d.threads,
                   help="torch threads of the training process (0: torch's default). On a shared "
                        "CPU, 1 thread is often much faster than oversubscribed cores")
    g.add_argument("--train-device", dest="device", default=d.device, help="auto, cpu, cuda")
    g.add_argument("--out", dest="out_dir", default=d.out_dir, help="checkpoint and log folder")
    g.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    g.add_argument("--log-every", type=int, default=d.log_every)
    g.add_argument("--time-limit-min", type=float, default=d.time_limit_min,
                   help="stop training after this many minutes (0: no limit)")
    g.add_argument("--no-resume", dest="resume", action="store_false",
                   help="ignore a checkpoint in --out and start afresh")
    g.add_argument("--no-progress", dest="progress", action="store_false")
    g = parser.add_argument_group("evaluation and publication")
    g.add_argument("--val-dir", default=d.val_dir,
                   help="labelled set: references/, queries/, background/, ground_truth.csv")
    g.add_argument("--eval-size", type=int, default=d.eval_size,
                   help="inference image size of the new model (default: the size of the model in force)")
    g.add_argument("--eval-resize-mode", default=d.eval_resize_mode, choices=["", "square", "short_edge"])
    g.add_argument("--no-publish", dest="publish", action="store_false",
                   help="do not publish into the registry")
    g.add_argument("--force-promote", action="store_true",
                   help="make the new model current even if it does not beat the model in force "
                        "(still needs --val-dir: a model in force carries metrics and a threshold)")
    g.add_argument("--export", dest="export_path", default=d.export_path, metavar="FILE",
                   help="also write the TorchScript model here, its manifest beside it (.json)")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    names = {f.name for f in fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values["images"] = tuple(values.get("images") or ())
    values["images_prefix"] = tuple(values.get("images_prefix") or ())
    return TrainConfig(**values)


def run(args: argparse.Namespace, settings) -> int:
    """Train and publish per ``args``; print a JSON summary (rank 0). Returns the exit code."""
    from trainer import distributed as D
    from trainer.publish import train_and_publish

    config = config_from_args(args)
    if config.device in ("", "auto") and getattr(settings, "device", None) is not None:
        config = _with(config, device=str(getattr(settings.device, "value", settings.device)))
    env = D.init_distributed(config.device)
    try:
        result = train_and_publish(config, settings, env=env)
    finally:
        D.cleanup()
    if result is None:
        return 0
    summary = {
        "version": result.record.version if result.record else None,
        "promoted": result.promoted, "metrics": _short(result.metrics),
        "incumbent": _short(result.incumbent),
        "threshold": result.record.threshold if result.record else None,
        "steps": result.train.steps_done, "images_per_s": round(result.train.images_per_s, 2),
        "export": result.export_path,
    }
    print(json.dumps(summary, indent=2, default=str), file=sys.stdout)
    return 0


def _with(config: TrainConfig, **changes) -> TrainConfig:
    from dataclasses import replace

    return replace(config, **changes)


def _short(m: dict) -> dict:
    keys = ("model", "uap", "uap_sn", "rp90", "rp90_sn", "recall_at_1", "rp90_threshold_raw",
            "rp90_threshold_sn", "image_size")
    return {k: (round(m[k], 4) if isinstance(m.get(k), float) else m.get(k)) for k in keys if k in m}


def main(argv: list[str] | None = None) -> int:
    from moderation.config import Settings
    from moderation.errors import ModerationError

    parser = add_arguments(argparse.ArgumentParser(
        prog="python -m trainer", description="SSCD self-supervised training (CPU, one GPU or torchrun)"))
    args = parser.parse_args(argv)
    try:
        return run(args, Settings.from_env())
    except ModerationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
