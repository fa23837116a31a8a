"""The object-store contract, run against the local folder store and a real S3 server (moto)."""

from __future__ import annotations

import os
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import fast_env, free_port, s3_env
from store_wrappers import PassThrough
from moderation.config import Settings
from moderation.errors import ConfigError, NotFoundError, StoreError
from moderation.store import (MAX_KEY_BYTES, MAX_SEGMENT_BYTES, LocalStore, ObjectStore, S3Store, open_store,
                              validate_key)


@pytest.fixture(params=["local", "s3", "s3-prefix"])
def store(request, tmp_path):
    if request.param == "local":
        settings = Settings.from_env(fast_env(tmp_path / "home"))
    else:
        server = request.getfixturevalue("s3_server")
        bucket = request.getfixturevalue("s3_bucket")
        env = {**fast_env(tmp_path / "home"), **s3_env(server, bucket)}
        if request.param == "s3-prefix":
            env["MODERATION_STORE_URL"] += "/tenant/a"
        settings = Settings.from_env(env)
    st = open_store(settings)
    assert isinstance(st, LocalStore if request.param == "local" else S3Store)
    return st


# -- contract -----------------------------------------------------------------------------------


def test_put_get_round_trip(store):
    store.put("references/cat.jpg", b"\x89binary\x00\xff")
    assert store.get("references/cat.jpg") == b"\x89binary\x00\xff"
    store.put("empty.bin", b"")
    assert store.get("empty.bin") == b""
    big = bytes(range(256)) * 4096  # 1 MiB
    store.put("a/b/c/big.bin", big)
    assert store.get("a/b/c/big.bin") == big


def test_put_overwrites(store):
    store.put("k", b"one")
    store.put("k", b"two")
    assert store.get("k") == b"two"
    assert list(store.list()) == ["k"]


def test_exists(store):
    assert not store.exists("x/y.txt")
    store.put("x/y.txt", b"1")
    assert store.exists("x/y.txt")
    assert not store.exists("x/y")  # a prefix is not an object
    assert not store.exists("x/y.txt2")


def test_list_sorted_and_by_prefix(store):
    for key in ("refs2/z", "references/b.jpg", "references/a.jpg", "references/sub/c.jpg", "other"):
        store.put(key, b"x")
    assert list(store.list()) == ["other", "references/a.jpg", "references/b.jpg",
                                  "references/sub/c.jpg", "refs2/z"]
    assert list(store.list("references/")) == ["references/a.jpg", "references/b.jpg",
                                               "references/sub/c.jpg"]
    assert list(store.list("ref")) == ["references/a.jpg", "references/b.jpg", "references/sub/c.jpg",
                                       "refs2/z"]
    assert list(store.list("nothing/")) == []


def test_delete(store):
    store.put("d/1", b"1")
    store.put("d/2", b"2")
    store.delete("d/1")
    assert not store.exists("d/1")
    assert list(store.list("d/")) == ["d/2"]
    store.delete("d/1")  # missing: not an error
    store.delete("never/was")
    with pytest.raises(NotFoundError):
        store.get("d/1")


def test_missing_key_is_not_found(store):
    with pytest.raises(NotFoundError, match="missing/key.bin"):
        store.get("missing/key.bin")


def test_locate_gives_a_usable_link(store):
    store.put("evidence/pair 1.png", b"picture-bytes")
    link = store.locate("evidence/pair 1.png")
    if isinstance(store, LocalStore):
        assert Path(link).is_file() and Path(link).read_bytes() == b"picture-bytes"
        assert Path(link).is_relative_to(store.root)
    else:
        assert link.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(link, timeout=10) as resp:
            assert resp.read() == b"picture-bytes"


def test_unusual_but_valid_keys(store):
    keys = ["références/é.jpg", "a b+c=d&e.jpg", "x/y.z/..hidden", "emoji/🙂.png", LONGEST]
    for key in keys:
        store.put(key, key.encode())
    for key in keys:
        assert store.get(key) == key.encode()
        assert store.exists(key)
    assert sorted(store.list()) == sorted(keys)


def test_put_file_and_check(store, tmp_path):
    f = tmp_path / "f.bin"
    f.write_bytes(b"file-bytes")
    store.put_file("files/f.bin", f)
    assert store.get("files/f.bin") == b"file-bytes"
    store.check()


class NoWholeReads(PassThrough):
    """Refuses ``get``/``put`` of whole objects: a streamed file transfer must not go through them."""

    def get(self, key):
        raise AssertionError(f"{key} was read whole")

    def put(self, key, data, content_type="application/octet-stream"):
        raise AssertionError(f"{key} was written whole")


def test_large_files_stream_both_ways(store, tmp_path):
    """put_file / get_file move a file bigger than an S3 multipart part without whole-object get/put."""
    src = tmp_path / "big.bin"
    data = os.urandom(13 << 20)  # above minio's 5 MiB part size: a multipart upload on S3
    src.write_bytes(data)
    store.put_file("files/big.bin", src)
    assert store.size("files/big.bin") == len(data)
    out = tmp_path / "out.bin"
    store.get_file("files/big.bin", out)
    assert out.read_bytes() == data
    assert store.get("files/big.bin") == data
    # The backends' own streaming, not the base class's fallback through get/put (which NoWholeReads refuses).
    assert type(store).put_file is not ObjectStore.put_file and type(store).get_file is not ObjectStore.get_file
    with pytest.raises(AssertionError):
        NoWholeReads(store).get_file("files/big.bin", tmp_path / "via-fallback.bin")


def test_get_file_of_a_missing_key_leaves_the_target_untouched(store, tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    out = folder / "kept.bin"
    out.write_bytes(b"before")
    with pytest.raises(NotFoundError):
        store.get_file("files/absent.bin", out)
    assert out.read_bytes() == b"before"
    assert sorted(p.name for p in folder.iterdir()) == ["kept.bin"]  # no temp file left behind


# exactly MAX_KEY_BYTES, in segments no longer than a file name may be
LONGEST = "/".join(["k" * MAX_SEGMENT_BYTES] * 3) + "/" + "k" * (MAX_KEY_BYTES - 3 * (MAX_SEGMENT_BYTES + 1))

HOSTILE = [
    "",
    "..",
    "../escape",
    "a/../../escape",
    "a/..",
    "./a",
    "a/./b",
    "a//b",
    "a/",
    "/etc/passwd",
    "a\x00b",
    "a\nb",
    "a\\b",
    "..\\..\\escape",
    "k" * (MAX_KEY_BYTES + 1),
    LONGEST + "k",
    "k" * (MAX_SEGMENT_BYTES + 1),  # one segment longer than a file name
    "é" * (MAX_KEY_BYTES // 2 + 1),  # 2 bytes each: over the limit in bytes, not characters
    "bad\udcffsurrogate",  # from os.fsdecode of non-UTF-8 bytes
]


@pytest.mark.parametrize("key", HOSTILE, ids=lambda k: repr(k)[:30])
def test_hostile_keys_rejected(store, key, tmp_path):
    for op in (lambda: store.put(key, b"x"), lambda: store.get(key), lambda: store.exists(key),
               lambda: store.delete(key), lambda: store.locate(key)):
        with pytest.raises(ValueError):
            op()
    assert list(store.list()) == []
    assert not (tmp_path / "escape").exists()


def test_validate_key_accepts_byte_limit_exactly():
    assert len(LONGEST.encode()) == MAX_KEY_BYTES and validate_key(LONGEST) == LONGEST
    seg = "é" * (MAX_SEGMENT_BYTES // 2)  # 254 bytes
    assert validate_key(seg) == seg
    with pytest.raises(ValueError, match="longer than 255 bytes"):
        validate_key(seg + "é")
    with pytest.raises(ValueError, match="UTF-8"):
        validate_key("\udcff")


# -- backend specifics --------------------------------------------------------------------------


def test_local_store_writes_atomically_and_hides_temp_files(tmp_path):
    st = LocalStore(tmp_path / "s")
    (tmp_path / "s" / "x").mkdir(parents=True)
    (tmp_path / "s" / "x" / ".tmp-abc").write_bytes(b"partial")  # a crashed writer's leftover
    st.put("x/real", b"1")
    assert list(st.list()) == ["x/real"]
    assert not [p for p in (tmp_path / "s" / "x").iterdir() if p.name.startswith(".tmp-") and p.name != ".tmp-abc"]


def test_s3_prefix_is_isolated(s3_server, s3_bucket, tmp_path):
    base = {**fast_env(tmp_path / "home"), **s3_env(s3_server, s3_bucket)}
    a = open_store(Settings.from_env({**base, "MODERATION_STORE_URL": f"s3://{s3_bucket}/tenant-a"}))
    b = open_store(Settings.from_env({**base, "MODERATION_STORE_URL": f"s3://{s3_bucket}/tenant-b"}))
    root = open_store(Settings.from_env(base))
    a.put("k", b"a")
    b.put("k", b"b")
    assert a.get("k") == b"a" and b.get("k") == b"b"
    assert list(a.list()) == ["k"]
    assert list(root.list()) == ["tenant-a/k", "tenant-b/k"]
    assert a.url == f"s3://{s3_bucket}/tenant-a/"


def test_s3_unreachable_is_a_helpful_store_error():
    endpoint = f"127.0.0.1:{free_port()}"  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(StoreError) as info:
        S3Store(endpoint, "bucket", "testing", "testing", region="us-east-1")
    assert time.monotonic() - t0 < 30
    msg = str(info.value)
    assert "MODERATION_S3_ENDPOINT" in msg and endpoint in msg
    st = S3Store(endpoint, "bucket", "testing", "testing", region="us-east-1", create_bucket=False)
    with pytest.raises(StoreError, match="MODERATION_S3_ENDPOINT"):
        st.get("some/key")
    with pytest.raises(StoreError):
        st.check()


def test_s3_server_side_error_is_a_store_error(s3_server, s3_bucket):
    # a bucket that does not exist (and is not created): the server answers NoSuchBucket
    st = S3Store(s3_server.endpoint, s3_bucket, "testing", "testing", region="us-east-1",
                 create_bucket=False)
    with pytest.raises(StoreError, match="S3 put failed .*NoSuchBucket"):
        st.put("k", b"x")
    with pytest.raises(StoreError, match="NoSuchBucket"):
        list(st.list())


def test_open_store_configuration_errors(tmp_path):
    base = fast_env(tmp_path / "home")
    with pytest.raises(ConfigError, match="MODERATION_S3_ENDPOINT"):
        open_store(Settings.from_env({**base, "MODERATION_STORE_URL": "s3://bucket"}))
    with pytest.raises(ConfigError, match="must name a bucket"):
        open_store(Settings.from_env({**base, "MODERATION_STORE_URL": "s3://",
                                      "MODERATION_S3_ENDPOINT": "127.0.0.1:1"}))
    with pytest.raises(ConfigError, match="scheme must be file:// or s3://"):
        open_store(Settings.from_env({**base, "MODERATION_STORE_URL": "ftp://host/x"}))
    # file://data parses "data" as a host: it must not silently become the current folder
    with pytest.raises(ConfigError, match="absolute"):
        open_store(Settings.from_env({**base, "MODERATION_STORE_URL": "file://data/store"}))


def test_open_store_local_forms(tmp_path):
    st = open_store(Settings.from_env({"MODERATION_HOME": str(tmp_path / "h")}))
    assert isinstance(st, LocalStore) and st.root == (tmp_path / "h" / "store").resolve()
    plain = open_store(Settings.from_env({"MODERATION_STORE_URL": str(tmp_path / "plain")}))
    assert plain.root == (tmp_path / "plain").resolve()
    url = open_store(Settings.from_env({"MODERATION_STORE_URL": f"file://{tmp_path / 'url'}"}))
    assert url.root == (tmp_path / "url").resolve()
    host = open_store(Settings.from_env({"MODERATION_STORE_URL": f"file://localhost{tmp_path / 'lh'}"}))
    assert host.root == (tmp_path / "lh").resolve()
