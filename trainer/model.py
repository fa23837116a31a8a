"""The trainable descriptor: backbone choice, freezing, projection head, parameter groups.

The network is ``moderation.descriptor.SSCDModel`` (trunk -> GeM p=3 ->
linear projection -> L2), the very class inference exports, so a trained
model scripts to the same TorchScript interface.

Fine-tuning on a small, unlabeled set needs care that pre-training on
millions of images does not:

- *Projection initialisation.* A random projection scrambles ImageNet
  features, and the first steps then spend the small budget undoing that.
  ``pca`` starts the projection as PCA-whitening of the trunk's pooled
  features on augmented training views, the best known linear descriptor
  for those features (what the whitening post-process computes), so
  training starts from the starting model's accuracy, not below it.
- *A whitened head.* Trained directly, a whitening matrix is badly scaled
  for Adam (tiny weights along the strong directions, huge along the weak
  ones; Adam moves every weight by about the same amount). During training
  the head is therefore ``W2 @ (P x + b0) + b2`` with the PCA-whitening
  ``P, b0`` fixed and ``W2`` starting at the identity; ``finalise_head``
  folds it into one ``nn.Linear`` before export.
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


class WhitenedLinear(nn.Module):
    """``linear(P @ x + b0)``: a fixed whitening ``P, b0`` followed by a trainable square layer."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.register_buffer("whiten", torch.zeros(out_features, in_features))
        self.register_buffer("whiten_bias", torch.zeros(out_features))
        self.linear = nn.Linear(out_features, out_features)
        self.in_features, self.out_features = in_features, out_features
        self.reset_identity()

    @torch.no_grad()
    def reset_identity(self) -> None:
        self.linear.weight.copy_(torch.eye(self.out_features))
        self.linear.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x @ self.whiten.t() + self.whiten_bias)

    @torch.no_grad()
    def folded(self) -> nn.Linear:
        """The same map as one ``nn.Linear(in, out)``."""
        out = nn.Linear(self.in_features, self.out_features)
        w2 = self.linear.weight
        out.weight.copy_(w2 @ self.whiten)
        out.bias.copy_(w2 @ self.whiten_bias + self.linear.bias)
        return out.to(self.whiten.device)


DEFAULT_FROZEN_BLOCKS = {
    # A CPU fine-tune of MobileNetV2: blocks 0-9 (stem to the 1/16-resolution stage) keep their
    # ImageNet filters; training them too bought nothing on bench-dev and costs backward time.
    Backbone.MOBILENET_V2: 10,
    # ResNets train on GPUs with enough data to adapt every block, as in SSCD.
    Backbone.RESNET50: 0,
    Backbone.RESNEXT101: 0,
}


def frozen_blocks_for(backbone: Backbone, freeze_stages: int) -> int:
    """``freeze_stages``, or the backbone's default when it is negative."""
    return DEFAULT_FROZEN_BLOCKS[Backbone(backbone)] if freeze_stages < 0 else freeze_stages


def build_training_model(backbone: Backbone, dim: int, pretrained: bool = True,
                         freeze_stages: int = 0, projection_init: str = "pca") -> SSCDModel:
    """SSCDModel with a ``dim`` projection and its first ``freeze_stages`` trunk blocks frozen.

    Trunk blocks are the children of the trunk's Sequential: MobileNetV2's
    19 feature blocks; ResNet's conv1, bn1, relu, maxpool, layer1..layer4.
    A negative ``freeze_stages`` means the backbone's default
    (``DEFAULT_FROZEN_BLOCKS``).
    With ``projection_init="pca"`` the projection is a WhitenedLinear until
    ``finalise_head``.
    """
    if dim < 1:
        raise ModerationError("a trained model needs a projection: dim must be >= 1")
    model = SSCDModel(backbone, projection_dim=dim, pretrained=pretrained)
    freeze_stages = frozen_blocks_for(backbone, freeze_stages)
    if projection_init == "pca":
        model.projection = WhitenedLinear(model.projection.in_features, dim)
    blocks = list(model.trunk.children())
    if freeze_stages > len(blocks):
        raise ModerationError(f"freeze_stages={freeze_stages} but the trunk has {len(blocks)} blocks")
    for block in blocks[:freeze_stages]:
        for p in block.parameters():
            p.requires_grad_(False)
    model.frozen_blocks = freeze_stages
    return model


def finalise_head(model: SSCDModel) -> SSCDModel:
    """Make ``model`` the plain inference network again (in place); returns it.

    Folds a WhitenedLinear head into one ``nn.Linear`` and turns
    SyncBatchNorm layers (multi-GPU training) back into BatchNorm2d, which
    TorchScript exports and which needs no process group.
    """
    if isinstance(model.projection, WhitenedLinear):
        model.projection = model.projection.folded()
    _revert_sync_batchnorm(model)
    return model


def _revert_sync_batchnorm(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.SyncBatchNorm):
            bn = nn.BatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                child.track_running_stats)
            bn.load_state_dict(child.state_dict())
            bn.train(child.training)
            setattr(module, name, bn)
        else:
            _revert_sync_batchnorm(child)


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


def pca_whitening(features: torch.Tensor, dim: int, eps_relative: float = 0.1
                  ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(P (dim, C), b0 (dim,)) with ``P @ x + b0`` the PCA-whitened ``x``; None if degenerate.

    Eigenvalues get a floor of ``eps_relative`` times their mean so
    near-null directions are not blown up into noise.
    """
    if features.shape[0] <= dim:
        return None
    x = features.double()
    mean = x.mean(0)
    # SVD of the centred data: (n x C) is much cheaper than eigh of the C x C covariance when n < C.
    _, sing, vt = torch.linalg.svd(x - mean, full_matrices=False)
    evals = (sing[:dim] ** 2) / (x.shape[0] - 1)
    evecs = vt[:dim].t()  # (C, dim), descending variance
    floor = eps_relative * evals.clamp(min=0).mean()
    if float(floor) <= 1e-12:  # e.g. an untrained trunk in eval mode: constant features
        return None
    p = (evecs / torch.sqrt(evals.clamp(min=0) + floor)).t()
    if not bool(torch.isfinite(p).all()):
        return None
    return p.float(), (-p @ mean).float()


@torch.no_grad()
def init_projection(model: SSCDModel, method: str, features: torch.Tensor | None = None) -> str:
    """Initialise ``model.projection``; returns the method actually used.

    ``pca`` needs ``features`` (n > dim rows of pooled trunk features of
    training views); without usable ones it falls back to ``orthogonal``
    (for a WhitenedLinear: an orthogonal ``P``).
    """
    proj = model.projection
    if method == "pca":
        fit = pca_whitening(features, proj.out_features) if features is not None else None
        target = proj.whiten if isinstance(proj, WhitenedLinear) else proj.weight
        bias = proj.whiten_bias if isinstance(proj, WhitenedLinear) else proj.bias
        if fit is not None:
            target.copy_(fit[0])
            bias.copy_(fit[1])
            return "pca"
        log.warning("no usable trunk features for the PCA projection init; using orthogonal")
        nn.init.orthogonal_(target)
        bias.zero_()
        return "orthogonal"
    if not isinstance(proj, nn.Linear):
        raise ModerationError(f"projection init {method!r} needs a plain linear projection")
    if method == "orthogonal":
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
    groups: dict[tuple[str, bool], list] = {("trunk", True): [], ("trunk", False): [],
                                            ("head", True): [], ("head", False): []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = "trunk" if name.startswith("trunk.") else "head"
        groups[(part, p.ndim > 1)].append(p)
    out = []
    for (part, decay), params in groups.items():
        if params:
            out.append({"params": params, "lr": lr * (trunk_lr_mult if part == "trunk" else 1.0),
                        "weight_decay": weight_decay if decay else 0.0,
                        "name": f"{part}{'' if decay else '-nodecay'}", "lars_exclude": not decay})
    return out
