"""Static checks of docker/: Docker cannot run here, so the files are parsed and cross-checked.

Every service, volume, variable and connection the DAGs need is defined; the
GPU worker serves the `gpu` queue with an NVIDIA reservation; images are
pinned (and not the withdrawn minio/minio); the connections the DAGs read
resolve, through the library, to the compose services.
"""

from __future__ import annotations

import json
import re
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from moderation import orchestration
from moderation.config import Settings

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"
AIRFLOW_SERVICES = ("airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer",
                    "airflow-worker-cpu", "airflow-worker-gpu")
VAR = re.compile(r"(?<!\$)\$\{([A-Z0-9_]+)(:?-[^}]*)?\}")


@pytest.fixture(scope="module")
def compose_text() -> str:
    return (DOCKER / "docker-compose.yml").read_text()


@pytest.fixture(scope="module")
def compose(compose_text) -> dict:
    return yaml.safe_load(compose_text)


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    out = {}
    for line in (DOCKER / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def _interpolate(value: str, env: dict[str, str]) -> str:
    def sub(m):
        name, default = m.group(1), m.group(2)
        if env.get(name):
            return env[name]
        return default[2:] if default and default.startswith(":-") else ""
    return VAR.sub(sub, value.replace("$$", "$"))


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def test_every_service_is_defined(compose):
    services = compose["services"]
    for name in ("postgres", "redis", "objectstore", "init", *AIRFLOW_SERVICES):
        assert name in services, name
    commands = {name: " ".join(services[name]["command"]) for name in AIRFLOW_SERVICES}
    assert commands["airflow-apiserver"] == "api-server"
    assert commands["airflow-scheduler"] == "scheduler"
    assert commands["airflow-dag-processor"] == "dag-processor"
    assert commands["airflow-triggerer"] == "triggerer"
    assert "--queues default" in commands["airflow-worker-cpu"]
    assert "--queues gpu" in commands["airflow-worker-gpu"]


def test_gpu_worker_reserves_a_gpu_and_serves_the_dags_gpu_queue(compose):
    gpu = compose["services"]["airflow-worker-gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert "deploy" not in compose["services"]["airflow-worker-cpu"]
    common = (REPO / "dags" / "moderation_dag_common.py").read_text()
    queue = re.search(r'^GPU_QUEUE = "([^"]+)"', common, re.M).group(1)
    pool = re.search(r'^GPU_POOL = "([^"]+)"', common, re.M).group(1)
    assert f"--queues {queue}" in " ".join(gpu["command"])
    assert f"pools set {pool} " in (DOCKER / "init.sh").read_text()
    retrain = (REPO / "dags" / "sscd_retrain.py").read_text()
    assert "queue=common.GPU_QUEUE, pool=common.GPU_POOL" in retrain


def _hours_of_training(dag_source: str) -> float:
    """The retrain task's execution limit, read from its DAG file (``execution_timeout=timedelta(hours=N)``)."""
    found = re.findall(r"execution_timeout=timedelta\(hours=(\d+(?:\.\d+)?)\)", dag_source)
    assert len(found) == 1, found
    return float(found[0])


def test_celery_outlives_the_longest_task_and_workers_wait_for_a_busy_api(compose):
    training_s = _hours_of_training((REPO / "dags" / "sscd_retrain.py").read_text()) * 3600
    assert training_s == 48 * 3600
    for name in AIRFLOW_SERVICES:
        env = _env(compose["services"][name])
        # Redis redelivers a task not acknowledged within the visibility timeout (acks are late): a
        # timeout under the training limit would start the same training twice on the GPU worker.
        visibility = float(env["AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT"])
        assert visibility > training_s, name
        assert visibility <= 2 * training_s, name  # a lost worker's task still comes back within days
        # The task SDK's HTTP timeout to the execution API (default 5 s) under a loaded api-server.
        api_timeout = float(env["AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT"])
        assert 5 < api_timeout <= 60, name


def test_images_are_pinned_and_none_is_the_withdrawn_minio(compose):
    for name, service in compose["services"].items():
        image = service.get("image", "")
        assert image, name
        if "build" in service:
            continue
        assert ":" in image and not image.endswith(":latest"), (name, image)
        assert not image.startswith(("minio/minio", "bitnami/minio")), (name, image)
    assert compose["services"]["objectstore"]["image"].startswith("chrislusf/seaweedfs:")


def test_airflow_services_share_config_and_the_dag_connections(compose, env_example):
    services = compose["services"]
    conn_vars = {f"AIRFLOW_CONN_{orchestration.DB_CONN_ID.upper()}",
                 f"AIRFLOW_CONN_{orchestration.S3_CONN_ID.upper()}"}
    for name in (*AIRFLOW_SERVICES, "init"):
        env = _env(services[name])
        assert conn_vars <= set(env), name
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
        assert env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://redis:")
        assert "@postgres:5432/" in env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
        # Airflow's own database on psycopg2 (psycopg 3 breaks the UI's asset graph query); the
        # review database (AIRFLOW_CONN_MODERATION_DB, checked below) stays on psycopg 3
        assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://"), name
        assert env["AIRFLOW__CELERY__RESULT_BACKEND"].startswith("db+postgresql+psycopg2://"), name
        assert env["AIRFLOW__CORE__DAGS_FOLDER"] == "/opt/moderation/dags"
        assert env["AIRFLOW__API_AUTH__JWT_SECRET"]  # all components must share it
        assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"].startswith("http://airflow-apiserver:8080/")
        settings_fields = {f.name for f in fields(Settings)}
        for key in env:
            if key.startswith("MODERATION_"):
                assert key[len("MODERATION_"):].lower() in settings_fields, key
        deps = services[name].get("depends_on", {})
        if name != "init":
            assert deps["init"]["condition"] == "service_completed_successfully", name
    # the connections, as a worker sees them, resolve to the compose services
    env = {k: _interpolate(v, env_example) for k, v in _env(services["airflow-worker-cpu"]).items()}
    s3 = json.loads(env["AIRFLOW_CONN_MODERATION_S3"])
    s3_settings = orchestration.store_settings_from_connection(s3)
    host, port = s3_settings["s3_endpoint"].split(":")
    assert host == "objectstore" and port in " ".join(services["objectstore"]["command"])
    assert s3_settings["store_url"] == f"s3://{env_example['S3_BUCKET']}"
    assert s3_settings["s3_access_key"] == env_example["S3_ACCESS_KEY"]
    from urllib.parse import urlsplit

    db = urlsplit(env["AIRFLOW_CONN_MODERATION_DB"])
    url = orchestration.database_url_from_connection(
        {"conn_type": "postgres", "host": db.hostname, "port": db.port, "login": db.username,
         "password": db.password, "schema": db.path.lstrip("/")})
    assert url.startswith("postgresql+psycopg://moderation:") and url.endswith("@postgres:5432/moderation")


def test_variables_and_volumes_are_declared(compose, compose_text, env_example):
    required = {m.group(1) for m in VAR.finditer(compose_text) if not m.group(2)}
    assert required <= set(env_example), required - set(env_example)
    declared = set(compose.get("volumes") or {})
    used = set()
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if not source.startswith((".", "/")):
                used.add(source)
    assert used <= declared and used, (used, declared)
    for name in ("postgres", "redis", "objectstore", "airflow-apiserver", "airflow-scheduler"):
        assert "healthcheck" in compose["services"][name], name
    assert compose["services"]["airflow-apiserver"]["ports"][0].endswith(":8080")


def test_dockerfile_and_init_script():
    dockerfile = (DOCKER / "Dockerfile").read_text()
    constraints = (REPO / "constraints.txt").read_text()
    pinned = re.search(r"^apache-airflow==(\S+)$", constraints, re.M).group(1)
    assert f"ARG AIRFLOW_VERSION={pinned}" in dockerfile
    assert "FROM apache/airflow:${AIRFLOW_VERSION}-python${PYTHON_VERSION}" in dockerfile
    for src in re.findall(r"^COPY --chown=\S+ (.+) \S+$", dockerfile, re.M):
        for path in src.split():
            assert (REPO / path).exists(), path
    # the Celery provider, redis and psycopg2 come from the project's airflow extra, pinned by constraints.txt
    assert re.search(r'pip install [^\n]*-c constraints\.txt -e "\.\[\$\{EXTRAS\},airflow\]"', dockerfile)
    assert "apache-airflow[celery]" not in dockerfile
    for package in ("apache-airflow-providers-celery", "redis", "psycopg2-binary"):
        assert re.search(rf"^{package}==\S+$", constraints, re.M), package
    init = (DOCKER / "init.sh").read_text()
    for step in ("airflow db migrate", "pools set gpu", "Pipeline.open(settings)", "create database"):
        assert step in init, step
    assert (DOCKER / "init.sh").stat().st_mode & 0o111
