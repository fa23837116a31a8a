"""Retroactive matching: search the recent query batches for copies of references added since they were matched.

A reference indexed tonight may have been uploaded as a copy last week. After
the nightly index build, :func:`retro_match` searches each daily batch of the
window (``MODERATION_RETRO_WINDOW_DAYS``) for the references the batch has not
been searched against yet, and only those:

- a batch's *baseline* is the index its daily run used plus the index its
  retroactive run searched last; the references of tonight's index whose
  (id, sha256) none of them held are the batch's new references. On a normal
  night every batch has the same baseline (last night's index), so one small
  index serves the whole window; a night that failed or was skipped is caught
  up by the next one, and a rerun finds nothing new (idempotent);
- the new references' cached vectors, whitened with the statistics of
  tonight's index, go into a small exact FAISS index; the batch's cached query
  vectors (whole image, ``runs/BATCH/queries.json`` lists their sha256) are
  searched against it and score-normalised with the same background set;
- a new reference is a candidate of a query only if its global score beats
  the query's ``max(k, verify_topk)``-th best global score in the batch's
  daily run (``runs/BATCH/verification.csv``): below it, a full rematch would
  not have made it a candidate either;
- candidates go through the same second stage as the match job (local-feature
  verification, the calibration's combiner and threshold), except that a
  candidate whose global score could not reach the threshold even with perfect
  verification is dropped before any image is read: cost follows the number
  of plausible copies, not the window;
- the operators' controls apply as in the daily run (:func:`moderation.jobs.run_matching`), read
  once per pass: a new reference that is disabled, or in a disabled bank, is
  not searched; pairs above the threshold that the allow-list suppresses (a
  standing rejection of the same query content and reference, a ``suppress``
  or ``strict`` policy; :mod:`moderation.suppression`) are not flagged but
  listed with their reason in ``runs/retro_BATCH/INDEX.suppressed.csv``;
- pairs above the threshold are added to the batch's retroactive run
  (``retro/BATCH``, ``match_runs.retro_of`` = BATCH, migration 0011), add-only,
  with their reference's bank and the query's sha256 like daily pairs.

Cost grows with new references x window queries, never with the whole
reference set: the whole set is only read as two id -> sha lists to find what
is new. Differences from the daily run, by design: only the whole-image view
is searched (the other views are not cached), ranks are among the new
references, no evidence images are rendered, and PDQ is not searched (a new
reference's PDQ matches come from the daily runs after it is indexed). A
reference disabled during a night's pass and enabled later is searched in the
past batches only where that pass wrote nothing (the baseline moves with the
retroactive run), as daily runs are not rerun either.

A batch is skipped, with its reason in the result, when its query list is
missing (matched before this existed) or some of its query vectors are not
cached for tonight's model (another model matched it, or retention expired
them); its baseline does not move, so it is searched once they are there.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from datetime import date, datetime, timedelta, timezone

import numpy as np

from moderation.db import FlaggedPair, MatchRunRecord, MatchRunRow
from moderation.errors import BadImageError, NotFoundError
from moderation.index import ReferenceIndex, build_index
from moderation.jobs import Pinned, Pipeline, bank_of, flag_threshold, pin, run_folder_of
from moderation.layout import QUERIES_PREFIX
from moderation.matching import Candidate, MatchParams, flagged, search, verification_csv
from moderation.reference_controls import Controls, read_controls
from moderation.registry import IndexVersion, Kind
from moderation.suppression import rejected_pairs, split_suppressed, suppressed_csv
from moderation.vector_cache import Namespace, VectorCache

log = logging.getLogger(__name__)

RETRO_PREFIX = "retro/"
_DAY_BATCH = re.compile(rf"^{re.escape(QUERIES_PREFIX)}(\d{{4}}-\d{{2}}-\d{{2}})/$")


@dataclass(frozen=True)
class BatchOutcome:
    """What retroactive matching did for one batch; ``skipped`` says why it did nothing (empty: it ran)."""

    batch: str
    new_references: int = 0
    queries: int = 0
    candidates: int = 0
    verified: int = 0
    added: int = 0
    skipped: str = ""
    disabled_references: int = 0  # new references not searched: disabled, or in a disabled bank
    suppressed: int = 0  # pairs above the threshold the allow-list kept out of review (listed with reasons)


@dataclass
class RetroResult:
    """One retroactive pass: the index it searched for and what each batch of the window gave."""

    model_version: str
    index_version: str
    window_days: int
    threshold: float | None
    references_searched: int = 0  # distinct new references put in a small index, over all batches
    batches: list[BatchOutcome] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def added(self) -> int:
        return sum(b.added for b in self.batches)

    @property
    def skipped(self) -> dict[str, str]:
        return {b.batch: b.skipped for b in self.batches if b.skipped}

    def summary(self) -> dict:
        """A JSON-able summary (the Airflow task's return value, the CLI's output)."""
        return {"model_version": self.model_version, "index_version": self.index_version,
                "window_days": self.window_days, "threshold": self.threshold,
                "references_searched": self.references_searched, "batches": len(self.batches),
                "queries_searched": sum(b.queries for b in self.batches if not b.skipped),
                "candidates": sum(b.candidates for b in self.batches), "added": self.added,
                "suppressed": sum(b.suppressed for b in self.batches),
                "skipped": self.skipped, "seconds": round(self.seconds, 3),
                "per_batch": [asdict(b) for b in self.batches]}


def retro_batch(batch: str) -> str:
    """The run name of ``batch``'s retroactive pairs."""
    return f"{RETRO_PREFIX}{batch}"


def suppressed_key(batch: str, index_version: str) -> str:
    """The object key of the pairs that the controls suppressed when ``batch`` was searched for ``index_version``."""
    return f"{run_folder_of(retro_batch(batch))}/{index_version}.suppressed.csv"


def batches_in_window(runs: Iterable[MatchRunRow], days: int, today: date) -> list[MatchRunRow]:
    """The daily runs (``queries/YYYY-MM-DD/``) dated ``today - days`` or later."""
    first = today - timedelta(days=days)
    out = []
    for run in runs:
        m = _DAY_BATCH.match(run.batch)
        if m and date.fromisoformat(m.group(1)) >= first:
            out.append(run)
    return out


def retro_match(p: Pipeline, *, days: int | None = None, today: date | None = None) -> RetroResult:
    """Search the window's batches for copies of the references they were not matched against; flag them.

    Uses the model of ``p`` (``current_model``) and its index in force, with
    that index's statistics, the calibration's threshold and combiner, and
    the settings' second stage. ``days`` defaults to
    ``MODERATION_RETRO_WINDOW_DAYS`` (0: nothing is searched), ``today`` to
    the UTC date. Writes: per batch with new pairs or new references, its
    retroactive run row and pairs (add-only) and
    ``runs/retro_BATCH/INDEX.csv`` (every candidate) and
    ``runs/retro_BATCH/INDEX.suppressed.csv`` (the pairs above the threshold
    that the operators' controls kept out, with the reason). The controls in
    force are read once, at the start, as a daily run does. Idempotent.
    Raises NotFoundError when the model has no index.
    """
    t0 = time.perf_counter()
    pinned = pin(p)
    choice = flag_threshold(p, pinned)
    threshold, combiner = choice.value, choice.combiner
    days = p.settings.retro_window_days if days is None else days
    result = RetroResult(pinned.model.version, pinned.index.version, days, threshold)
    if days <= 0:
        return result
    if not choice.flags:  # as the daily run: with no threshold in force nothing is flagged
        log.warning("retroactive matching flags nothing: %s", choice.source)
        return result
    runs = batches_in_window(p.db.complete_batches(), days, today or datetime.now(timezone.utc).date())
    if not runs:
        return result
    current = _index_keys(p, pinned.index)
    retro_rows = p.db.retro_runs()
    groups: dict[frozenset, list[MatchRunRow]] = {}
    for run in runs:
        baseline = {(run.model_version, run.index_version)}
        if (row := retro_rows.get(run.batch)) is not None:
            baseline.add((row.model_version, row.index_version))
        groups.setdefault(frozenset(baseline), []).append(run)
    search = _Searcher(p, pinned, threshold, combiner, read_controls(p.db))
    searched: set[str] = set()
    for baseline, members in groups.items():
        try:
            new_ids = _new_references(p, current, baseline)
        except NotFoundError as exc:
            result.batches += [BatchOutcome(r.batch, skipped=f"baseline index gone: {exc}") for r in members]
            continue
        disabled = [rid for rid in new_ids if rid in search.removed]
        new_ids = [rid for rid in new_ids if rid not in search.removed]
        if not new_ids:
            result.batches += [BatchOutcome(r.batch, disabled_references=len(disabled)) for r in members]
            continue
        small = search.small_index(new_ids, current)
        searched.update(small.ids)
        for run in members:
            result.batches.append(replace(search.batch(run, small), disabled_references=len(disabled)))
    result.references_searched = len(searched)
    result.seconds = time.perf_counter() - t0
    log.info("retroactive matching for index %s: %d new references searched over %d batches, %d pairs added, "
             "%d batches skipped", pinned.index.version, result.references_searched, len(result.batches),
             result.added, len(result.skipped))
    return result


def _index_keys(p: Pipeline, version: IndexVersion) -> dict[str, str]:
    """Reference id -> sha256 of an index version (sha "" for an index that kept no shas)."""
    shas = p.index_shas(version)
    if shas:
        return shas
    return {rid: "" for rid in json.loads(p.registry.load(Kind.INDEX, version, "ids.json"))["ids"]}


def _new_references(p: Pipeline, current: dict[str, str], baseline: frozenset) -> list[str]:
    """Ids of ``current`` whose (id, sha) no baseline index held (by id alone against one without shas)."""
    known: set[tuple[str, str]] = set()
    for model_version, index_version in baseline:
        record = p.registry.manifest(Kind.INDEX, index_version, model_version=model_version)
        known.update(_index_keys(p, record).items())
    ids_only = {rid for rid, sha in known if not sha}
    return sorted(rid for rid, sha in current.items() if (rid, sha) not in known and rid not in ids_only)


def best_possible(combiner, global_scores: np.ndarray, max_features: int) -> np.ndarray:
    """The fused score each global score would get with perfect verification: an upper bound.

    Exact as a bound because the combiner is monotone in every feature and
    no verification has more inliers than ``max_features`` nor more than
    full coverage or inlier ratio.
    """
    n = len(global_scores)
    best = np.column_stack([np.asarray(global_scores, np.float64), np.full(n, math.log1p(max_features)),
                            np.ones(n), np.ones(n), np.ones(n)])
    return combiner.score(best)


class _Searcher:
    """The per-night state: statistics, caches, combiner; searches batches against small indexes."""

    def __init__(self, p: Pipeline, pinned: Pinned, threshold: float, combiner, controls: Controls):
        from moderation.two_stage import TwoStageConfig

        self.p, self.pinned, self.threshold, self.combiner = p, pinned, threshold, combiner
        self.controls = controls
        self.post, self.bg = p.load_stats(pinned.stats)
        self.config = TwoStageConfig.from_settings(p.settings)
        self.locations = json.loads(p.registry.load(Kind.INDEX, pinned.index, "locations.json"))
        self.shas = p.index_shas(pinned.index)
        self.banks = p.index_banks(pinned.index, self.locations)
        self.removed = controls.removed(self.banks)  # disabled references and banks: never searched
        self._queries: VectorCache | None = None
        self._ref_features = None

    def small_index(self, ids: list[str], current: dict[str, str]) -> ReferenceIndex:
        """An exact index of the references ``ids``, whitened like the main index (vectors from the cache)."""
        cache = VectorCache(self.p.store, self.pinned.model.version, Namespace.REFERENCES)
        kept, vectors = [], []
        for rid in ids:
            vec = cache.get(current[rid]) if current[rid] else None
            if vec is None:
                log.warning("reference %s has no cached vector for model %s: not searched retroactively",
                            rid, self.pinned.model.version)
                continue
            kept.append(rid)
            vectors.append(vec)
        if not kept:
            return ReferenceIndex(None, [], "Flat")
        return build_index(self.post.apply(np.stack(vectors)), kept, "Flat")

    def batch(self, run: MatchRunRow, small: ReferenceIndex) -> BatchOutcome:
        if not small.ids:
            return BatchOutcome(run.batch, skipped="no cached vector for any new reference")
        key = f"{run_folder_of(run.batch)}/queries.json"
        try:
            listed = json.loads(self.p.store.get(key))["queries"]
        except NotFoundError:
            return BatchOutcome(run.batch, len(small.ids),
                                skipped=f"no query list at {key} (matched before retroactive matching existed)")
        if self._queries is None:
            self._queries = VectorCache(self.p.store, self.pinned.model.version, Namespace.QUERIES)
        vectors = [self._queries.get(sha) for _, _, sha in listed]
        missing = sum(v is None for v in vectors)
        if missing:
            return BatchOutcome(run.batch, len(small.ids), skipped=(
                f"{missing} of {len(listed)} query vectors are not cached for model {self.pinned.model.version} "
                f"(batch matched with {run.model_version}; or past MODERATION_QUERY_VECTOR_RETENTION_DAYS)"))
        if not listed:
            return BatchOutcome(run.batch, len(small.ids))
        qids = [qid for qid, _, _ in listed]
        keys = {qid: loc for qid, loc, _ in listed}
        shas = {qid: sha for qid, _, sha in listed}
        pool_k = max(self.config.k, self.config.verify_topk if self.config.verify else 0)
        s = self.p.settings
        cands = search(np.stack(vectors), qids, small, self.post, self.bg,
                       MatchParams(k=pool_k, beta=s.sn_beta, sn_neighbors=s.sn_neighbors))
        bars = self._bars(run.batch, pool_k)
        cands = [c for c in cands if c.score >= bars.get(c.query_id, -math.inf)]
        cands, n_verified = self._second_stage(cands, keys, shas)
        above = flagged(cands, self.threshold)
        rejected = rejected_pairs(self.p.db, {shas[c.query_id] for c in above})
        chosen, suppressed = split_suppressed(above, shas, rejected, self.controls, self.p.settings.strict_min_inliers)
        pairs = [FlaggedPair(c.query_id, c.reference_id, c.raw_score, c.score, c.rank, query_key=keys[c.query_id],
                             reference_key=self.locations.get(c.reference_id),
                             bank=bank_of(c.reference_id, self.banks), query_sha256=shas[c.query_id] or None)
                 for c in chosen]
        added = 0
        if pairs or cands:
            name = retro_batch(run.batch)
            artifact = f"{run_folder_of(name)}/{self.pinned.index.version}.csv"
            self.p.store.put(artifact, verification_csv(cands).encode(), "text/csv")
            self.p.store.put(suppressed_key(run.batch, self.pinned.index.version),
                             suppressed_csv(suppressed, self.banks).encode(), "text/csv")
            cal = self.pinned.calibration
            record = MatchRunRecord(batch=name, model_version=self.pinned.model.version,
                                    stats_version=self.pinned.stats.version,
                                    index_version=self.pinned.index.version, threshold=self.threshold,
                                    calibration_version=cal.version if cal else None, n_queries=len(qids),
                                    n_candidates=len(cands), candidates_key=artifact)
            for rec, record_fn in ((self.pinned.stats, self.p.db.record_stats),
                                   (self.pinned.index, self.p.db.record_index)):
                record_fn(rec)
            _, added = self.p.db.add_retro_pairs(run.batch, record, pairs)
        return BatchOutcome(run.batch, len(small.ids), len(qids), len(cands), n_verified, added,
                            suppressed=len(suppressed))

    def _bars(self, batch: str, pool_k: int) -> dict[str, float]:
        """Query id -> the global score a new reference must reach to enter the query's top ``pool_k``.

        Read from the daily run's ``verification.csv`` (every candidate with
        its global score): a reference below the query's ``pool_k``-th best
        global score would not be a candidate of a full rematch either. A
        query with fewer candidates, or a batch without the file, has no bar.
        """
        import csv
        import io

        try:
            data = self.p.store.get(f"{run_folder_of(batch)}/verification.csv").decode()
        except NotFoundError:
            return {}
        scores: dict[str, list[float]] = {}
        for row in csv.DictReader(io.StringIO(data)):
            value = row.get("global_score") or row.get("score")
            if value:
                scores.setdefault(row["query_id"], []).append(float(value))
        return {q: sorted(v, reverse=True)[pool_k - 1] for q, v in scores.items() if len(v) >= pool_k}

    def _second_stage(self, cands: list[Candidate], keys: dict[str, str],
                      shas: dict[str, str]) -> tuple[list[Candidate], int]:
        """Verify and fuse as the match job does; candidates that cannot reach the threshold are not verified."""
        from moderation.two_stage import _final_order

        cfg = self.config
        verifications: dict = {}
        if cfg.verify and cfg.verify_topk > 0 and cands:
            reach = self._best_possible(np.array([c.score for c in cands]))
            todo = [c for c, best in zip(cands, reach)
                    if c.rank <= cfg.verify_topk and c.score >= cfg.verify_floor and best >= self.threshold]
            verifications = self._verify(todo, keys, shas)
        by_query: dict[str, list[Candidate]] = {}
        for c in cands:
            v = verifications.get((c.query_id, c.reference_id))
            final = self.combiner.score_pair(c.score, v) if cfg.verify else c.score
            by_query.setdefault(c.query_id, []).append(replace(c, score=final, global_score=c.score,
                                                               verification=v))
        out: list[Candidate] = []
        for qid, group in by_query.items():
            ranked = sorted(group, key=_final_order)[:cfg.k]
            out += [replace(c, rank=r + 1) for r, c in enumerate(ranked)]
        return out, len(verifications)

    def _best_possible(self, global_scores: np.ndarray) -> np.ndarray:
        return best_possible(self.combiner, global_scores, self.config.features.max_features)

    def _verify(self, todo: list[Candidate], keys: dict[str, str], shas: dict[str, str]) -> dict:
        from moderation.local_features import FeatureCache
        from moderation.reference_features import ReferenceFeatures
        from moderation.verification import QueryTask, verify_many

        if not todo:
            return {}
        if self._ref_features is None:
            s = self.p.settings
            self._ref_features = ReferenceFeatures(FeatureCache(self.p.store, self.config.features), self.shas,
                                                   self.locations, max_pixels=s.max_image_pixels,
                                                   max_bytes=s.max_file_bytes)
        per_query: dict[str, list[str]] = {}
        for c in todo:
            per_query.setdefault(c.query_id, []).append(c.reference_id)
        tasks = []
        for qid, rids in per_query.items():
            plain, mirrored = self._query_features(keys[qid])
            if plain is None or len(plain) == 0:
                continue  # unreadable now, or no keypoints: the pair keeps its global score, as in the match job
            tasks.append(QueryTask(qid, plain, mirrored if self.config.verifier.try_mirror else None,
                                   tuple((rid, self._ref_features.get(rid)) for rid in rids)))
        return verify_many(tasks, self.config.features, self.config.verifier, workers=self.config.workers,
                           progress=False)

    def _query_features(self, key: str):
        """(features, mirrored features) of a query image, or (None, None) if it cannot be read now."""
        from moderation.images import decode_image
        from moderation.local_features import extract
        from moderation.store import read_location

        s = self.p.settings
        try:
            img = decode_image(read_location(self.p.store, key), s.max_image_pixels, s.max_file_bytes,
                               min_size=max(2 * self.pinned.model.image_size, self.config.features.max_side))
        except (BadImageError, NotFoundError, OSError, ValueError) as exc:
            log.warning("query %s cannot be read for verification (%s); its pairs keep their global score",
                        key, exc)
            return None, None
        return extract(img, self.config.features), extract(img, self.config.features, mirror=True)
