"""Fixtures and helpers for the review-queue, evidence, feedback and fault tests.

Imported by those test modules (``from review_support import ...``) rather
than living in conftest.py, which other engineers also edit.

- ``fresh_pg_database``: a new Postgres database per test module
  (``review_test_<random>``), migrated with ``moderation.db.upgrade`` and
  dropped afterwards. The server is ``MODERATION_TEST_PG`` (default
  ``postgresql+psycopg://postgres@127.0.0.1:5432/postgres``, the maintenance
  database). No Postgres means these tests fail: they are about Postgres.
- ``MotoServer``: ``moto_server`` from the venv as a subprocess on a free port.
- ``TcpProxy``: a TCP forwarder the tests can stop and start, to make a live
  server (Postgres, moto) unreachable and reachable again without touching
  the server itself (moto keeps its state only in memory).
- ``tiny_pipeline_env``: settings for a small real pipeline (MobileNetV2 at
  96 px, no DataLoader workers) on generated images.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from moderation.db import (Database, FlaggedPair, IndexVersionRow, MatchRunRecord, ModelVersionRow,
                           StatsVersionRow, upgrade)

PG_ADMIN_URL = os.environ.get("MODERATION_TEST_PG",
                              "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
VENV_BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent


# -- CPU threads --------------------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="module")
def torch_single_thread():
    """One intra-op thread for torch while a module of these tests runs (restored afterwards).

    The runs here are tiny; on a small, shared machine two spinning intra-op
    threads per process make them ten times slower, not faster.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- Postgres -----------------------------------------------------------------------------------


def _admin():
    return create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")


def url_for(database: str, user: str | None = None, host: str | None = None, port: int | None = None) -> str:
    """PG_ADMIN_URL with another database (and optionally user, host, port)."""
    from sqlalchemy.engine import make_url

    url = make_url(PG_ADMIN_URL).set(database=database)
    if user is not None:
        url = url.set(username=user, password=None)
    if host is not None:
        url = url.set(host=host)
    if port is not None:
        url = url.set(port=port)
    return url.render_as_string(hide_password=False)


@contextmanager
def fresh_pg_database(migrate: bool = True, prefix: str = "review_test") -> Iterator[str]:
    """Create ``<prefix>_<random>``, optionally migrate it, yield its URL, drop it (even if in use)."""
    name = f"{prefix}_{secrets.token_hex(5)}"
    engine = _admin()
    with engine.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = url_for(name)
    try:
        if migrate:
            db = Database(url)
            upgrade(db)
            db.engine.dispose()
        yield url
    finally:
        with engine.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        engine.dispose()


@contextmanager
def login_role(member_of: str) -> Iterator[str]:
    """A temporary LOGIN role in ``member_of`` (trust auth: no password); dropped afterwards."""
    name = f"review_test_{member_of.split('_')[-1]}_{secrets.token_hex(4)}"
    engine = _admin()
    with engine.connect() as conn:
        conn.exec_driver_sql(f'CREATE ROLE "{name}" LOGIN IN ROLE {member_of}')
    try:
        yield name
    finally:
        with engine.connect() as conn:
            # Its sessions must be gone before the role can be dropped.
            conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = :u"),
                         {"u": name})
            for _ in range(50):
                if not conn.execute(text("SELECT 1 FROM pg_stat_activity WHERE usename = :u"),
                                    {"u": name}).first():
                    break
                time.sleep(0.1)
            conn.exec_driver_sql(f'DROP ROLE IF EXISTS "{name}"')
        engine.dispose()


def seed_versions(db: Database, model: str = "m1", stats: str = "s1", index: str = "i1") -> None:
    """Version rows a match run must reference (idempotent)."""
    db.record_version(ModelVersionRow(version=model, backbone="test", dim=4, image_size=96,
                                      resize_mode="square", source="test", metrics={}))
    db.record_version(StatsVersionRow(version=stats, model_version=model, postprocess="none",
                                      in_dim=4, out_dim=4, n_background=1))
    db.record_version(IndexVersionRow(version=index, model_version=model, stats_version=stats,
                                      count=1, dim=4, factory="Flat"))


def seed_run(db: Database, batch: str, pairs: list[tuple[str, str, float]], *, threshold: float = 0.0,
             model: str = "m1", stats: str = "s1", index: str = "i1") -> int:
    """A complete match run with ``(query_id, reference_id, score)`` pairs, written as the pipeline does."""
    seed_versions(db, model, stats, index)
    run = MatchRunRecord(batch=batch, model_version=model, stats_version=stats, index_version=index,
                         threshold=threshold)
    db.start_run(run)
    flagged = [FlaggedPair(q, r, raw_score=s + 0.5, score=s, rank=1, query_key=f"queries/{q}.jpg",
                           reference_key=f"references/{r}.jpg") for q, r, s in pairs]
    return db.finish_run(run, flagged)


def pair_ids(db: Database, run_id: int | None = None) -> list[int]:
    return [p.id for p in db.pairs(run_id)]


# -- servers and faults -------------------------------------------------------------------------

from services import MotoServer, free_port, wait_port  # noqa: E402,F401 (one implementation)



class TcpProxy:
    """Forward 127.0.0.1:<port> to a target; ``stop()`` refuses and cuts every connection.

    ``stop()`` closes the listening socket and all open connections (the
    client sees resets, then "connection refused"), ``start()`` listens on
    the same port again. The server behind it keeps running with its state.
    """

    def __init__(self, target_host: str, target_port: int, port: int | None = None):
        self.target = (target_host, target_port)
        self.port = port or free_port()
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self.start()

    def start(self) -> None:
        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", self.port))
        ls.listen(64)
        self._listener = ls
        threading.Thread(target=self._accept, args=(ls,), daemon=True).start()

    @property
    def running(self) -> bool:
        return self._listener is not None

    def _accept(self, ls: socket.socket) -> None:
        while True:
            try:
                client, _ = ls.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def stop(self) -> None:
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
            self._listener = None
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for s in conns:
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                s.close()  # linger 0: the peer gets a reset, as when a server dies
            except OSError:
                pass


# -- a tiny real pipeline -----------------------------------------------------------------------

_SAMPLE_CACHE: dict[str, Path] = {}


def sample_images(root: Path, seed: int = 7) -> "object":
    """A small labelled set (12 references, 8 copies + 4 distractors, 16 background), cached per run."""
    from moderation.samples import make_sample_set

    key = f"{seed}"
    if key not in _SAMPLE_CACHE:
        base = Path(os.environ.get("PYTEST_REVIEW_CACHE", "")) if os.environ.get("PYTEST_REVIEW_CACHE") else None
        folder = (base or Path(__import__("tempfile").mkdtemp(prefix="review-samples-"))) / f"set{seed}"
        make_sample_set(folder, n_references=12, n_copies=8, n_distractors=4, n_background=16, seed=seed,
                        size=(160, 128))
        _SAMPLE_CACHE[key] = folder
    target = Path(root)
    if not target.exists():
        shutil.copytree(_SAMPLE_CACHE[key], target)
    from moderation.samples import SampleSet

    return SampleSet(target, target / "references", target / "queries", target / "background",
                     target / "ground_truth.csv", 8)


def pipeline_env(home: Path, database_url: str, store_url: str = "", **extra: str) -> dict[str, str]:
    """MODERATION_* variables for a small, fast, deterministic pipeline (also for subprocesses)."""
    env = {
        "MODERATION_HOME": str(home),
        "MODERATION_DATABASE_URL": database_url,
        "MODERATION_IMAGE_SIZE": "96",
        "MODERATION_WORKERS": "0",
        "MODERATION_BATCH_SIZE": "16",
        "MODERATION_DEVICE": "cpu",
        "MODERATION_PROGRESS": "0",
        "MODERATION_POSTPROCESS": "center",
        "MODERATION_TOPK": "3",
    }
    if store_url:
        env["MODERATION_STORE_URL"] = store_url
    env.update(extra)
    return env


def settings_from(env: dict[str, str]):
    from moderation.config import Settings

    return Settings.from_env(env)


def build_tiny_pipeline(env: dict[str, str], samples) -> None:
    """Register the default model, fit statistics and build the reference index (real jobs)."""
    from moderation.embedding import FolderSource
    from moderation.jobs import Pipeline, build_reference_index, refresh_stats

    p = Pipeline.open(settings_from(env))
    refresh_stats(p, FolderSource(samples.background))
    build_reference_index(p, FolderSource(samples.references))
    p.db.engine.dispose()


def python_env(extra: dict[str, str]) -> dict[str, str]:
    """The current environment plus ``extra``, with PYTHONPATH kept (for subprocesses)."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # see torch_single_thread
    env.update(extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [os.environ.get("PYTHONPATH", ""), str(REPO)] if p)
    return env


_TEMPLATE: dict[str, object] = {}


def pipeline_template():
    """(samples, store folder) of a tiny pipeline built once per test process.

    The store holds the default model, background statistics and a reference
    index (registered with real jobs on a throwaway SQLite database). The
    review database is not part of it: a run records the versions it uses.
    """
    import tempfile

    if "store" not in _TEMPLATE:
        root = Path(tempfile.mkdtemp(prefix="review-pipeline-"))
        samples = sample_images(root / "images")
        env = pipeline_env(root / "home", f"sqlite:///{root / 'template.db'}")
        build_tiny_pipeline(env, samples)
        _TEMPLATE.update(samples=samples, store=root / "home" / "store", root=root)
        import atexit

        atexit.register(shutil.rmtree, root, True)
    return _TEMPLATE["samples"], _TEMPLATE["store"]


def local_pipeline(home: Path, database_url: str, **extra: str) -> tuple[dict[str, str], object]:
    """A home whose local store is a copy of the template; returns (env, samples)."""
    samples, store = pipeline_template()
    shutil.copytree(store, Path(home) / "store")
    return pipeline_env(Path(home), database_url, **extra), samples


def upload_template(store) -> None:
    """Copy the template store's objects into ``store`` (e.g. an S3 bucket)."""
    _, folder = pipeline_template()
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file() and not path.name.startswith(".tmp-"):
            store.put(path.relative_to(folder).as_posix(), path.read_bytes())


@contextmanager
def s3_pipeline(home: Path, server, bucket: str, **extra: str):
    """A pipeline on a fresh Postgres database and an S3 bucket (moto) holding the template's objects.

    Yields (pipeline, env, samples); the database is dropped afterwards.
    """
    from conftest import s3_env
    from moderation.jobs import Pipeline

    samples, _ = pipeline_template()
    with fresh_pg_database() as url:
        env = {**pipeline_env(Path(home), url), **s3_env(server, bucket), **extra}
        p = Pipeline.open(settings_from(env))
        try:
            upload_template(p.store)
            yield p, env, samples
        finally:
            p.db.engine.dispose()


class InterruptingSource:
    """A FolderSource that calls ``action()`` when the ``after``-th image is read (once).

    Picklable only when ``action`` is: tests use it with MODERATION_WORKERS=0.
    """

    def __init__(self, folder: Path, after: int, action):
        from moderation.embedding import FolderSource

        self.inner = FolderSource(Path(folder))
        self.after, self.action, self.reads = after, action, 0

    def refs(self):
        return self.inner.refs()

    def read(self, location: str) -> bytes:
        self.reads += 1
        if self.reads == self.after:
            self.action()
        return self.inner.read(location)


def run_child_main(argv: list[str]) -> None:
    """A matching run that stops at a chosen point and waits to be killed (SIGKILL from the test).

    ``argv``: WHERE MARKER QUERIES BATCH, WHERE in embedding | evidence | commit.
    """
    where, marker, queries, batch = argv

    def reached() -> None:
        Path(marker).write_text(where)
        time.sleep(120)  # the test kills us here
        raise SystemExit("not killed")

    from moderation.embedding import FolderSource
    from moderation.jobs import Pipeline, run_matching

    p = Pipeline.open(settings_from(dict(os.environ)))
    source = FolderSource(Path(queries))
    if where == "embedding":
        source = InterruptingSource(Path(queries), 5, reached)
    elif where == "evidence":
        put, count = p.store.put, [0]

        def put_then_stop(key, data, content_type="application/octet-stream"):
            put(key, data, content_type)
            if "/evidence/" in key:
                count[0] += 1
                if count[0] == 3:
                    reached()

        p.store.put = put_then_stop
    elif where == "commit":
        copy_pairs = p.db._copy_pairs  # the Postgres write path: COPY + upsert in one transaction

        def copy_then_stop(s, run_id, pairs, *rest):
            copy_pairs(s, run_id, pairs, *rest)  # written, not committed
            s.flush()
            reached()

        p.db._copy_pairs = copy_then_stop
    run_matching(p, source, batch)
    print("completed")


# -- a moderator in another process (concurrency tests) -----------------------------------------


def moderator_loop(db: Database, name: str, *, n: int = 3, release_every: int = 0, seed: int = 0) -> dict:
    """Claim and decide until the queue is empty; returns what this moderator saw and did.

    With ``release_every`` k > 0, every k-th claimed pair is released unused
    instead of decided (it must then be decided by someone, possibly later).
    """
    import random

    from moderation import review

    rng = random.Random(seed)
    claimed, decided, released = [], [], []
    count = 0
    while True:
        batch = review.claim(db, name, n)
        if not batch:
            break
        for c in batch:
            claimed.append(c["pair_id"])
            count += 1
            if release_every and count % release_every == 0:
                review.release(db, name, c["pair_id"])
                released.append(c["pair_id"])
                continue
            out = review.decide(db, c["pair_id"], name, rng.choice(("confirmed", "rejected", "unsure")))
            decided.append([c["pair_id"], out["decision_id"]])
    return {"claimed": claimed, "decided": decided, "released": released}


if __name__ == "__main__":  # moderator URL NAME N RELEASE_EVERY SEED | run WHERE MARKER QUERIES BATCH
    import json

    if sys.argv[1] == "run":
        run_child_main(sys.argv[2:])
    elif sys.argv[1] == "moderator":
        _db = Database(sys.argv[2])
        print(json.dumps(moderator_loop(_db, sys.argv[3], n=int(sys.argv[4]), release_every=int(sys.argv[5]),
                                        seed=int(sys.argv[6]))))
        _db.engine.dispose()
