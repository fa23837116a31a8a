"""The one settings object, read from ``MODERATION_*`` environment variables.

With nothing set, all state lives under one home folder (``./.moderation``,
moved by ``MODERATION_HOME``): a local object store in ``HOME/store`` and a
SQLite review database in ``HOME/moderation.db``. That is the embedded
default for a first run; production points ``MODERATION_DATABASE_URL`` at
Postgres and ``MODERATION_STORE_URL`` at an S3/MinIO bucket.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from enum import Enum
from pathlib import Path
from typing import Any

from moderation.errors import ConfigError

PREFIX = "MODERATION_"


class Device(str, Enum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


class ResizeMode(str, Enum):
    """How images are brought to the network's input size.

    SQUARE skews to ``size x size`` (SSCD's batched inference: fixed shapes
    batch well and copy detection tolerates the skew); SHORT_EDGE keeps the
    aspect ratio and resizes the short side to ``size`` (one image per
    forward pass unless all share a shape).
    """

    SQUARE = "square"
    SHORT_EDGE = "short_edge"


class LocalFeatureKind(str, Enum):
    """Keypoint detector of the verification stage (see ``moderation.local_features.Detector``)."""

    SIFT = "sift"
    ORB = "orb"
    AKAZE = "akaze"


class Postprocess(str, Enum):
    """Descriptor post-processing fitted on background images."""

    NONE = "none"
    CENTER = "center"
    WHITEN = "whiten"


# Chosen by measurement on bench-dev's extra/ queries (benchmarks/two_stage_bench.py).
DEFAULT_VIEWS = "full,mirror,grid2,center"


@dataclass(frozen=True)
class Settings:
    """Every tunable of the system. Build with :meth:`from_env`.

    Field ``foo_bar`` is read from ``MODERATION_FOO_BAR``.
    """

    home: Path = Path(".moderation")
    database_url: str = ""  # default: sqlite under home
    store_url: str = ""  # default: file://HOME/store ; or s3://BUCKET[/prefix]
    s3_endpoint: str = ""  # host:port of MinIO / S3
    s3_access_key: str = ""
    s3_secret_key: str = ""
    s3_secure: bool = False
    s3_region: str = ""
    device: Device = Device.AUTO
    batch_size: int = 32
    workers: int = 2
    image_size: int = 320
    resize_mode: ResizeMode = ResizeMode.SQUARE
    topk: int = 10
    sn_beta: float = 1.0
    sn_neighbors: int = 3
    postprocess: Postprocess = Postprocess.WHITEN
    whiten_dim: int = 0  # 0: keep the descriptor's dimension
    # Reference index (moderation.index_config): `auto` is Flat below index_flat_max vectors, IVF + SQ8 above.
    index_factory: str = "auto"
    index_flat_max: int = 1_000_000
    index_nprobe: int = 0  # IVF lists probed per query (0: chosen by the number of lists)
    index_train_size: int = 0  # vectors the index trains on (0: 40 per IVF list)
    # Nightly index builds (moderation.reference_changes, moderation.incremental_index): read every reference
    # and rebuild from every vector instead of reading only what the listing shows changed; and how far an
    # IVF/PQ index may grow past the count its quantiser was trained on before a build retrains it.
    index_full_rebuild: bool = False
    index_retrain_growth: float = 2.0
    # A full build on Airflow fills the index in mapped tasks of this many references each (moderation.index_fill).
    index_fill_shard_size: int = 1_000_000
    threshold: float = 0.0  # 0: use the calibrated threshold of the model/stats pair
    max_failure_rate: float = 0.2
    max_image_pixels: int = 64_000_000
    max_file_bytes: int = 50_000_000
    evidence: bool = True
    evidence_max_pixels: int = 256 * 256
    evidence_max_pairs: int = 20_000  # per run: evidence beyond this many pairs is skipped
    evidence_retention_days: int = 90
    # Storage hygiene (moderation.gc): what `moderation gc` keeps.
    query_vector_retention_days: int = 30  # cached query vectors older than this are removed
    gc_grace_hours: float = 24.0  # nothing younger is ever removed; must exceed the longest job
    keep_versions: int = 3  # index and statistics versions kept per model besides the ones in use
    claim_lease_seconds: int = 900
    # Retroactive matching (moderation.retroactive): how many days of query batches new references are
    # searched against; at most the query-vector retention, since it reads their cached vectors. 0: off.
    retro_window_days: int = 30
    # Two-stage matching (moderation.two_stage): query views, then local-feature verification.
    verify: bool = True
    views: str = DEFAULT_VIEWS
    view_topk: int = 10  # candidates each view contributes before the per-reference merge
    view_crop_penalty: float = 0.0  # subtracted from a crop view's normalised score before the merge
    local_features: LocalFeatureKind = LocalFeatureKind.SIFT
    max_local_features: int = 1000
    verify_topk: int = 10  # candidates verified per query
    verify_floor: float = -1.0  # candidates whose global normalised score is below this are not verified
    verify_workers: int = 2  # verification processes (0: in the matching process)
    # False-positive suppression (moderation.suppression): the inliers a pair of a reference under the
    # 'strict' policy needs, unless the policy names its own bar (ordinary verification needs 8).
    strict_min_inliers: int = 25
    # PDQ beside the descriptor (moderation.pdq): a match of its own within this many bits, both hashes
    # of at least this quality (Meta's recommended 31 and 50).
    pdq: bool = True
    pdq_max_distance: int = 31
    pdq_min_quality: int = 50
    progress: bool = True

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read settings from ``env`` (default ``os.environ``).

        Raises ConfigError naming the variable when a value does not parse.
        """
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            name = PREFIX + f.name.upper()
            if name not in env or env[name] == "":
                continue
            values[f.name] = _parse(name, env[name], f.type)
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        return settings._with_defaults()

    def _with_defaults(self) -> Settings:
        home = Path(self.home).expanduser().resolve()
        db = self.database_url or f"sqlite:///{home / 'moderation.db'}"
        store = self.store_url or f"file://{home / 'store'}"
        if self.batch_size < 1:
            raise ConfigError("MODERATION_BATCH_SIZE must be at least 1")
        if not 0.0 <= self.max_failure_rate <= 1.0:
            raise ConfigError("MODERATION_MAX_FAILURE_RATE must be between 0 and 1")
        if self.topk < 1:
            raise ConfigError("MODERATION_TOPK must be at least 1")
        if self.workers < 0:
            raise ConfigError("MODERATION_WORKERS must be 0 (decode in the main process) or more")
        if self.sn_neighbors < 1:
            raise ConfigError("MODERATION_SN_NEIGHBORS must be at least 1 (score normalisation "
                              "averages that many background neighbours)")
        if self.verify_topk < 0 or self.view_topk < 1:
            raise ConfigError("MODERATION_VERIFY_TOPK must be 0 or more and MODERATION_VIEW_TOPK at least 1")
        if self.query_vector_retention_days < 0 or self.evidence_retention_days < 0:
            raise ConfigError("MODERATION_QUERY_VECTOR_RETENTION_DAYS and MODERATION_EVIDENCE_RETENTION_DAYS "
                              "must be 0 or more")
        if self.retro_window_days < 0:
            raise ConfigError("MODERATION_RETRO_WINDOW_DAYS must be 0 (off) or more")
        if not self.gc_grace_hours >= 0 or self.keep_versions < 0:
            raise ConfigError("MODERATION_GC_GRACE_HOURS and MODERATION_KEEP_VERSIONS must be 0 or more")
        if self.index_fill_shard_size < 1:
            raise ConfigError("MODERATION_INDEX_FILL_SHARD_SIZE must be at least 1 (references per fill task of a "
                              "full index build)")
        if not self.index_retrain_growth >= 1.0:
            raise ConfigError("MODERATION_INDEX_RETRAIN_GROWTH must be at least 1 (retrain an IVF/PQ index once the "
                              "reference set is that many times the size it was trained on)")
        if self.strict_min_inliers < 1:
            raise ConfigError("MODERATION_STRICT_MIN_INLIERS must be at least 1")
        if self.max_local_features < 16:
            raise ConfigError("MODERATION_MAX_LOCAL_FEATURES must be at least 16")
        if not 0 <= self.pdq_max_distance <= 256 or not 0 <= self.pdq_min_quality <= 100:
            raise ConfigError("MODERATION_PDQ_MAX_DISTANCE must be 0-256 and MODERATION_PDQ_MIN_QUALITY 0-100")
        from moderation.index_config import IndexOptions
        from moderation.views import ViewConfig

        IndexOptions.from_settings(self)  # ConfigError naming the out-of-range index setting

        ViewConfig.parse(self.views)  # ConfigError naming the unknown view kinds
        return replace(self, home=home, database_url=db, store_url=store)

    def with_overrides(self, **overrides: Any) -> Settings:
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})._with_defaults()

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"


_TYPES: dict[str, Any] = {
    "Path": Path,
    "str": str,
    "int": int,
    "float": float,
    "bool": bool,
    "Device": Device,
    "ResizeMode": ResizeMode,
    "Postprocess": Postprocess,
    "LocalFeatureKind": LocalFeatureKind,
}


def _parse(name: str, raw: str, type_name: Any) -> Any:
    kind = _TYPES[type_name if isinstance(type_name, str) else type_name.__name__]
    try:
        if kind is bool:
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        return kind(raw.strip())
    except ValueError:
        allowed = ""
        if isinstance(kind, type) and issubclass(kind, Enum):
            allowed = " (one of: " + ", ".join(m.value for m in kind) + ")"
        raise ConfigError(f"{name}={raw!r} is not a valid {kind.__name__}{allowed}") from None
