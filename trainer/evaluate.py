"""Evaluation of a descriptor model on a labelled validation set (DISC21 metrics).

The protocol is the production pipeline's: embed references, queries and
background images; fit PCA-whitening on the *background* descriptors only
(never on the references: that would leak them into their own
normalisation); index the whitened references; search the whitened
queries top-k; score-normalise against the background (SN: beta 1,
neighbours 1..3); compute μAP, μAP with SN, RP90 and recall@1 and the 90 %
precision thresholds with ``moderation.calibration.calibrate``.

A validation folder has ``references/``, ``queries/``, ``background/`` and
``ground_truth.csv`` (the bench-dev layout).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from moderation.calibration import calibrate
from moderation.config import Postprocess, ResizeMode, Settings
from moderation.embedding import FolderSource, embed
from moderation.errors import ModerationError
from moderation.index import build_index
from moderation.matching import Candidate, MatchParams, search
from moderation.metrics import read_ground_truth
from moderation.statistics import BackgroundIndex, fit_postprocessor


@dataclass(frozen=True)
class ValidationSet:
    references: Path
    queries: Path
    background: Path
    ground_truth: Path

    @classmethod
    def from_dir(cls, root: str | Path) -> ValidationSet:
        """The bench-dev layout under ``root``; raises ModerationError naming what is missing."""
        root = Path(root)
        vs = cls(root / "references", root / "queries", root / "background", root / "ground_truth.csv")
        paths = (vs.references, vs.queries, vs.background, vs.ground_truth)
        missing = [str(p) for p in paths if not p.exists()]
        if missing:
            raise ModerationError(f"validation set {root} lacks {', '.join(missing)}")
        return vs


@dataclass
class EvalResult:
    """Metrics (see ``calibrate``), the thresholds, and the candidates behind them."""

    metrics: dict[str, Any]
    candidates: list[Candidate]
    ground_truth: dict[str, str | None]


def evaluate_detailed(model_module, validation: ValidationSet, settings: Settings, *,
                      image_size: int | None = None, resize_mode: ResizeMode | str | None = None,
                      device=None) -> EvalResult:
    """Embed, whiten on background, search, calibrate. See the module doc."""
    if image_size:
        settings = replace(settings, image_size=int(image_size))
    if resize_mode:
        settings = replace(settings, resize_mode=ResizeMode(resize_mode))
    gt = read_ground_truth(validation.ground_truth)

    def run(folder: Path, what: str):
        return embed(model_module, FolderSource(folder), settings, device=device, desc=what)

    refs = run(validation.references, "references")
    queries = run(validation.queries, "queries")
    background = run(validation.background, "background")
    if len(refs.refs) == 0 or len(queries.refs) == 0:
        raise ModerationError("the validation set has no decodable references or queries")
    post = fit_postprocessor(background.vectors, Postprocess.WHITEN, settings.whiten_dim)
    index = build_index(post.apply(refs.vectors), refs.ids, "Flat")
    bg_index = BackgroundIndex(post.apply(background.vectors))
    params = MatchParams(k=settings.topk, beta=settings.sn_beta, sn_neighbors=settings.sn_neighbors)
    candidates = search(queries.vectors, queries.ids, index, post, bg_index, params)
    gt = {q: r for q, r in gt.items() if q in set(queries.ids)}
    cal = calibrate(candidates, gt)
    metrics = dict(cal.metrics)
    metrics["rp90_threshold_sn"] = cal.threshold if cal.reached else None
    metrics["image_size"] = settings.image_size
    metrics["resize_mode"] = ResizeMode(settings.resize_mode).value
    metrics["postprocess"] = "whiten-on-background"
    return EvalResult(metrics, candidates, gt)


def evaluate_model(model_module, references_dir, queries_dir, background_dir, gt_csv,
                   settings: Settings, **kwargs) -> dict[str, Any]:
    """μAP, μAP with SN, RP90 (raw and SN), recall@1 and thresholds of ``model_module``.

    ``model_module`` maps an ImageNet-normalised batch (B, 3, S, S) to
    descriptors (B, D) (an ``SSCDModel`` or a TorchScript module). Keys:
    ``uap``, ``uap_sn``, ``rp90``, ``rp90_sn``, ``recall_at_1``,
    ``rp90_threshold_raw`` (cosine after whitening, before SN, at 90 %
    precision), ``rp90_threshold_sn``, counts, and the image size used.
    """
    vs = ValidationSet(Path(references_dir), Path(queries_dir), Path(background_dir), Path(gt_csv))
    return evaluate_detailed(model_module, vs, settings, **kwargs).metrics
