"""Real services for the Airflow tests and the Airflow benchmark (no mocks).

- an S3 server: ``moto_server`` on a loopback port, in a subprocess;
- a fault-injecting HTTP proxy in front of it (a real network hop that can
  answer 503 to chosen requests, to make a task fail once);
- fresh Postgres databases for Airflow's metadata and the review database;
- an ``AIRFLOW_HOME`` with the DAGs folder, connections declared as
  ``AIRFLOW_CONN_*`` variables, and ``airflow db migrate`` run once;
- small generated images: references (random shapes), background, and a
  day's queries made of edited copies (crop, flip, colour change) plus
  unrelated images.

Airflow reads its configuration when it is first imported, so
:func:`configure_airflow` must run before anything imports ``airflow``.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
# The same maintenance connection as tests/conftest.py.
_ADMIN = os.environ.get("MODERATION_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
BUCKET = "moderation"
ACCESS_KEY, SECRET_KEY = "testing", "testing-secret"


from services import MotoServer, free_port, wait_port  # noqa: E402,F401 (one implementation)


@dataclass
class _Fault:
    method: str
    pattern: re.Pattern
    remaining: int
    hits: list[str] = field(default_factory=list)


class FaultProxy:
    """A pass-through HTTP proxy to ``upstream`` that can refuse chosen requests with 503."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.faults: list[_Fault] = []
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                fault = proxy._match(self.command, self.path)
                if fault is not None:
                    msg = b"<Error><Code>ServiceUnavailable</Code><Message>injected</Message></Error>"
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    self.wfile.write(msg)
                    return
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def _match(self, method: str, path: str) -> _Fault | None:
        with self.lock:
            for f in self.faults:
                if f.remaining > 0 and f.method == method and f.pattern.search(path.split("?")[0]):
                    f.remaining -= 1
                    f.hits.append(path)
                    return f
        return None

    def fail(self, method: str, pattern: str, times: int) -> _Fault:
        fault = _Fault(method, re.compile(pattern), times)
        with self.lock:
            self.faults.append(fault)
        return fault

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# -- Postgres ---------------------------------------------------------------------------------


def _admin():
    from sqlalchemy.engine import make_url

    return make_url(_ADMIN)


def pg_url(db: str, driver: str = "postgresql+psycopg") -> str:
    return _admin().set(drivername=driver, database=db).render_as_string(hide_password=False)


def _connect_admin():
    import psycopg

    a = _admin()
    return psycopg.connect(host=a.host or "127.0.0.1", port=a.port or 5432, user=a.username,
                           password=a.password, dbname=a.database or "postgres", autocommit=True)


def create_database(name: str) -> str:
    """Drop and create database ``name``; returns its SQLAlchemy URL."""
    with _connect_admin() as conn:
        conn.execute(f'drop database if exists "{name}" with (force)')
        conn.execute(f'create database "{name}"')
    return pg_url(name)


def drop_database(name: str) -> None:
    with _connect_admin() as conn:
        conn.execute(f'drop database if exists "{name}" with (force)')


# -- Airflow ----------------------------------------------------------------------------------


@dataclass
class Stack:
    home: Path
    env: dict[str, str]
    moto: MotoServer
    proxy: FaultProxy
    meta_db: str
    review_db: str
    review_url: str

    @property
    def s3_endpoint(self) -> str:
        return f"127.0.0.1:{self.proxy.port}"

    def settings(self):
        from moderation.config import Settings

        return Settings.from_env(self.env)

    def stop(self) -> None:
        self.proxy.stop()
        self.moto.stop()


def configure_airflow(home: Path, *, tag: str = "test", in_process: bool = True) -> Stack:
    """Start S3 + proxy, create the databases, migrate Airflow's database; returns the stack.

    The environment is applied by :func:`environment`, around the tests that use it. A stack whose
    Airflow runs only in subprocesses (``in_process=False``: a real scheduler) does not care whether
    this process imported ``airflow`` already.
    """
    if in_process and "airflow" in sys.modules:
        raise RuntimeError("airflow was imported before configure_airflow(); its settings are fixed")
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    suffix = f"{tag}_{os.getpid()}"
    meta_db, review_db = f"af_meta_{suffix}", f"af_review_{suffix}"
    create_database(meta_db)
    # Airflow's own database on psycopg2, as in production: with psycopg 3 its asset-graph query fails
    # (``jsonb #> character varying``). The review database stays on psycopg 3.
    meta_url = pg_url(meta_db, "postgresql+psycopg2")
    review_url = create_database(review_db)
    moto = MotoServer()
    proxy = FaultProxy(moto.port)
    s3_conn = {"conn_type": "aws", "login": ACCESS_KEY, "password": SECRET_KEY,
               "extra": {"endpoint_url": f"http://127.0.0.1:{proxy.port}", "bucket": BUCKET,
                         "region_name": "us-east-1"}}
    env = {
        "AIRFLOW_HOME": str(home / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": meta_url,
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC": pg_url(meta_db, "postgresql+psycopg_async"),
        "AIRFLOW__DATABASE__LOAD_DEFAULT_CONNECTIONS": "False",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW_CONN_MODERATION_DB": pg_url(review_db, "postgres"),
        "AIRFLOW_CONN_MODERATION_S3": json.dumps(s3_conn),
        # The library's own variables (what a worker's environment holds in compose).
        "MODERATION_HOME": str(home / "moderation"),
        "MODERATION_IMAGE_SIZE": "96",
        "MODERATION_WORKERS": "0",
        "MODERATION_BATCH_SIZE": "16",
        "MODERATION_DEVICE": "cpu",
        "MODERATION_PROGRESS": "false",
        "MODERATION_EVIDENCE": "false",
        # No labelled calibration set here, and an uncalibrated run flags nothing (moderation.thresholds):
        # the operator's explicit threshold, the fixed value these runs always flagged at.
        "MODERATION_THRESHOLD": "0.25",
        # settings for direct library use in assertions (the DAGs read the connections)
        "MODERATION_DATABASE_URL": review_url,
        "MODERATION_STORE_URL": f"s3://{BUCKET}",
        "MODERATION_S3_ENDPOINT": f"127.0.0.1:{proxy.port}",
        "MODERATION_S3_ACCESS_KEY": ACCESS_KEY,
        "MODERATION_S3_SECRET_KEY": SECRET_KEY,
        "MODERATION_S3_REGION": "us-east-1",
        "GX_ANALYTICS_ENABLED": "false",
        "TQDM_DISABLE": "1",
    }
    airflow_bin = VENV_BIN / "airflow"
    out = subprocess.run([str(airflow_bin), "db", "migrate"], env={**os.environ, **env}, capture_output=True,
                         text=True, timeout=300)
    if out.returncode != 0:
        proxy.stop()
        moto.stop()
        raise RuntimeError(f"airflow db migrate failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    subprocess.run([str(airflow_bin), "pools", "set", "gpu", "1", "GPU training"], env={**os.environ, **env},
                   capture_output=True, text=True, timeout=120)
    return Stack(home, env, moto, proxy, meta_db, review_db, review_url)


@contextlib.contextmanager
def environment(stack: Stack):
    """The stack's variables in ``os.environ`` (what a worker's environment holds), restored after."""
    saved = dict(os.environ)
    os.environ.update(stack.env)
    try:
        yield stack
    finally:
        os.environ.clear()
        os.environ.update(saved)


def load_dags() -> dict:
    """Parse the DAGs folder like the dag-processor does; fails on import errors."""
    from airflow.dag_processing.dagbag import BundleDagBag

    bag = BundleDagBag(dag_folder=str(REPO / "dags"), bundle_path=REPO / "dags", bundle_name="dags-folder")
    if bag.import_errors:
        raise AssertionError(f"DAG import errors: {bag.import_errors}")
    return bag.dags


def run_dag(dag, *, conf: dict | None = None, logical_date=None):
    """``dag.test()``; returns (dag run, {task_id[map_index]: (state, try_number)}, seconds)."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    t0 = time.perf_counter()
    dr = dag.test(run_conf=conf or {}, logical_date=logical_date)
    seconds = time.perf_counter() - t0
    with create_session() as s:
        tis = s.query(TaskInstance).filter(TaskInstance.dag_id == dag.dag_id,
                                           TaskInstance.run_id == dr.run_id).all()
        states = {(f"{ti.task_id}[{ti.map_index}]" if ti.map_index >= 0 else ti.task_id):
                  (str(ti.state.value if hasattr(ti.state, "value") else ti.state), ti.try_number)
                  for ti in tis}
    return dr, states, seconds


# -- images -----------------------------------------------------------------------------------


def _shape_image(rng: random.Random, size: int = 128):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randrange(4, 9)):
        x0, y0 = rng.randrange(size), rng.randrange(size)
        x1, y1 = min(size, x0 + rng.randrange(10, 70)), min(size, y0 + rng.randrange(10, 70))
        colour = tuple(rng.randrange(256) for _ in range(3))
        kind = rng.randrange(3)
        if kind == 0:
            draw.rectangle([x0, y0, x1, y1], fill=colour)
        elif kind == 1:
            draw.ellipse([x0, y0, x1, y1], fill=colour)
        else:
            draw.polygon([(x0, y0), (x1, y0), ((x0 + x1) // 2, y1)], fill=colour)
    return img


def _jpeg(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _edit(img, rng: random.Random):
    from PIL import ImageEnhance, ImageOps

    w, h = img.size
    kind = rng.randrange(3)
    if kind == 0:  # crop
        dx, dy = rng.randrange(4, w // 6), rng.randrange(4, h // 6)
        return img.crop((dx, dy, w - dx // 2, h - dy // 2)).resize((w, h))
    if kind == 1:  # flip
        return ImageOps.mirror(img)
    return ImageEnhance.Color(ImageEnhance.Brightness(img).enhance(1.2)).enhance(0.6)  # colour change


@dataclass
class Dataset:
    references: dict[str, bytes]
    background: dict[str, bytes]
    queries: dict[str, dict[str, bytes]]  # day -> key -> bytes
    truth: dict[str, str]  # query id -> reference id


def make_dataset(days: list[str], *, n_refs: int = 20, n_background: int = 24, copies_per_day: int = 6,
                 distractors_per_day: int = 3, seed: int = 7) -> Dataset:
    rng = random.Random(seed)
    refs = {f"R{i:04d}": _shape_image(rng) for i in range(n_refs)}
    references = {f"references/{rid}.jpg": _jpeg(img) for rid, img in refs.items()}
    background = {f"background/B{i:04d}.jpg": _jpeg(_shape_image(rng)) for i in range(n_background)}
    queries: dict[str, dict[str, bytes]] = {}
    truth: dict[str, str] = {}
    ref_ids = sorted(refs)
    for d, day in enumerate(days):
        batch = {}
        for j, rid in enumerate(rng.sample(ref_ids, copies_per_day)):
            qid = f"Q{d:02d}{j:03d}"
            batch[f"queries/{day}/{qid}.jpg"] = _jpeg(_edit(refs[rid], rng))
            truth[qid] = rid
        for j in range(distractors_per_day):
            batch[f"queries/{day}/Q{d:02d}{900 + j:03d}.jpg"] = _jpeg(_shape_image(rng))
        queries[day] = batch
    return Dataset(references, background, queries, truth)


def upload(store, objects: dict[str, bytes]) -> None:
    for key, data in objects.items():
        store.put(key, data, "image/jpeg")


# -- one stack per test session ---------------------------------------------------------------

_STACK: Stack | None = None


def session_stack(root: Path) -> Stack:
    """The test session's stack, configured on first use and torn down at exit."""
    global _STACK
    if _STACK is None:
        import atexit

        _STACK = configure_airflow(root, tag="pytest")

        def _teardown(stack=_STACK):
            stack.stop()
            for name in (stack.meta_db, stack.review_db):
                try:
                    drop_database(name)
                except Exception:  # noqa: BLE001 - best effort at exit
                    pass

        atexit.register(_teardown)
    return _STACK


def asset_events(name: str) -> list[dict]:
    """Extras of the events of asset ``name``, oldest first."""
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session

    with create_session() as s:
        rows = (s.query(AssetEvent).join(AssetModel, AssetEvent.asset_id == AssetModel.id)
                .filter(AssetModel.name == name).order_by(AssetEvent.id).all())
        return [dict(r.extra or {}) for r in rows]


def queued_runs(dag_id: str) -> list[str]:
    """Assets that have queued an asset-triggered run of ``dag_id`` (AssetDagRunQueue)."""
    from airflow.models.asset import AssetDagRunQueue, AssetModel
    from airflow.utils.session import create_session

    with create_session() as s:
        rows = (s.query(AssetModel.name).join(AssetDagRunQueue, AssetDagRunQueue.asset_id == AssetModel.id)
                .filter(AssetDagRunQueue.target_dag_id == dag_id).all())
        return [r[0] for r in rows]


def clear_queue() -> None:
    from airflow.models.asset import AssetDagRunQueue
    from airflow.utils.session import create_session

    with create_session() as s:
        s.query(AssetDagRunQueue).delete()


def task_seconds(dag_id: str, run_id: str) -> float:
    """Seconds spent inside the tasks of a run (all tries; dag.test() runs them one at a time)."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.taskinstancehistory import TaskInstanceHistory
    from airflow.utils.session import create_session

    with create_session() as s:
        total = 0.0
        for model in (TaskInstance, TaskInstanceHistory):
            for ti in s.query(model).filter(model.dag_id == dag_id, model.run_id == run_id).all():
                if ti.start_date and ti.end_date:
                    total += (ti.end_date - ti.start_date).total_seconds()
        return total
