"""After training: TorchScript export, evaluation, PR curve, publication, promotion.

``train_and_publish`` is the one function the CLI, ``torchrun -m trainer``
and the Airflow DAG call. After training (every rank), rank 0:

1. exports the model to TorchScript and reloads it: the reloaded file is
   what gets evaluated, so the figures describe the bytes that ship;
2. evaluates it on the validation set with the project's one evaluation
   protocol (:func:`moderation.evaluation.evaluate_labelled_set`: statistics
   fitted on the background, never the references; μAP, μAP-SN, RP90,
   recall@1, the 90 % precision thresholds) and draws the precision-recall curve;
3. evaluates the model in force on the same set, with its own image size;
4. publishes a new model version (``model.pt``, ``train_log.jsonl``,
   ``pr_curve.png``) whose manifest holds the metrics, the threshold, the
   training command, config and data; moves the ``CURRENT`` pointer only
   if the new model's μAP-SN beats the incumbent's (or ``force_promote``).
   Without a validation set the version is published but not promoted
   unless forced: there is nothing to compare.

``ModelVersion.threshold`` is the raw-cosine 90 %-precision point: cosine
similarity after whitening on background, before score normalisation;
``metrics["rp90_threshold_sn"]`` is the same point on SN scores, and
``info["calibrations"]`` records it as the calibration that comes with the
model (global stage, whole query): what a match run with those settings
flags at before the deployment has calibrated (:mod:`moderation.thresholds`).
"""

from __future__ import annotations

import io
import json
import logging
import shlex
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from moderation.config import ResizeMode, Settings
from moderation.descriptor import export_torchscript, load_torchscript
from moderation.errors import ConfigError, NotFoundError
from moderation.images import sha256_hex
from moderation.registry import Kind, ModelVersion, Registry, new_version_id
from trainer import distributed as D
from trainer.config import TrainConfig
from moderation.evaluation import Evaluation, ValidationSet, evaluate_labelled_set, global_stage
from trainer.loop import LOG_NAME, TrainResult, train

log = logging.getLogger(__name__)

PACKAGED_DEFAULT = Path(__file__).resolve().parent.parent / "moderation" / "models" / "default.pt"


@dataclass
class PublishResult:
    record: ModelVersion | None
    promoted: bool
    metrics: dict[str, Any] = field(default_factory=dict)
    incumbent: dict[str, Any] = field(default_factory=dict)
    train: TrainResult | None = None
    export_path: str = ""


def pr_curve_png(result: Evaluation, title: str = "precision-recall") -> bytes:
    """PNG of the pooled precision-recall curves, raw cosine and score-normalised."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from moderation.metrics import Prediction, precision_recall

    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    raw = [Prediction(c.query_id, c.reference_id, c.raw_score) for c in result.candidates]
    sn = [c.prediction() for c in result.candidates]
    m = result.metrics
    for preds, label in ((raw, f"raw (μAP {m['uap']:.3f})"), (sn, f"SN (μAP {m['uap_sn']:.3f})")):
        p, r, _ = precision_recall(preds, result.ground_truth)
        ax.plot(r, p, label=label)
    ax.axhline(0.9, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.legend(loc="lower left")
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def incumbent_model(registry: Registry | None, settings: Settings, device="cpu"):
    """(description, TorchScript-or-module on ``device``, image_size, resize_mode) of the model in force.

    The registry's current model; else the packaged default file; else the
    ImageNet starting model (trunk + GeM, no projection). None if even that
    cannot be built offline.
    """
    if registry is not None:
        try:
            rec = registry.current(Kind.MODEL)
            module = load_torchscript(registry.load(Kind.MODEL, rec, "model.pt"), device)
            return f"registry:{rec.version}", module, rec.image_size, rec.resize_mode
        except NotFoundError:
            pass
    if PACKAGED_DEFAULT.exists():
        manifest = json.loads(PACKAGED_DEFAULT.with_suffix(".json").read_text())
        return ("shipped-default", load_torchscript(PACKAGED_DEFAULT, device), manifest["image_size"],
                manifest["resize_mode"])
    try:
        from moderation.descriptor import build_model

        model = build_model("mobilenet_v2", projection_dim=0, pretrained=True).to(device).eval()
        return "imagenet-default", model, settings.image_size, settings.resize_mode
    except Exception as exc:  # no offline weights: nothing to compare against
        log.warning("no incumbent model to compare with: %s", exc)
        return None


def beats_incumbent(metrics: dict[str, Any], incumbent: dict[str, Any]) -> bool:
    """Whether the new model is better: higher μAP with SN on the same validation set.

    No metrics (no validation set): not better. No incumbent: better. An
    incumbent that could not be evaluated: not better (promote by hand).
    """
    if not metrics:
        return False
    if not incumbent:
        return True
    if "uap_sn" not in incumbent:
        return False
    return float(metrics["uap_sn"]) > float(incumbent["uap_sn"])


def command_line() -> str:
    """This process's command line, with ``python -m trainer`` for the module entry point."""
    argv = list(sys.argv)
    if argv and argv[0].replace("\\", "/").endswith("trainer/__main__.py"):
        argv[0:1] = ["python", "-m", "trainer"]
    return " ".join(shlex.quote(a) for a in argv)


def train_and_publish(config: TrainConfig, settings: Settings, *, registry: Registry | None = None,
                      env: D.DistEnv | None = None) -> PublishResult | None:
    """Train, export, evaluate, publish and (maybe) promote. Returns None on ranks other than 0.

    ``registry`` defaults to the one in ``settings``' object store (when
    ``config.publish``). The DAG and both command lines call this.
    """
    if config.force_promote and config.publish and not config.val_dir:
        # Forcing skips the comparison, not the evaluation: the model in force must carry its
        # metrics and 90 %-precision threshold, or matching would flag with none.
        raise ConfigError("force_promote needs a validation set (--val-dir): a promoted model must carry "
                          "metrics and a threshold. Add one, or publish without promoting and promote "
                          "by hand with `moderation model promote VERSION` after checking it.")
    env = env or D.init_distributed(config.device)
    if not config.command:
        config = replace(config, command=command_line())
    result = train(config, settings, env)
    if not env.is_main:
        return None
    if registry is None and config.publish:
        from moderation.store import open_store

        registry = Registry(open_store(settings))
    config = result.config
    model_bytes = export_torchscript(result.model, example_size=config.crop_size)
    scripted = load_torchscript(model_bytes, env.device)
    found = incumbent_model(registry, settings, env.device)
    # Unless told otherwise the new model runs at the size of the one it replaces: its threshold,
    # the statistics and the operators' cost figures were all made at that size.
    image_size = config.eval_size or (found[2] if found else settings.image_size)
    resize_mode = ResizeMode(config.eval_resize_mode or (found[3] if found else settings.resize_mode)).value
    metrics: dict[str, Any] = {}
    incumbent: dict[str, Any] = {}
    calibrations: list[dict[str, Any]] = []
    png = b""
    if config.val_dir:
        vs = ValidationSet.from_dir(config.val_dir)
        evaluation = evaluate_labelled_set(scripted, vs, settings, image_size=image_size,
                                           resize_mode=resize_mode, device=env.device)
        metrics = dict(evaluation.metrics, validation_set=str(config.val_dir))
        png = pr_curve_png(evaluation, f"{result.config.backbone} {config.dim}-d, {config.val_dir}")
        incumbent = _evaluate_incumbent(found, settings, vs, env.device)
        if evaluation.fit.reached:  # a threshold that never reached 90 % precision is no calibration
            calibrations = [model_calibration(evaluation, settings, f"validation set {config.val_dir}")]
    beats = beats_incumbent(metrics, incumbent)
    promote = config.force_promote or beats
    record = ModelVersion(
        version=new_version_id(sha256_hex(model_bytes)),
        backbone=config.backbone, dim=result.model.dim, image_size=image_size, resize_mode=resize_mode,
        source="trained", metrics=metrics, threshold=metrics.get("rp90_threshold_raw"),
        info=dict(_info(config, result, incumbent, promote, beats), calibrations=calibrations))
    files = {"model.pt": model_bytes, "train_log.jsonl": _log_bytes(config)}
    if png:
        files["pr_curve.png"] = png
    stored = None
    if config.publish and registry is not None:
        stored = registry.publish(Kind.MODEL, record, files, make_current=promote)
        log.info("published model %s (%s)", stored.version, "promoted" if promote else "not promoted")
    export_path = ""
    if config.export_path:
        export_path = write_export(Path(config.export_path), record, files)
    return PublishResult(stored or record, promote and stored is not None, metrics, incumbent, result,
                         export_path)


def _evaluate_incumbent(found, settings: Settings, vs: ValidationSet, device) -> dict[str, Any]:
    """Metrics of the model in force (``incumbent_model``'s answer) on ``vs`` ({} if there is none;
    "error" if it fails to run)."""
    if found is None:
        return {}
    name, module, size, mode = found
    try:
        return dict(evaluate_labelled_set(module, vs, settings, image_size=size, resize_mode=mode,
                                          device=device).metrics, model=name)
    except Exception as exc:  # a broken incumbent must not lose the new model
        log.warning("could not evaluate the model in force (%s): %s", name, exc)
        return {"model": name, "error": f"{type(exc).__name__}: {exc}"}


def model_calibration(evaluation: Evaluation, settings: Settings, fitted_on: str) -> dict[str, Any]:
    """A manifest ``calibrations`` entry (see :mod:`moderation.thresholds`) from a global-stage evaluation.

    Its threshold is the evaluation's 90 %-precision point on the normalised
    score of the whole query, valid for match runs without views or
    verification under the same post-processing.
    """
    fit = evaluation.fit
    m = evaluation.metrics
    return {"matching": global_stage(settings).as_dict(), "postprocess": settings.postprocess.value,
            "threshold": fit.threshold, "high_threshold": fit.high_threshold, "combiner": {},
            "target_reached": fit.reached, "fitted_on": fitted_on,
            "metrics": {k: m.get(k) for k in ("uap_sn", "rp90_sn", "recall_at_1", "n_queries", "n_positives",
                                              "n_flagged", "flagged_precision")}}


def write_export(path: Path, record: ModelVersion, files: dict[str, bytes]) -> str:
    """Write ``model.pt`` to ``path`` and the manifest to ``path`` with suffix ``.json``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(files["model.pt"])
    manifest = asdict(replace(record, files={n: sha256_hex(b) for n, b in files.items()
                                             if n == "model.pt"}))
    path.with_suffix(".json").write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
    if "pr_curve.png" in files:
        path.with_name(path.stem + "_pr_curve.png").write_bytes(files["pr_curve.png"])
    return str(path)


def _info(config: TrainConfig, result: TrainResult, incumbent: dict, promoted: bool, beats: bool) -> dict:
    last = result.log_rows[-1] if result.log_rows else {}
    return {
        "training_command": config.command,
        "config": config.to_dict(),
        "data": {"pool": result.pool_counts, "folders": list(config.images),
                 "prefixes": list(config.images_prefix), "generated": config.generated},
        "steps": result.steps_done, "stopped_early": result.stopped_early,
        "train_seconds": round(result.seconds, 1), "images_per_s": round(result.images_per_s, 2),
        "final_loss": last.get("loss"), "projection_init": result.projection_init,
        "incumbent": incumbent, "beats_incumbent": beats, "promoted": promoted,
        "threshold_meaning": "cosine after background whitening, before SN, at 90% precision",
    }


def _log_bytes(config: TrainConfig) -> bytes:
    path = Path(config.out_dir) / LOG_NAME
    return path.read_bytes() if path.exists() else b""
