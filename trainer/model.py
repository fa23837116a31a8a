"""The trainable descriptor: backbone choice, freezing, projection initialisation, parameter groups.

The network is ``moderation.descriptor.SSCDModel`` (trunk -> GeM p=3 ->
linear projection -> L2), the very class inference exports, so a trained
model scripts to the same TorchScript interface.

Fine-tuning on a small, unlabeled set needs care that pre-training on
millions of images does not:

- *Projection initialisation.* A random projection scrambles ImageNet
  features, and the first steps then spend the small budget undoing that.
  ``pca`` sets the projection to PCA-whitening of the trunk's pooled
  features on augmented training views (bias = -W @ mean), which is the
  best known linear descriptor for those features (it is what the
  whitening post-process computes), so training starts from the starting
  model's accuracy rather than below it.
- *Frozen early blocks* (``freeze_stages``): low-level filters transfer
  as they are; freezing them also skips their backward pass (faster on CPU).
- *Frozen BatchNorm statistics* (``freeze_bn``): statistics of a
  32-image batch of heavy augmentations are noisy and would drift away
  from ImageNet's; the affine scale and shift still learn.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from moderation.descriptor import Backbone, SSCDModel
from moderation.errors import ModerationError

log = logging.getLogger(__name__)


def resolve_backbone(name: str, device: torch.device) -> Backbone:
    """``auto``: ResNet-50 on a GPU, MobileNetV2 on the CPU."""
    if name in ("", "auto"):
        return Backbone.RESNET50 if device.type == "cuda" else Backbone.MOBILENET_V2
    try:
        return Backbone(name)
    except ValueError:
        raise ModerationError(f"unknown backbone {name!r}; one of auto, "
                              + ", ".join(b.value for b in Backbone)) from None


def build_training_model(backbone: Backbone, dim: int, pretrained: bool = True,
                         freeze_stages: int = 0) -> SSCDModel:
    """SSCDModel with a ``dim`` projection and its first ``freeze_stages`` trunk blocks frozen.

    Trunk blocks are the children of the trunk's Sequential: MobileNetV2's
    19 feature blocks; ResNet's conv1, bn1, relu, maxpool, layer1..layer4.
    """
    if dim < 1:
        raise ModerationError("a trained model needs a projection: dim must be >= 1")
    model = SSCDModel(backbone, projection_dim=dim, pretrained=pretrained)
    blocks = list(model.trunk.children())
    if freeze_stages > len(blocks):
        raise ModerationError(f"freeze_stages={freeze_stages} but the trunk has {len(blocks)} blocks")
    for block in blocks[:freeze_stages]:
        for p in block.parameters():
            p.requires_grad_(False)
    model.frozen_blocks = freeze_stages
    return model


def set_train_mode(model: nn.Module, freeze_bn: bool) -> None:
    """``model.train()``, but keep frozen blocks and (optionally) all BatchNorm in eval mode."""
    model.train()
    core = model.module if hasattr(model, "module") else model
    for block in list(core.trunk.children())[:getattr(core, "frozen_blocks", 0)]:
        block.eval()
    if freeze_bn:
        for m in core.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()  # running statistics fixed; the affine parameters still learn


@torch.no_grad()
def init_projection(model: SSCDModel, method: str, features: torch.Tensor | None = None,
                    eps_relative: float = 0.1) -> str:
    """Initialise ``model.projection``; returns the method actually used.

    ``features`` (n, C) are pooled trunk features of training views, needed
    for ``pca``; with fewer than ``dim + 1`` of them PCA falls back to
    ``orthogonal``. Eigenvalues get a floor of ``eps_relative`` times their
    mean so near-null directions are not blown up.
    """
    proj = model.projection
    if not isinstance(proj, nn.Linear):
        return "none"
    dim, channels = proj.out_features, proj.in_features
    if method == "pca" and features is not None and features.shape[0] > dim:
        x = features.double()
        mean = x.mean(0)
        cov = (x - mean).t() @ (x - mean) / (x.shape[0] - 1)
        evals, evecs = torch.linalg.eigh(cov)  # ascending
        evals, evecs = evals.flip(0)[:dim], evecs.flip(1)[:, :dim]
        floor = eps_relative * evals.clamp(min=0).mean()
        if float(floor) > 1e-12:  # degenerate features (e.g. an untrained trunk): no PCA
            w = (evecs / torch.sqrt(evals.clamp(min=0) + floor)).t()  # (dim, C)
            if bool(torch.isfinite(w).all()):
                proj.weight.copy_(w.float())
                proj.bias.copy_((-w @ mean).float())
                return "pca"
        log.warning("trunk features are degenerate; orthogonal projection init instead of PCA")
        method = "orthogonal"
    if method in ("pca", "orthogonal"):
        if method == "pca" and (features is None or features.shape[0] <= dim):
            log.warning("PCA projection init needs more than %d feature rows; using orthogonal", dim)
        nn.init.orthogonal_(proj.weight)
        nn.init.zeros_(proj.bias)
        return "orthogonal"
    if method == "default":
        return "default"
    raise ModerationError(f"unknown projection init {method!r}; one of pca, orthogonal, default")


@torch.no_grad()
def pooled_features(model: SSCDModel, images: torch.Tensor) -> torch.Tensor:
    """GeM-pooled trunk features (n, C), the projection's input."""
    return model.pool(model.trunk(images))


def param_groups(model: SSCDModel, lr: float, trunk_lr_mult: float, weight_decay: float) -> list[dict]:
    """Trunk and head groups (trunk lr scaled); biases and norms without weight decay."""
    groups = {("trunk", True): [], ("trunk", False): [], ("head", True): [], ("head", False): []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = "trunk" if name.startswith("trunk.") else "head"
        groups[(part, p.ndim > 1)].append(p)
    out = []
    for (part, decay), params in groups.items():
        if params:
            out.append({"params": params, "lr": lr * (trunk_lr_mult if part == "trunk" else 1.0),
                        "weight_decay": weight_decay if decay else 0.0, "name": f"{part}{'' if decay else '-nodecay'}",
                        "lars_exclude": not decay})
    return out
