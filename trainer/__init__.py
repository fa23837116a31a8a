"""SSCD self-supervised training for the copy-detection descriptor.

Modules, one concept each:

- ``config``      TrainConfig: every option of a training run.
- ``synthetic``   procedural training images (no network, no photo collection).
- ``overlays``    text, emoji-like glyphs and stripes drawn with Pillow.
- ``augment``     the augmentation chain and its presets (SSCD "advanced", "wide").
- ``data``        training-image sources, the multi-view dataset, sampler, mixup/cutmix collate.
- ``loss``        InfoNCE (multi-positive) and the KoLeo differential-entropy term.
- ``distributed`` torchrun / DDP helpers: process group, cross-rank gather with gradients.
- ``model``       the trainable descriptor: freezing, projection initialisation, parameter groups.
- ``optim``       LARS, warm-up + cosine schedule.
- ``checkpoint``  atomic save / resume.
- ``loop``        the training loop.
- (evaluation: ``moderation.evaluation``, the protocol the pipeline and the benchmarks share.)
- ``publish``     TorchScript export, PR curve, registry publication and promotion.
- ``cli``         argparse options shared by ``moderation train`` and ``python -m trainer``.
"""

from trainer.config import TrainConfig

__all__ = ["TrainConfig", "train_and_publish"]


def train_and_publish(*args, **kwargs):
    """See :func:`trainer.publish.train_and_publish` (imported lazily: torch is heavy)."""
    from trainer.publish import train_and_publish as _impl

    return _impl(*args, **kwargs)
