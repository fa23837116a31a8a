"""Versioned artifacts in the object store: manifests, publish, resolve.

Layout (every version folder is immutable once its manifest exists)::

    models/MODEL/{model.pt, manifest.json}                 models/CURRENT
    stats/MODEL/STATS/{stats.npz, background.npz, manifest.json}   stats/MODEL/CURRENT
    indexes/MODEL/INDEX/{index.faiss, ids.json, manifest.json}    indexes/MODEL/CURRENT
    calibrations/MODEL/STATS/CAL/manifest.json              calibrations/MODEL/STATS/CURRENT

Publishing writes the files, then ``manifest.json`` (listing each file's
sha256), then moves the small ``CURRENT`` pointer. A crash before the
pointer moves leaves the previous version in force; a version without a
manifest is never resolved. Readers resolve a pointer once per run and
then read by explicit version (pinning). Loading a file checks its sha256
against the manifest and raises IntegrityError on a mismatch.

A pointer or manifest that cannot be parsed (a flipped byte, a truncated
write by some other tool) raises CorruptPointerError / IntegrityError whose
message names the object and the command and DAG that republish it
(:data:`REBUILD`); the jobs that publish a kind treat its broken pointer as
"nothing in force" so that rerunning them repairs it.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any

from moderation.errors import CorruptPointerError, IntegrityError, NotFoundError
from moderation.images import file_sha256, sha256_hex
from moderation.layout import INDEX_DAG, STATS_DAG
from moderation.store import ObjectStore, validate_key

log = logging.getLogger(__name__)

POINTER = "CURRENT"
MANIFEST = "manifest.json"


class Kind(str, Enum):
    MODEL = "models"
    STATS = "stats"
    INDEX = "indexes"
    CALIBRATION = "calibrations"


# What publishes a new version of each kind, and so rewrites its pointer.
REBUILD = {
    Kind.MODEL: "register one with `moderation model import --torchscript FILE`, or delete models/CURRENT "
                "and the next job registers the default model",
    Kind.STATS: f"`moderation stats refresh --images BACKGROUND_DIR` (on Airflow: the DAG {STATS_DAG})",
    Kind.INDEX: f"`moderation index build --images REFERENCES_DIR` (on Airflow: the DAG {INDEX_DAG})",
    Kind.CALIBRATION: "`moderation calibrate --images LABELLED_DIR --ground-truth CSV` (on Airflow: the DAG "
                      f"{INDEX_DAG} calibrates when calibration/ground_truth.csv exists)",
}
_NAMES = {Kind.MODEL: "model", Kind.STATS: "background statistics", Kind.INDEX: "reference index",
          Kind.CALIBRATION: "calibration"}


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def new_version_id(content_sha: str = "") -> str:
    """Sortable, unique id: UTC timestamp plus a content or random suffix."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    return f"{stamp}-{(content_sha or secrets.token_hex(8))[:8]}"


@dataclass(frozen=True)
class ModelVersion:
    """A descriptor model. ``threshold`` is its raw-cosine 90%-precision point, if known."""

    version: str
    backbone: str
    dim: int
    image_size: int
    resize_mode: str
    source: str  # imagenet-default | shipped-default | torchscript-import | trained
    created_at: str = field(default_factory=now_iso)
    metrics: dict[str, Any] = field(default_factory=dict)
    threshold: float | None = None
    files: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StatsVersion:
    """Centering/whitening and the SN background set, fitted for one model."""

    version: str
    model_version: str
    postprocess: str
    in_dim: int
    out_dim: int
    n_background: int
    created_at: str = field(default_factory=now_iso)
    content_sha256: str = ""
    files: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class IndexVersion:
    """A FAISS index of one model's reference vectors, post-processed by one stats version."""

    version: str
    model_version: str
    stats_version: str
    count: int
    dim: int
    factory: str
    created_at: str = field(default_factory=now_iso)
    content_sha256: str = ""
    files: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Calibration:
    """The flagging thresholds for one (model, stats) pair and one matching configuration.

    ``threshold`` applies to the score matching flags on: the normalised
    score of the global stage, or the fused score when ``combiner`` is set
    (two-stage matching; ``matching`` records the views and verifier it was
    fitted for, and a match run with other settings does not use it).
    ``high_threshold`` is the 99 %-precision point where the labelled set
    reaches it (for automatic action), else None.
    """

    version: str
    model_version: str
    stats_version: str
    threshold: float
    target_precision: float
    metrics: dict[str, Any] = field(default_factory=dict)
    combiner: dict[str, Any] = field(default_factory=dict)
    matching: dict[str, Any] = field(default_factory=dict)
    high_threshold: float | None = None
    source: str = "labelled-set"  # labelled-set | decisions
    created_at: str = field(default_factory=now_iso)
    files: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Pointer:
    """A parsed ``CURRENT`` pointer: the version in force and when it was set (None if not recorded)."""

    version: str
    at: datetime | None


RECORDS = {Kind.MODEL: ModelVersion, Kind.STATS: StatsVersion, Kind.INDEX: IndexVersion,
           Kind.CALIBRATION: Calibration}
Record = ModelVersion | StatsVersion | IndexVersion | Calibration


def _scope(kind: Kind, record_or_pins: Any) -> str:
    """The folder that holds a kind's versions (and its pointer) for given pins."""
    if kind == Kind.MODEL:
        return Kind.MODEL.value
    if isinstance(record_or_pins, dict):
        get = record_or_pins.get
    else:
        get = lambda k: getattr(record_or_pins, k)  # noqa: E731
    if kind in (Kind.STATS, Kind.INDEX):
        return f"{kind.value}/{get('model_version')}"
    return f"{kind.value}/{get('model_version')}/{get('stats_version')}"


class Registry:
    """Publish and resolve versioned artifacts in one object store."""

    def __init__(self, store: ObjectStore):
        self.store = store

    def publish(self, kind: Kind, record: Record, files: Mapping[str, bytes | Path], *,
                make_current: bool = True) -> Record:
        """Write ``files`` and the manifest of ``record``; then (optionally) move the pointer.

        A file given as a local ``Path`` is streamed from disk (an index of
        gigabytes is never held in memory for the upload). Returns the record
        with ``files`` filled in (name -> sha256). If the version already has
        a manifest, nothing is rewritten (versions are immutable) and the
        stored record is returned.
        """
        scope = _scope(kind, record)
        folder = f"{scope}/{record.version}"
        if self.store.exists(f"{folder}/{MANIFEST}"):
            stored = self.manifest(kind, record.version, scope=scope)
        else:
            shas = {}
            for name, data in files.items():
                if isinstance(data, Path):
                    self.store.put_file(f"{folder}/{name}", data)
                    shas[name] = file_sha256(data)
                else:
                    self.store.put(f"{folder}/{name}", data)
                    shas[name] = sha256_hex(data)
            stored = type(record)(**{**asdict(record), "files": shas})
            self.store.put(f"{folder}/{MANIFEST}", _dumps(asdict(stored)), "application/json")
        if make_current:
            self.set_current(kind, stored)
        return stored

    def set_current(self, kind: Kind, record: Record) -> None:
        scope = _scope(kind, record)
        if not self.store.exists(f"{scope}/{record.version}/{MANIFEST}"):
            raise NotFoundError(f"cannot point {scope} at {record.version}: it has no manifest")
        self.store.put(f"{scope}/{POINTER}", _dumps({"version": record.version, "at": now_iso()}),
                       "application/json")

    def pointer(self, kind: Kind, **pins: str) -> Pointer | None:
        """The scope's ``CURRENT`` pointer, or None if nothing was published.

        Raises CorruptPointerError if the object is not a JSON object naming a
        version (one key segment); StoreError if the store is unreachable.
        """
        return self.read_pointer(kind, _scope(kind, pins))

    def read_pointer(self, kind: Kind, scope: str) -> Pointer | None:
        """:meth:`pointer` by the scope's folder (``indexes/MODEL``...), for code that walks the store."""
        key = f"{scope}/{POINTER}"
        try:
            raw = self.store.get(key)
        except NotFoundError:
            return None
        try:
            obj = json.loads(raw)
            version = obj["version"]
            if not isinstance(version, str) or not version or "/" in version:
                raise ValueError(f"version {version!r}")
            validate_key(f"{scope}/{version}/{MANIFEST}")
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptPointerError(_broken(kind, key, f"is not a valid pointer ({type(exc).__name__})"),
                                      key) from None
        return Pointer(version, _parse_time(obj.get("at")))

    def current(self, kind: Kind, **pins: str) -> Record:
        """The version in force for ``pins`` (e.g. ``model_version=...``).

        Raises NotFoundError if none was published, CorruptPointerError if
        the pointer, or the manifest it names, is missing or unreadable.
        """
        scope = _scope(kind, pins)
        pointer = self.pointer(kind, **pins)
        if pointer is None:
            raise NotFoundError(f"nothing published yet under {scope}")
        try:
            return self.manifest(kind, pointer.version, scope=scope)
        except (NotFoundError, IntegrityError) as exc:
            what = "has no manifest" if isinstance(exc, NotFoundError) else "has an unreadable manifest"
            key = f"{scope}/{POINTER}"
            raise CorruptPointerError(_broken(kind, key, f"names version {pointer.version}, which {what}"),
                                      key) from None

    def replaceable_current(self, kind: Kind, **pins: str) -> Record | None:
        """The version in force, for a job about to publish the next one; None if there is none.

        A broken pointer also gives None (with a warning): the publish that
        follows rewrites it, which is how the error messages say to repair it.
        """
        try:
            return self.current(kind, **pins)
        except NotFoundError:
            return None
        except CorruptPointerError as exc:
            log.warning("%s (this job publishes a new version now)", exc)
            return None

    def manifest(self, kind: Kind, version: str, *, scope: str | None = None, **pins: str) -> Record:
        """A version's record. NotFoundError if it has no manifest; IntegrityError if that is unreadable."""
        scope = scope or _scope(kind, pins)
        key = f"{scope}/{version}/{MANIFEST}"
        raw = self.store.get(key)
        try:
            record = RECORDS[kind](**json.loads(raw))
        except (ValueError, TypeError) as exc:
            raise IntegrityError(f"{key} is not a readable {_NAMES[kind]} manifest ({type(exc).__name__}); "
                                 f"republish: {REBUILD[kind]}") from None
        if record.version != version:
            raise IntegrityError(f"{key} describes version {record.version!r}, not {version!r}; "
                                 f"republish: {REBUILD[kind]}")
        return record

    def versions(self, kind: Kind, **pins: str) -> list[Record]:
        """Every published version under the scope, oldest first; unreadable manifests are skipped (logged)."""
        scope = _scope(kind, pins)
        out = []
        for key in self.store.list(scope + "/"):
            rest = key[len(scope) + 1:]
            parts = rest.split("/")
            if len(parts) == 2 and parts[1] == MANIFEST:
                try:
                    out.append(self.manifest(kind, parts[0], scope=scope))
                except IntegrityError as exc:
                    log.warning("skipping %s: %s", parts[0], exc)
        return sorted(out, key=lambda r: (r.created_at, r.version))

    def load(self, kind: Kind, record: Record, name: str) -> bytes:
        """The bytes of one file of a version, after checking its sha256."""
        expected = record.files.get(name)
        if expected is None:
            raise NotFoundError(f"{kind.value} version {record.version} has no file {name!r}")
        data = self.store.get(f"{_scope(kind, record)}/{record.version}/{name}")
        if sha256_hex(data) != expected:
            raise IntegrityError(
                f"{kind.value}/{record.version}/{name}: sha256 does not match its manifest; "
                "the artifact is corrupt or was tampered with. Republish it.")
        return data

    def load_file(self, kind: Kind, record: Record, name: str, path: Path) -> Path:
        """:meth:`load` into the local file ``path`` (streamed, never whole in memory); returns ``path``.

        Raises as :meth:`load` does; on a sha256 mismatch ``path`` is removed.
        """
        expected = record.files.get(name)
        if expected is None:
            raise NotFoundError(f"{kind.value} version {record.version} has no file {name!r}")
        self.store.get_file(f"{_scope(kind, record)}/{record.version}/{name}", path)
        if file_sha256(path) != expected:
            Path(path).unlink(missing_ok=True)
            raise IntegrityError(
                f"{kind.value}/{record.version}/{name}: sha256 does not match its manifest; "
                "the artifact is corrupt or was tampered with. Republish it.")
        return Path(path)

    def key_of(self, kind: Kind, record: Record, name: str) -> str:
        return f"{_scope(kind, record)}/{record.version}/{name}"


def _broken(kind: Kind, key: str, what: str) -> str:
    return (f"{key} {what}: the {_NAMES[kind]} in force cannot be resolved. Publishing a new version "
            f"rewrites the pointer: {REBUILD[kind]}")


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, indent=2, sort_keys=True, default=str).encode()
