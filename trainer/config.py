"""TrainConfig: every option of one training run, in one frozen dataclass.

The same object drives ``moderation train``, ``torchrun -m trainer`` and the
Airflow DAG; it is stored (as JSON) in checkpoints and in the published
model's manifest, so a run can be reproduced from its manifest alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class TrainConfig:
    """Options of a training run. Defaults suit a CPU fine-tune of MobileNetV2.

    ``batch_size`` is the number of *images* per optimiser step over all
    processes; each contributes ``views`` augmented views, so the contrastive
    batch holds ``batch_size * views`` embeddings. ``steps`` is the length of
    the schedule; ``time_limit_min`` (if > 0) stops earlier, keeping the last
    weights (the schedule is not rescaled).
    """

    # data
    images: tuple[str, ...] = ()  # local folders of training images
    images_prefix: tuple[str, ...] = ()  # object-store prefixes of training images
    generated: int = 1000  # procedurally generated training images added to the pool
    max_side: int = 384  # decoded images are shrunk to this long side before augmenting
    # model
    backbone: str = "auto"  # auto: resnet50 on GPU, mobilenet_v2 on CPU
    dim: int = 512
    pretrained: bool = True
    projection_init: str = "pca"  # pca | orthogonal | default
    init_views: int = 1024  # augmented views whose trunk features fit the PCA projection init
    freeze_stages: int = -1  # leading trunk blocks kept frozen; -1: per backbone (trainer.model)
    freeze_bn: bool = True  # BatchNorm in eval mode: small batches give noisy statistics
    # augmentation
    preset: str = "wide"  # advanced | wide | light
    anchor_preset: str = "light"  # preset of view 0 of each image ("same" or "": as preset)
    crop_size: int = 224  # training views are crop_size x crop_size
    views: int = 2
    mixup: float = 0.0  # fraction of views mixed (mixup) with a view of another image
    cutmix: float = 0.0  # fraction of views cut-mixed with a view of another image
    # objective
    temperature: float = 0.05
    entropy_weight: float = 10.0
    # optimisation
    batch_size: int = 32
    steps: int = 1000
    optimizer: str = "adamw"  # adamw | sgd | lars
    lr: float = 6e-4  # projection (head) learning rate
    trunk_lr_mult: float = 0.3  # trunk learning rate = lr * trunk_lr_mult
    weight_decay: float = 1e-6
    warmup_steps: int = 50
    clip_grad: float = 1.0  # max gradient norm; 0 disables clipping
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    seed: int = 0
    # run
    workers: int = 2
    threads: int = 0  # torch intra-op threads of the training process; 0: torch's default
    device: str = "auto"
    out_dir: str = ".moderation/train"
    checkpoint_every: int = 100
    log_every: int = 10
    time_limit_min: float = 0.0
    resume: bool = True
    progress: bool = True
    # evaluation / publication
    val_dir: str = ""  # folder with references/, queries/, background/, ground_truth.csv
    eval_size: int = 0  # inference image size of the trained model; 0: settings.image_size
    eval_resize_mode: str = ""  # "" : settings.resize_mode
    publish: bool = True
    force_promote: bool = False
    export_path: str = ""  # also write the TorchScript file here (+ .json manifest beside it)
    command: str = ""  # the command line that started the run, for the manifest

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["images"] = list(self.images)
        d["images_prefix"] = list(self.images_prefix)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in d.items() if k in known}
        for key in ("images", "images_prefix"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)

    @property
    def out_path(self) -> Path:
        return Path(self.out_dir)
