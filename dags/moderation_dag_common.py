"""Shared wiring of the moderation DAGs: assets, retry policy, connections, gate errors.

Not a DAG file: ``.airflowignore`` keeps the dag-processor from parsing it. Everything that does work lives in
``moderation.orchestration``; this module only adapts it to Airflow.

Parse cost: the dag-processor imports every DAG file, and this module, every few minutes. Nothing here may
import ``moderation.orchestration`` (it pulls in torch, FAISS, great-expectations, pandas) at module level; the
helpers below import it when a task calls them. ``tests/test_dags_parsing.py`` holds the line.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone
from typing import Any

from airflow.sdk import Asset, Connection
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from moderation import layout

log = logging.getLogger(__name__)

START_DATE = datetime(2026, 1, 1, tzinfo=timezone.utc)
TAGS = ["moderation"]

# Asset events carry the version they announce in ``extra``.
MODEL_ASSET = Asset(name="moderation_model", uri="x-moderation://models/current", group="moderation")
STATS_ASSET = Asset(name="moderation_stats", uri="x-moderation://stats/current", group="moderation")
INDEX_ASSET = Asset(name="moderation_index", uri="x-moderation://indexes/current", group="moderation")
MATCH_ASSET = Asset(name="moderation_match_runs", uri="x-moderation://match-runs", group="moderation")

# Every task here touches the object store or the database over the network.
DEFAULT_ARGS: dict[str, Any] = {
    "owner": "moderation",
    "retries": 3,
    "retry_delay": timedelta(minutes=1),
    "retry_exponential_backoff": 2.0,
    "max_retry_delay": timedelta(minutes=20),
    "execution_timeout": timedelta(hours=6),
}

GPU_QUEUE = "gpu"
GPU_POOL = "gpu"


def settings(**overrides: Any):
    """Settings with the review database and object store from the Airflow connections."""
    from moderation import orchestration

    db = Connection.get(layout.DB_CONN_ID)
    s3 = Connection.get(layout.S3_CONN_ID)
    return orchestration.settings_from_connections(db.to_dict(), s3.to_dict(), **overrides)


def no_retry(fn, *args, **kwargs):
    """Run ``fn``, turning the library's deliberate errors into task outcomes that spend no retry.

    - a missing prerequisite (``MissingPrerequisiteError``: no statistics for the index, no index for
      matching) skips the task, and with it the rest of the run, after a warning naming the DAG that
      produces it: the run came too early, nothing is broken, and retrying minutes later cannot help;
    - a batch with no images at all (``EmptyBatchError``: nothing uploaded for the day) skips the same way,
      with a warning that says how to match the day when its images arrive;
    - a failed quality gate, bad configuration, a version mix or a broken ``CURRENT`` pointer fails the task
      at once: the data, the setup or the pointer (by the rebuild its message names) must change first.

    Any other exception propagates and is retried as usual.
    """
    from moderation.errors import (ConfigError, CorruptPointerError, EmptyBatchError, MissingPrerequisiteError,
                                   VersionMismatchError)
    from moderation.quality import QualityGateError

    try:
        return fn(*args, **kwargs)
    except MissingPrerequisiteError as exc:
        log.warning("skipping this run: %s. Run the DAG %s first.", exc, exc.producer)
        raise AirflowSkipException(f"waiting for the DAG {exc.producer}: {exc}") from exc
    except EmptyBatchError as exc:
        log.warning("skipping this run, nothing to do: %s", exc)
        raise AirflowSkipException(f"nothing to do: {exc}") from exc
    except (QualityGateError, ConfigError, VersionMismatchError, CorruptPointerError) as exc:
        raise AirflowFailException(f"{type(exc).__name__}: {exc}") from exc


def version_from_events(events, asset: Asset, key: str = "model_version") -> str | None:
    """The version carried by the newest triggering event of ``asset`` (None for a cron/manual run)."""
    if not events:
        return None
    try:
        found = events.get(asset) or []
    except Exception:  # noqa: BLE001 - an accessor without this asset
        return None
    for event in reversed(list(found)):
        value = (getattr(event, "extra", None) or {}).get(key)
        if value:
            return str(value)
    return None
