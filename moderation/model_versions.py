"""Model versions: the default model, importing TorchScript files, loading the current one.

With no model registered, the first command registers a default:

1. the shipped default (``moderation/models/default.pt``, a descriptor
   trained by this project's trainer, with its manifest), if present;
2. otherwise a descriptor built offline from ImageNet MobileNetV2 weights
   (trunk + GeM + L2, no projection: an untrained projection would be noise).

Either way the output says so. Published SSCD TorchScript files (ResNet-50,
ResNeXt-101) are registered with ``moderation model import``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from moderation.config import ResizeMode, Settings
from moderation.descriptor import build_model, export_torchscript, load_torchscript, probe_dim
from moderation.errors import NotFoundError
from moderation.images import sha256_hex
from moderation.registry import Kind, ModelVersion, Registry, new_version_id

log = logging.getLogger(__name__)

SHIPPED_DIR = Path(__file__).parent / "models"
IMAGENET_DEFAULT_VERSION = "imagenet-mobilenetv2-gem-v1"
MODEL_FILE = "model.pt"


@dataclass
class LoadedModel:
    record: ModelVersion
    module: torch.jit.ScriptModule

    @property
    def version(self) -> str:
        return self.record.version

    def settings_for(self, settings: Settings) -> Settings:
        """Settings with the model's own preprocessing (size, resize mode)."""
        return settings.with_overrides(image_size=self.record.image_size,
                                       resize_mode=ResizeMode(self.record.resize_mode))


def shipped_default() -> tuple[ModelVersion, bytes] | None:
    """The trained default that ships in the package, if any."""
    pt, meta = SHIPPED_DIR / "default.pt", SHIPPED_DIR / "default.json"
    if not (pt.exists() and meta.exists()):
        return None
    info = json.loads(meta.read_text())
    data = pt.read_bytes()
    record = ModelVersion(
        version=info.get("version") or f"shipped-{sha256_hex(data)[:12]}",
        backbone=info.get("backbone", "mobilenet_v2"), dim=int(info["dim"]),
        image_size=int(info.get("image_size", 320)), resize_mode=info.get("resize_mode", "square"),
        source="shipped-default", metrics=info.get("metrics", {}), threshold=info.get("threshold"),
        info={k: v for k, v in info.items() if k not in ("metrics", "threshold")})
    return record, data


def imagenet_default(settings: Settings) -> tuple[ModelVersion, bytes]:
    """Build the ImageNet MobileNetV2 + GeM descriptor (offline weights) as TorchScript."""
    model = build_model("mobilenet_v2", projection_dim=0, pretrained=True)
    data = export_torchscript(model)
    record = ModelVersion(
        version=IMAGENET_DEFAULT_VERSION, backbone="mobilenet_v2", dim=model.dim,
        image_size=settings.image_size, resize_mode=settings.resize_mode.value,
        source="imagenet-default",
        info={"note": "ImageNet MobileNetV2 trunk + GeM(p=3) + L2, not trained for copy detection"})
    return record, data


def ensure_current_model(registry: Registry, settings: Settings) -> ModelVersion:
    """The model version in force, registering the default if none exists."""
    try:
        return registry.current(Kind.MODEL)
    except NotFoundError:
        pass
    shipped = shipped_default()
    record, data = shipped if shipped else imagenet_default(settings)
    log.warning("no model registered: using the default model %s (%s)", record.version, record.source)
    return registry.publish(Kind.MODEL, record, {MODEL_FILE: data})


def load_model(registry: Registry, record: ModelVersion, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a model version's TorchScript after checking its sha256 (IntegrityError if it differs)."""
    data = registry.load(Kind.MODEL, record, MODEL_FILE)
    return LoadedModel(record, load_torchscript(data, device))


def import_torchscript(registry: Registry, path: Path, *, name: str | None = None,
                       image_size: int = 320, resize_mode: ResizeMode = ResizeMode.SQUARE,
                       backbone: str = "unknown", make_current: bool = True) -> ModelVersion:
    """Register a published SSCD (or our own) TorchScript file as a model version.

    The file is loaded and run once on a blank image to check it and learn
    its dimension. Raises ModerationError if it is not a usable descriptor.
    """
    data = Path(path).read_bytes()
    module = load_torchscript(data)
    dim = probe_dim(module, image_size)
    digest = sha256_hex(data)
    version = name or f"{Path(path).stem.replace('.', '-')}-{digest[:8]}"
    record = ModelVersion(version=version, backbone=backbone, dim=dim, image_size=image_size,
                          resize_mode=ResizeMode(resize_mode).value, source="torchscript-import",
                          info={"file": Path(path).name, "sha256": digest})
    return registry.publish(Kind.MODEL, record, {MODEL_FILE: data}, make_current=make_current)


def new_trained_version(prefix: str = "sscd") -> str:
    return f"{prefix}-{new_version_id()}"
