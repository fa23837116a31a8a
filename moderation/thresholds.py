"""The threshold a match run flags at, and where it comes from.

A threshold only means something on the score it was chosen for: the
normalised score of the global stage, or the fused score of two-stage
matching, under the statistics it was fitted with. In order:

1. ``MODERATION_THRESHOLD``: an operator's explicit choice;
2. the calibration of the run's (model, statistics) pair, if it was fitted
   for the run's matching settings (``moderation calibrate``);
3. a calibration that comes with the model itself: an entry of its
   manifest's ``calibrations`` (the shipped default model's, fitted on a
   labelled set; a trained model's, from its validation set) fitted for the
   run's matching settings and the statistics' post-processing. It was made
   with another background set, so it is an approximation that the log names;
4. otherwise **nothing is flagged**. The run still keeps every candidate
   (``runs/BATCH/candidates.csv``) and records ``no threshold: ...`` as its
   threshold source; after ``moderation calibrate`` a rerun of the batch
   flags it.

Why not a fixed fallback number: a cut on a score nobody calibrated has
unknown precision, and a moderation queue that silently fills with false
matches costs moderators' time and trust. On bench-dev's 214 queries the
fixed 0.25 this replaced flagged 172 pairs at precision 0.59 (global stage)
and 260 at 0.46 (default two stages), where the thresholds fitted on other
labelled queries flag 66 at 0.92 and 130 at 0.92
(``benchmarks/results/shipped_calibration_*.json``). An operator expects
flagged pairs at the documented precision, or none and a warning that says why.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from moderation.fusion import DEFAULT_RULE, Combiner
from moderation.registry import Calibration, ModelVersion, StatsVersion

log = logging.getLogger(__name__)

NO_THRESHOLD = "no threshold"


@dataclass(frozen=True)
class FlagThreshold:
    """The threshold of a match run (``value`` None: flag nothing), why, and the score combiner."""

    value: float | None
    source: str
    combiner: Combiner = DEFAULT_RULE
    high: float | None = None

    @property
    def flags(self) -> bool:
        return self.value is not None


def same_matching(have: dict[str, Any] | None, wanted: dict[str, Any]) -> bool:
    """Whether a threshold fitted under matching settings ``have`` applies to a run with ``wanted``.

    ``have`` empty or None: a global-stage calibration from before views and
    verification existed (whole query, no verification).
    """
    have = have or {"verify": False, "views": "full"}
    keys = ["verify", "views"]
    if have.get("verify"):
        keys.append("features")
    if have.get("views") != "full":
        keys.append("crop_penalty")
    return all(have.get(k, 0.0 if k == "crop_penalty" else None) == wanted.get(k) for k in keys)


def model_calibrations(model: ModelVersion) -> list[dict[str, Any]]:
    """The calibrations a model version carries in its manifest (``info["calibrations"]``).

    A shipped default registered before its manifest listed them gets the
    packaged manifest's, when that manifest is of the same version.
    """
    found = model.info.get("calibrations")
    if found is None and model.source == "shipped-default":
        from moderation.model_versions import SHIPPED_DIR

        path = SHIPPED_DIR / "default.json"
        if path.exists():
            packaged = json.loads(path.read_text())
            if packaged.get("version") == model.version:
                found = packaged.get("calibrations")
    return list(found or [])


def choose(threshold_override: float, wanted: dict[str, Any], model: ModelVersion, stats: StatsVersion,
           calibration: Calibration | None) -> FlagThreshold:
    """The threshold of a run with matching settings ``wanted`` (``TwoStageConfig.as_dict()``).

    See the module docstring for the order. Logs a warning whenever the
    run does not flag at a calibration of its own (model, statistics) pair.
    """
    usable = calibration is not None and same_matching(calibration.matching, wanted)
    shipped = next((c for c in model_calibrations(model)
                    if same_matching(c.get("matching"), wanted) and c.get("postprocess") == stats.postprocess),
                   None)
    if usable:
        combiner = Combiner.from_dict(calibration.combiner) if calibration.combiner else DEFAULT_RULE
    elif shipped is not None:
        combiner = Combiner.from_dict(shipped["combiner"]) if shipped.get("combiner") else DEFAULT_RULE
    else:
        combiner = DEFAULT_RULE
    if threshold_override:
        return FlagThreshold(threshold_override, "MODERATION_THRESHOLD", combiner)
    if usable:
        return FlagThreshold(calibration.threshold, f"calibration {calibration.version}", combiner,
                             calibration.high_threshold)
    if calibration is not None:
        log.warning("calibration %s was fitted for other matching settings (%s) than this run's (%s): "
                    "its threshold does not apply. Recalibrate with `moderation calibrate`.",
                    calibration.version, calibration.matching or "global stage only", wanted)
    if shipped is not None:
        where = shipped.get("fitted_on", "its manifest")
        log.warning("no calibration for model %s + statistics %s: flagging at the threshold %.4f that ships "
                    "with the model (fitted on %s with that set's background statistics). Run "
                    "`moderation calibrate` on your own labelled set.", model.version, stats.version,
                    shipped["threshold"], where)
        return FlagThreshold(float(shipped["threshold"]), f"model {model.version} manifest ({where})", combiner,
                             shipped.get("high_threshold"))
    reason = (f"{NO_THRESHOLD}: no calibration of model {model.version} + statistics {stats.version} "
              f"for these matching settings, and none ships with the model")
    log.warning("%s: NOTHING IS FLAGGED by the descriptor in this run (the candidates are kept; PDQ matches, "
                "which have a fixed bar of their own, still are). Run `moderation calibrate "
                "--images LABELLED_DIR --ground-truth gt.csv`, or set MODERATION_THRESHOLD, then rerun the batch.",
                reason)
    return FlagThreshold(None, reason, combiner)
