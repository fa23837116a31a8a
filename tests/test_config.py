"""Settings from MODERATION_* variables: parsing, errors that name the variable, home defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from moderation.config import Device, Postprocess, ResizeMode, Settings
from moderation.errors import ConfigError
from moderation.store import LocalStore, open_store


def test_defaults_live_under_home(tmp_path):
    home = tmp_path / "h"
    s = Settings.from_env({"MODERATION_HOME": str(home)})
    assert s.home == home.resolve()
    assert s.database_url == f"sqlite:///{home.resolve() / 'moderation.db'}"
    assert s.store_url == f"file://{home.resolve() / 'store'}"
    assert s.cache_dir == home.resolve() / "cache"
    assert (s.device, s.resize_mode, s.postprocess) == (Device.AUTO, ResizeMode.SQUARE, Postprocess.WHITEN)
    assert (s.batch_size, s.workers, s.image_size, s.topk) == (32, 2, 320, 10)
    assert (s.sn_beta, s.sn_neighbors, s.index_factory, s.threshold) == (1.0, 3, "auto", 0.0)
    assert (s.index_flat_max, s.index_nprobe, s.index_train_size) == (1_000_000, 0, 0)
    assert s.max_failure_rate == 0.2 and s.max_image_pixels == 64_000_000 and s.progress is True


def test_default_home_is_relative_to_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = Settings.from_env({})
    assert s.home == (tmp_path / ".moderation").resolve()
    assert s.database_url.endswith("/.moderation/moderation.db")


def test_home_expands_user(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    s = Settings.from_env({"MODERATION_HOME": "~/mod"})
    assert s.home == (tmp_path / "mod").resolve()


def test_reads_os_environ_by_default(tmp_path, monkeypatch):
    monkeypatch.setenv("MODERATION_HOME", str(tmp_path / "env-home"))
    monkeypatch.setenv("MODERATION_TOPK", "7")
    s = Settings.from_env()
    assert s.home == (tmp_path / "env-home").resolve() and s.topk == 7


def test_parsing_every_kind(tmp_path):
    env = {
        "MODERATION_HOME": str(tmp_path),
        "MODERATION_DATABASE_URL": "postgresql+psycopg://u@db:5432/mod",
        "MODERATION_STORE_URL": "s3://bucket/prefix",
        "MODERATION_S3_ENDPOINT": "minio:9000",
        "MODERATION_S3_SECURE": "yes",
        "MODERATION_DEVICE": "cpu",
        "MODERATION_BATCH_SIZE": " 8 ",
        "MODERATION_WORKERS": "0",
        "MODERATION_IMAGE_SIZE": "224",
        "MODERATION_RESIZE_MODE": "short_edge",
        "MODERATION_SN_BETA": "0.5",
        "MODERATION_SN_NEIGHBORS": "5",
        "MODERATION_POSTPROCESS": "center",
        "MODERATION_WHITEN_DIM": "128",
        "MODERATION_INDEX_FACTORY": "IVF1024,PQ64",
        "MODERATION_THRESHOLD": "0.25",
        "MODERATION_MAX_FAILURE_RATE": "0.5",
        "MODERATION_EVIDENCE": "off",
        "MODERATION_PROGRESS": "FALSE",
    }
    s = Settings.from_env(env)
    assert s.database_url == "postgresql+psycopg://u@db:5432/mod"
    assert s.store_url == "s3://bucket/prefix" and s.s3_endpoint == "minio:9000" and s.s3_secure is True
    assert s.device is Device.CPU and s.resize_mode is ResizeMode.SHORT_EDGE
    assert s.postprocess is Postprocess.CENTER
    assert (s.batch_size, s.workers, s.image_size, s.whiten_dim) == (8, 0, 224, 128)
    assert (s.sn_beta, s.sn_neighbors, s.threshold, s.max_failure_rate) == (0.5, 5, 0.25, 0.5)
    assert s.index_factory == "IVF1024,PQ64"
    assert s.evidence is False and s.progress is False


@pytest.mark.parametrize("raw,value", [("1", True), ("true", True), ("On", True), ("YES", True),
                                       ("0", False), ("false", False), ("off", False), ("No", False)])
def test_bool_spellings(tmp_path, raw, value):
    assert Settings.from_env({"MODERATION_HOME": str(tmp_path), "MODERATION_EVIDENCE": raw}).evidence is value


def test_empty_value_means_default(tmp_path):
    s = Settings.from_env({"MODERATION_HOME": str(tmp_path), "MODERATION_BATCH_SIZE": "",
                           "MODERATION_DEVICE": ""})
    assert s.batch_size == 32 and s.device is Device.AUTO


@pytest.mark.parametrize("name,raw,allowed", [
    ("MODERATION_DEVICE", "gpu", "auto, cpu, cuda"),
    ("MODERATION_RESIZE_MODE", "stretch", "square, short_edge"),
    ("MODERATION_POSTPROCESS", "pca", "none, center, whiten"),
])
def test_enum_errors_name_the_variable_and_choices(tmp_path, name, raw, allowed):
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"MODERATION_HOME": str(tmp_path), name: raw})
    msg = str(info.value)
    assert name in msg and repr(raw) in msg and allowed in msg


@pytest.mark.parametrize("name,raw", [("MODERATION_WORKERS", "two"), ("MODERATION_BATCH_SIZE", "3.5"),
                                      ("MODERATION_SN_BETA", "high"), ("MODERATION_PROGRESS", "maybe"),
                                      ("MODERATION_S3_SECURE", "2")])
def test_scalar_errors_name_the_variable(tmp_path, name, raw):
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({"MODERATION_HOME": str(tmp_path), name: raw})


@pytest.mark.parametrize("name,raw", [("MODERATION_BATCH_SIZE", "0"), ("MODERATION_MAX_FAILURE_RATE", "1.5"),
                                      ("MODERATION_MAX_FAILURE_RATE", "-0.1"), ("MODERATION_TOPK", "0"),
                                      ("MODERATION_WORKERS", "-1"), ("MODERATION_SN_NEIGHBORS", "0")])
def test_range_errors_name_the_variable(tmp_path, name, raw):
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({"MODERATION_HOME": str(tmp_path), name: raw})


def test_overrides_win_and_none_is_ignored(tmp_path):
    env = {"MODERATION_HOME": str(tmp_path / "env"), "MODERATION_WORKERS": "4"}
    s = Settings.from_env(env, home=tmp_path / "cli", workers=None, batch_size=3)
    assert s.home == (tmp_path / "cli").resolve() and s.workers == 4 and s.batch_size == 3
    assert s.database_url == f"sqlite:///{(tmp_path / 'cli').resolve() / 'moderation.db'}"


def test_with_overrides_revalidates(tmp_path):
    s = Settings.from_env({"MODERATION_HOME": str(tmp_path)})
    t = s.with_overrides(image_size=96, resize_mode=ResizeMode.SHORT_EDGE, topk=None)
    assert (t.image_size, t.resize_mode, t.topk) == (96, ResizeMode.SHORT_EDGE, 10)
    assert t.database_url == s.database_url and t.home == s.home
    assert s.image_size == 320  # frozen original untouched
    with pytest.raises(ConfigError, match="MODERATION_BATCH_SIZE"):
        s.with_overrides(batch_size=0)


def test_two_homes_are_isolated(tmp_path):
    a = Settings.from_env({"MODERATION_HOME": str(tmp_path / "a")})
    b = Settings.from_env({"MODERATION_HOME": str(tmp_path / "b")})
    assert a.database_url != b.database_url and a.store_url != b.store_url and a.cache_dir != b.cache_dir
    sa, sb = open_store(a), open_store(b)
    assert isinstance(sa, LocalStore) and isinstance(sb, LocalStore)
    sa.put("models/CURRENT", b"a")
    assert not sb.exists("models/CURRENT")
    assert list(sb.list()) == []
    sb.put("models/CURRENT", b"b")
    assert sa.get("models/CURRENT") == b"a"
    assert Path(sa.root).is_relative_to(a.home) and Path(sb.root).is_relative_to(b.home)
