"""Data-quality gates (great-expectations 1.x) and the review hold-back.

Three suites, each run on a pandas frame built from what a job has in hand:

- **image batches** (references, queries): one row per object with its
  sha256, decode status and size. Expectations: decode failure rate, image
  sides within bounds, duplicates by content hash.
- **embeddings**: one row per vector with its dimension, L2 norm and
  whether every component is finite. Expectations: the model's dimension,
  unit norm, no NaN/Inf.
- **flagged pairs** of a match run: score ranges, ranks, one row per
  (query, reference), and the day's count against the trailing average of
  earlier runs (a sudden spike fails).

A failed gate raises :class:`QualityGateError` whose message says which
expectation failed and by how much. The Airflow tasks turn it into a
non-retried task failure.

Hold-back: a match run's flagged pairs stay out of the review queue while
its batch has an unreleased row in ``quality_holds`` (migration
``0003_quality_hold.sql``). The matching DAG places a ``pending`` hold in the
transaction that publishes the batch's new pairs (``Database.finish_run``
with ``hold=``), so a rerun that dies never hides the pairs already
released; the flagged-pairs gate releases it when it passes and turns
it into ``held`` when it fails; an operator lets held rows through with
:func:`release_hold` (or by rerunning the day with ``release_hold=true``).
"""

from __future__ import annotations

import io
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from typing import Any

import numpy as np

from moderation.errors import ConfigError, ModerationError

log = logging.getLogger(__name__)

ENV_PREFIX = "MODERATION_QUALITY_"


class QualityGateError(ModerationError):
    """A data-quality gate failed; ``result`` holds the per-expectation details."""

    def __init__(self, result: GateResult):
        self.result = result
        super().__init__(result.summary())


@dataclass(frozen=True)
class QualityLimits:
    """Bounds of the gates. Field ``foo`` is read from ``MODERATION_QUALITY_FOO``."""

    max_failure_rate: float = 0.2  # share of a batch allowed to fail decoding
    min_side: int = 32  # pixels: smaller images carry too little to match
    max_side: int = 20_000
    size_mostly: float = 0.99  # share of decoded images that must be within the side bounds
    max_duplicate_rate: float = 0.05  # share of images whose bytes duplicate another's
    norm_tolerance: float = 1e-3  # |norm - 1| allowed for a descriptor
    spike_factor: float = 3.0  # today's flagged count may be at most factor x trailing mean ...
    spike_min_count: int = 20  # ... or this many, whichever is larger
    spike_min_history: int = 3  # earlier complete runs needed before the spike gate applies
    spike_window: int = 14  # earlier runs averaged
    score_margin: float = 1e-4

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> QualityLimits:
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            name = ENV_PREFIX + f.name.upper()
            raw = env.get(name, "")
            if raw == "":
                continue
            kind = int if f.type in ("int", int) else float
            try:
                values[f.name] = kind(raw)
            except ValueError:
                raise ConfigError(f"{name}={raw!r} is not a valid {kind.__name__}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


# -- running a suite -------------------------------------------------------------------------


@dataclass
class ExpectationOutcome:
    expectation: str
    kwargs: dict[str, Any]
    success: bool
    observed: dict[str, Any]
    message: str


@dataclass
class GateResult:
    """The outcome of one gate: success and one line per expectation."""

    gate: str
    success: bool
    rows: int
    outcomes: list[ExpectationOutcome] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> list[ExpectationOutcome]:
        return [o for o in self.outcomes if not o.success]

    def summary(self) -> str:
        head = (f"quality gate '{self.gate}' {'passed' if self.success else 'FAILED'} "
                f"on {self.rows} rows")
        if self.success:
            return head
        lines = [f"{head}: {len(self.failed)} of {len(self.outcomes)} expectations failed"]
        lines += [f"  - {o.message}" for o in self.failed]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(asdict(self))

    def raise_for_failure(self) -> GateResult:
        if not self.success:
            raise QualityGateError(self)
        return self


_CONTEXT = None
_DEFINITIONS: dict[str, Any] = {}


def _gx():
    """great_expectations and an ephemeral context (created once per process)."""
    global _CONTEXT
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx

    if _CONTEXT is None:
        from great_expectations.data_context.types.base import ProgressBarsConfig

        ctx = gx.get_context(mode="ephemeral")
        ctx.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
        _CONTEXT = ctx
    return gx, _CONTEXT


def run_suite(gate: str, frame, expectations: Sequence[Any], info: dict[str, Any] | None = None) -> GateResult:
    """Validate ``frame`` (a pandas DataFrame) against ``expectations``; never raises on failure."""
    gx, ctx = _gx()
    name = f"gate_{gate}"
    definition = _DEFINITIONS.get(name)
    if definition is None:
        asset = ctx.data_sources.add_or_update_pandas(name).add_dataframe_asset("frame")
        definition = _DEFINITIONS[name] = asset.add_batch_definition_whole_dataframe("whole")
    batch = definition.get_batch(batch_parameters={"dataframe": frame})
    suite = gx.ExpectationSuite(name=name, expectations=list(expectations))
    validation = batch.validate(suite, result_format="SUMMARY")
    outcomes = [_outcome(r) for r in validation.results]
    return GateResult(gate, bool(validation.success), len(frame), outcomes, info or {})


def _outcome(r) -> ExpectationOutcome:
    cfg = r.expectation_config
    kwargs = {k: v for k, v in cfg.kwargs.items() if k not in ("batch_id",)}
    res = dict(r.result or {})
    observed = {k: res.get(k) for k in ("element_count", "unexpected_count", "unexpected_percent",
                                        "missing_count", "observed_value", "partial_unexpected_list")
                if res.get(k) is not None}
    if "partial_unexpected_list" in observed:
        observed["partial_unexpected_list"] = list(observed["partial_unexpected_list"])[:5]
    if r.exception_info and r.exception_info.get("raised_exception"):
        msg = f"{cfg.type}: could not be evaluated: {r.exception_info.get('exception_message')}"
        return ExpectationOutcome(cfg.type, _jsonable(kwargs), False, _jsonable(observed), msg)
    return ExpectationOutcome(cfg.type, _jsonable(kwargs), bool(r.success), _jsonable(observed),
                              _describe(cfg.type, kwargs, res, bool(r.success)))


def _describe(kind: str, kwargs: dict[str, Any], res: dict[str, Any], success: bool) -> str:
    """One readable line: what was expected, what was seen, and by how much it missed."""
    target = kwargs.get("column") or ",".join(kwargs.get("column_list") or []) or "table"
    bounds = []
    if kwargs.get("min_value") is not None:
        bounds.append(f">= {kwargs['min_value']:g}")
    if kwargs.get("max_value") is not None:
        bounds.append(f"<= {kwargs['max_value']:g}")
    if kwargs.get("value_set") is not None:
        bounds.append(f"in {list(kwargs['value_set'])}")
    rule = " and ".join(bounds)
    if "observed_value" in res and res.get("unexpected_count") is None:
        observed = res["observed_value"]
        detail = f"observed {observed}"
        if not success and isinstance(observed, (int, float)):
            lo, hi = kwargs.get("min_value"), kwargs.get("max_value")
            if hi is not None and observed > hi:
                detail += f", {observed - hi:g} above the maximum {hi:g}"
            elif lo is not None and observed < lo:
                detail += f", {lo - observed:g} below the minimum {lo:g}"
        return f"{kind} [{target}{' ' + rule if rule else ''}]: {detail}"
    n = res.get("element_count") or 0
    bad = res.get("unexpected_count") or 0
    missing = res.get("missing_count") or 0
    pct = res.get("unexpected_percent")
    mostly = kwargs.get("mostly")
    allowed = f"{(1 - mostly) * 100:.1f}%" if mostly is not None else "0%"
    msg = (f"{kind} [{target}{' ' + rule if rule else ''}]: {bad} of {n - missing} values unexpected"
           f" ({(pct or 0):.1f}%, allowed {allowed})")
    if not success and pct is not None:
        over = pct - (1 - (mostly if mostly is not None else 1.0)) * 100
        msg += f", over by {over:.1f} points"
    examples = [e[:16] + "…" if isinstance(e, str) and len(e) > 16 else e
                for e in list(res.get("partial_unexpected_list") or [])[:5]]
    if examples and not success:
        msg += f"; e.g. {examples}"
    return msg


# -- image batches ---------------------------------------------------------------------------

PROFILE_COLUMNS = ("key", "image_id", "sha256", "bytes", "width", "height", "min_side", "max_side",
                   "decoded", "reason")


def profile_images(read: Callable[[str], bytes], keys: Iterable[str], *,
                   max_pixels: int = 64_000_000, max_bytes: int = 50_000_000):
    """One row per image: content hash, decode status (the library's bad-input policy) and size.

    ``read`` fetches an object's bytes (e.g. ``store.get``). An unreadable
    object is a row with ``decoded=False`` and reason ``unreadable``.
    """
    import pandas as pd

    from moderation.images import decode_image, image_id_from, sha256_hex

    rows = []
    for key in keys:
        row = {"key": key, "image_id": image_id_from(key), "sha256": None, "bytes": 0,
               "width": math.nan, "height": math.nan, "decoded": False, "reason": ""}
        try:
            data = read(key)
        except Exception as exc:  # noqa: BLE001 - recorded per image
            row["reason"] = f"unreadable: {type(exc).__name__}"
            rows.append(row)
            continue
        row["sha256"] = sha256_hex(data)
        row["bytes"] = len(data)
        try:
            img = decode_image(data, max_pixels, max_bytes)
            row["width"], row["height"] = float(img.size[0]), float(img.size[1])
            row["decoded"] = True
        except Exception as exc:  # noqa: BLE001
            row["reason"] = getattr(exc, "reason", type(exc).__name__)
        rows.append(row)
    frame = pd.DataFrame(rows, columns=[c for c in PROFILE_COLUMNS if c not in ("min_side", "max_side")])
    frame["min_side"] = frame[["width", "height"]].min(axis=1, skipna=False)
    frame["max_side"] = frame[["width", "height"]].max(axis=1, skipna=False)
    frame["decoded"] = frame["decoded"].astype(bool)
    return frame[list(PROFILE_COLUMNS)]


def profile_to_csv(frame) -> bytes:
    return frame.to_csv(index=False).encode()


def profile_from_csv(data: bytes):
    import pandas as pd

    frame = pd.read_csv(io.BytesIO(data), dtype={"sha256": "string", "reason": "string",
                                                 "key": "string", "image_id": "string"},
                        keep_default_na=False, na_values={"width": [""], "height": [""],
                                                          "min_side": [""], "max_side": [""]})
    frame["sha256"] = frame["sha256"].replace("", None)
    frame["decoded"] = frame["decoded"].astype(str).str.lower().isin(["true", "1"])
    return frame


def check_image_batch(frame, what: str, limits: QualityLimits | None = None) -> GateResult:
    """Decode failure rate, image sides, duplicates by hash. Returns the result (see ``raise_for_failure``)."""
    import great_expectations.expectations as gxe

    limits = limits or QualityLimits.from_env()
    exps = [
        gxe.ExpectTableRowCountToBeBetween(min_value=1),
        gxe.ExpectColumnValuesToBeInSet(column="decoded", value_set=[True],
                                        mostly=round(1.0 - limits.max_failure_rate, 6)),
        gxe.ExpectColumnValuesToBeBetween(column="min_side", min_value=limits.min_side,
                                          mostly=limits.size_mostly),
        gxe.ExpectColumnValuesToBeBetween(column="max_side", max_value=limits.max_side,
                                          mostly=limits.size_mostly),
        gxe.ExpectColumnValuesToBeUnique(column="sha256", mostly=round(1.0 - limits.max_duplicate_rate, 6)),
    ]
    dup = int(frame["sha256"].dropna().duplicated(keep=False).sum()) if len(frame) else 0
    info = {"what": what, "images": int(len(frame)), "decoded": int(frame["decoded"].sum()) if len(frame) else 0,
            "duplicates": dup,
            "reasons": {str(k): int(v) for k, v in frame.loc[~frame["decoded"], "reason"].value_counts().items()}
            if len(frame) else {}}
    return run_suite(f"{what}_batch", frame, exps, info)


# -- embeddings ------------------------------------------------------------------------------


def embedding_frame(vectors: np.ndarray):
    import pandas as pd

    v = np.asarray(vectors)
    if v.ndim != 2:
        v = v.reshape(len(v), -1) if v.size else np.zeros((0, 0), np.float32)
    finite = np.isfinite(v).all(axis=1) if v.size else np.zeros(len(v), bool)
    with np.errstate(invalid="ignore", over="ignore"):
        norms = np.linalg.norm(np.where(np.isfinite(v), v, 0.0), axis=1) if v.size else np.zeros(len(v))
    return pd.DataFrame({"dim": np.full(len(v), v.shape[1] if v.ndim == 2 else 0, dtype=np.int64),
                         "norm": norms.astype(np.float64), "finite": finite.astype(bool)})


def check_embeddings(vectors: np.ndarray, expected_dim: int, what: str,
                     limits: QualityLimits | None = None) -> GateResult:
    """Dimension, unit norm (within ``norm_tolerance``), no NaN/Inf."""
    import great_expectations.expectations as gxe

    limits = limits or QualityLimits.from_env()
    frame = embedding_frame(vectors)
    exps = [
        gxe.ExpectTableRowCountToBeBetween(min_value=1),
        gxe.ExpectColumnValuesToBeInSet(column="dim", value_set=[int(expected_dim)]),
        gxe.ExpectColumnValuesToBeInSet(column="finite", value_set=[True]),
        gxe.ExpectColumnValuesToBeBetween(column="norm", min_value=1.0 - limits.norm_tolerance,
                                          max_value=1.0 + limits.norm_tolerance),
    ]
    return run_suite(f"{what}_embeddings", frame, exps, {"what": what, "vectors": int(len(frame)),
                                                         "expected_dim": int(expected_dim)})


# -- flagged pairs and the spike gate --------------------------------------------------------


@dataclass(frozen=True)
class SpikeBound:
    """The most flagged pairs a run may have, from earlier runs' counts (None: too little history)."""

    history: tuple[int, ...]
    trailing_mean: float | None
    max_count: int | None

    @property
    def applies(self) -> bool:
        return self.max_count is not None


def spike_bound(history: Sequence[int], limits: QualityLimits | None = None) -> SpikeBound:
    limits = limits or QualityLimits.from_env()
    recent = tuple(int(n) for n in history)[-limits.spike_window:]
    if len(recent) < limits.spike_min_history:
        return SpikeBound(recent, None, None)
    mean = float(np.mean(recent))
    return SpikeBound(recent, mean, int(max(limits.spike_min_count, math.floor(limits.spike_factor * mean))))


def check_flagged_pairs(pairs: Sequence[Any], *, threshold: float, beta: float, topk: int,
                        history: Sequence[int], limits: QualityLimits | None = None,
                        what: str = "flagged_pairs") -> GateResult:
    """Score ranges, rank, uniqueness, and the count against the trailing average.

    ``pairs`` are objects or mappings with ``query_id, reference_id,
    raw_score, score, rank`` and optionally ``match_source, pdq_distance``
    (e.g. ``FlaggedPairRow``). A pair flagged by PDQ alone (``match_source``
    ``pdq``) is held to a hash distance of 0-256 bits instead of the
    descriptor's threshold and rank. ``history`` is the flagged counts of
    earlier complete runs, oldest first.
    """
    import great_expectations.expectations as gxe
    import pandas as pd

    from moderation.fusion import RULE_MAX_BONUS

    limits = limits or QualityLimits.from_env()
    cols = ("query_id", "reference_id", "raw_score", "score", "rank")

    def get(p, name, default=None):
        return p.get(name, default) if isinstance(p, Mapping) else getattr(p, name, default)

    rows = []
    for p in pairs:
        row = {c: get(p, c) for c in cols}
        row["pdq_distance"] = get(p, "pdq_distance")
        if get(p, "match_source", "sscd") == "pdq":
            # Flagged by PDQ alone: the descriptor's score and rank (0 when it did not rank the
            # reference at all) are below its threshold by definition; its hash distance is checked instead.
            row["score"] = row["rank"] = None
        rows.append(row)
    frame = pd.DataFrame(rows, columns=[*cols, "pdq_distance"])
    m = limits.score_margin
    bound = spike_bound(history, limits)
    exps = [
        gxe.ExpectColumnValuesToBeBetween(column="raw_score", min_value=-1.0 - m, max_value=1.0 + m),
        # The final score is a normalised score (at most 1 + |beta|), a fused probability
        # (at most 1), or a normalised score plus the default rule's verification bonus.
        # An infinite threshold is a run that flagged nothing (no threshold applied): no lower bound.
        gxe.ExpectColumnValuesToBeBetween(column="score",
                                          min_value=float(threshold) - m if math.isfinite(threshold) else None,
                                          max_value=1.0 + abs(float(beta)) + RULE_MAX_BONUS + m),
        gxe.ExpectColumnValuesToBeBetween(column="rank", min_value=1, max_value=int(topk)),
        gxe.ExpectColumnValuesToBeBetween(column="pdq_distance", min_value=0, max_value=256),
        gxe.ExpectCompoundColumnsToBeUnique(column_list=["query_id", "reference_id"]),
    ]
    if bound.applies:
        exps.append(gxe.ExpectTableRowCountToBeBetween(min_value=0, max_value=bound.max_count))
    info = {"what": what, "flagged": int(len(frame)),
            "threshold": float(threshold) if math.isfinite(threshold) else None,
            "trailing_mean": bound.trailing_mean, "max_count": bound.max_count,
            "history": list(bound.history), "spike_checked": bound.applies}
    result = run_suite(what, frame, exps, info)
    if bound.applies and len(frame) > bound.max_count:
        result.info["spike"] = (f"{len(frame)} flagged pairs against a trailing mean of "
                                f"{bound.trailing_mean:.1f} over {len(bound.history)} runs "
                                f"(limit {bound.max_count}, {len(frame) / max(bound.trailing_mean, 1e-9):.1f}x)")
    return result


# -- hold-back of a batch's pairs from the review queue ---------------------------------------

HOLD_PENDING, HOLD_HELD, HOLD_RELEASED = "pending", "held", "released"


def _holds_table():
    from sqlalchemy import JSON, Column, DateTime, MetaData, String, Table, Text

    meta = MetaData()
    return Table(
        "quality_holds", meta,
        Column("batch", String(300), primary_key=True),
        Column("status", String(20), nullable=False),
        Column("reason", Text, nullable=False, default=""),
        Column("details", JSON, nullable=False, default=dict),
        Column("created_at", DateTime(timezone=True), nullable=False),
        Column("updated_at", DateTime(timezone=True), nullable=False),
        Column("released_by", String(200), nullable=True),
        Column("released_at", DateTime(timezone=True), nullable=True),
    )


HOLDS = _holds_table()


def ensure_holds_table(db) -> None:
    """Make sure ``quality_holds`` exists: created here on SQLite, by migration 0003 on Postgres."""
    from sqlalchemy import inspect

    if not db.is_postgres:
        HOLDS.create(db.engine, checkfirst=True)
        return
    if not inspect(db.engine).has_table("quality_holds"):
        raise ConfigError("the review database has no quality_holds table: apply "
                          "sql/migrations/0003_quality_hold.sql (Pipeline.open migrates)")


def _now() -> datetime:
    return datetime.now(timezone.utc)


def place_hold(db, batch: str, reason: str, *, status: str = HOLD_PENDING,
               details: dict[str, Any] | None = None) -> None:
    """Keep ``batch``'s flagged pairs out of review (insert or reset the batch's hold)."""
    ensure_holds_table(db)
    with db.engine.begin() as conn:
        write_hold(conn, batch, reason, status=status, details=details)


def write_hold(conn, batch: str, reason: str, *, status: str = HOLD_PENDING,
               details: dict[str, Any] | None = None) -> None:
    """:func:`place_hold` inside the caller's transaction ``conn`` (the table must exist).

    For a writer that must publish something and hold it back atomically
    (``Database.finish_run``). Raises ValueError for another status.
    """
    from sqlalchemy import select, update

    if status not in (HOLD_PENDING, HOLD_HELD):
        raise ValueError(f"hold status must be {HOLD_PENDING!r} or {HOLD_HELD!r}")
    now = _now()
    values = {"status": status, "reason": reason[:4000], "details": _jsonable(details or {}),
              "updated_at": now, "released_by": None, "released_at": None}
    query = select(HOLDS.c.batch).where(HOLDS.c.batch == batch)
    if conn.dialect.name == "postgresql":
        query = query.with_for_update()
    if conn.execute(query).first():
        conn.execute(update(HOLDS).where(HOLDS.c.batch == batch).values(**values))
    else:
        conn.execute(HOLDS.insert().values(batch=batch, created_at=now, **values))


def release_hold(db, batch: str, by: str, *, note: str = "") -> bool:
    """Let ``batch``'s pairs into the review queue. Returns False if the batch had no hold."""
    from sqlalchemy import update

    ensure_holds_table(db)
    with db.engine.begin() as conn:
        res = conn.execute(update(HOLDS).where(HOLDS.c.batch == batch).values(
            status=HOLD_RELEASED, released_by=by[:200], released_at=_now(), updated_at=_now(),
            reason=HOLDS.c.reason + (f" | released: {note}" if note else "")))
    return bool(res.rowcount)


def hold_of(db, batch: str) -> dict[str, Any] | None:
    """The batch's hold row as a dict, or None when it never had one."""
    from sqlalchemy import select

    ensure_holds_table(db)
    with db.engine.connect() as conn:
        row = conn.execute(select(HOLDS).where(HOLDS.c.batch == batch)).mappings().first()
    return dict(row) if row else None


def is_held(db, batch: str) -> bool:
    hold = hold_of(db, batch)
    return bool(hold) and hold["status"] != HOLD_RELEASED


def held_batches(db) -> list[str]:
    from sqlalchemy import select

    ensure_holds_table(db)
    with db.engine.connect() as conn:
        return [r[0] for r in conn.execute(select(HOLDS.c.batch).where(HOLDS.c.status != HOLD_RELEASED)
                                           .order_by(HOLDS.c.batch))]


def _jsonable(obj: Any) -> Any:
    import json

    def default(o):
        if isinstance(o, (np.integer,)):
            return int(o)
        if isinstance(o, (np.floating,)):
            return None if not np.isfinite(o) else float(o)
        if isinstance(o, np.ndarray):
            return o.tolist()
        return str(o)

    def clean(o):
        if isinstance(o, float) and not math.isfinite(o):
            return None
        if isinstance(o, dict):
            return {str(k): clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        return o

    return json.loads(json.dumps(clean(obj), default=default))
