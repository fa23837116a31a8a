"""Versioned artifacts: publish, resolve, immutability, crash safety, integrity; local and S3."""

from __future__ import annotations

import json

import pytest

from conftest import fast_env, s3_env
from store_wrappers import PassThrough
from moderation.config import Settings
from moderation.errors import IntegrityError, NotFoundError
from moderation.images import sha256_hex
from moderation.registry import (MANIFEST, POINTER, Calibration, IndexVersion, Kind, ModelVersion, Registry,
                                 StatsVersion, new_version_id)
from moderation.store import open_store


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    env = fast_env(tmp_path / "home")
    if request.param == "s3":
        env.update(s3_env(request.getfixturevalue("s3_server"), request.getfixturevalue("s3_bucket")))
    return open_store(Settings.from_env(env))


class CrashOnPointer(PassThrough):
    """Passes everything through, but 'crashes' when the CURRENT pointer is written."""

    def put(self, key, data, content_type="application/octet-stream"):
        if key.endswith("/" + POINTER):
            raise RuntimeError("simulated crash before the pointer moved")
        self.inner.put(key, data, content_type)


def model(version: str, **kw) -> ModelVersion:
    return ModelVersion(version=version, backbone="mobilenet_v2", dim=64, image_size=128,
                        resize_mode="square", source="trained", **kw)


def test_publish_then_current(store):
    reg = Registry(store)
    with pytest.raises(NotFoundError, match="nothing published yet under models"):
        reg.current(Kind.MODEL)
    rec = reg.publish(Kind.MODEL, model("m1", metrics={"uap": 0.5}, threshold=0.7), {"model.pt": b"weights-1"})
    assert rec.files == {"model.pt": sha256_hex(b"weights-1")}
    cur = reg.current(Kind.MODEL)
    assert cur == rec
    assert cur.metrics == {"uap": 0.5} and cur.threshold == 0.7
    assert reg.load(Kind.MODEL, cur, "model.pt") == b"weights-1"
    manifest = json.loads(store.get(f"models/m1/{MANIFEST}"))
    assert manifest["files"]["model.pt"] == sha256_hex(b"weights-1")
    assert json.loads(store.get(f"models/{POINTER}"))["version"] == "m1"

    rec2 = reg.publish(Kind.MODEL, model("m2"), {"model.pt": b"weights-2"})
    assert reg.current(Kind.MODEL).version == "m2"
    assert [r.version for r in reg.versions(Kind.MODEL)] == ["m1", "m2"]
    assert reg.manifest(Kind.MODEL, "m1") == rec
    assert reg.key_of(Kind.MODEL, rec2, "model.pt") == "models/m2/model.pt"


def test_version_is_immutable(store):
    reg = Registry(store)
    first = reg.publish(Kind.MODEL, model("m1"), {"model.pt": b"original"})
    reg.publish(Kind.MODEL, model("m2"), {"model.pt": b"newer"})
    again = reg.publish(Kind.MODEL, model("m1", threshold=0.1), {"model.pt": b"REPLACED"})
    assert again == first  # the stored record, untouched
    assert again.threshold is None
    assert reg.load(Kind.MODEL, again, "model.pt") == b"original"
    assert store.get("models/m1/model.pt") == b"original"
    assert reg.current(Kind.MODEL).version == "m1"  # re-publishing points back at it (a rollback)


def test_publish_without_making_current(store):
    reg = Registry(store)
    reg.publish(Kind.MODEL, model("m1"), {"model.pt": b"1"})
    reg.publish(Kind.MODEL, model("m2"), {"model.pt": b"2"}, make_current=False)
    assert reg.current(Kind.MODEL).version == "m1"
    reg.set_current(Kind.MODEL, reg.manifest(Kind.MODEL, "m2"))
    assert reg.current(Kind.MODEL).version == "m2"


def test_crash_before_pointer_keeps_previous_version(store):
    reg = Registry(store)
    reg.publish(Kind.MODEL, model("m1"), {"model.pt": b"good"})
    crashing = Registry(CrashOnPointer(store))
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashing.publish(Kind.MODEL, model("m2"), {"model.pt": b"half-done"})
    cur = reg.current(Kind.MODEL)
    assert cur.version == "m1"
    assert reg.load(Kind.MODEL, cur, "model.pt") == b"good"
    # the retry finishes the publish
    reg.publish(Kind.MODEL, model("m2"), {"model.pt": b"half-done"})
    assert reg.current(Kind.MODEL).version == "m2"


def test_crash_before_manifest_is_never_resolved(store):
    reg = Registry(store)
    reg.publish(Kind.MODEL, model("m1"), {"model.pt": b"good"})
    store.put("models/m3/model.pt", b"orphan")  # files written, then the process died
    assert reg.current(Kind.MODEL).version == "m1"
    assert [r.version for r in reg.versions(Kind.MODEL)] == ["m1"]
    with pytest.raises(NotFoundError, match="has no manifest"):
        reg.set_current(Kind.MODEL, model("m3"))
    with pytest.raises(NotFoundError):
        reg.manifest(Kind.MODEL, "m3")
    assert reg.current(Kind.MODEL).version == "m1"
    # publishing m3 properly later works and overwrites the orphan
    rec = reg.publish(Kind.MODEL, model("m3"), {"model.pt": b"complete"})
    assert reg.load(Kind.MODEL, rec, "model.pt") == b"complete"


def test_sha256_mismatch_is_an_integrity_error(store):
    reg = Registry(store)
    rec = reg.publish(Kind.MODEL, model("m1"), {"model.pt": b"genuine", "extra.json": b"{}"})
    store.put("models/m1/model.pt", b"tampered")
    with pytest.raises(IntegrityError, match="models/m1/model.pt: sha256 does not match"):
        reg.load(Kind.MODEL, rec, "model.pt")
    assert reg.load(Kind.MODEL, rec, "extra.json") == b"{}"  # other files still load
    with pytest.raises(NotFoundError, match="no file 'other.bin'"):
        reg.load(Kind.MODEL, rec, "other.bin")
    store.delete("models/m1/extra.json")
    with pytest.raises(NotFoundError):
        reg.load(Kind.MODEL, rec, "extra.json")


def test_scopes_are_pinned_per_model_and_stats(store):
    reg = Registry(store)
    for m in ("mA", "mB"):
        reg.publish(Kind.MODEL, model(m), {"model.pt": m.encode()})
    sa = reg.publish(Kind.STATS, StatsVersion("s1", "mA", "whiten", 64, 32, 100), {"stats.npz": b"a"})
    sb = reg.publish(Kind.STATS, StatsVersion("s1", "mB", "center", 64, 64, 50), {"stats.npz": b"b"})
    assert reg.current(Kind.STATS, model_version="mA") == sa
    assert reg.current(Kind.STATS, model_version="mB") == sb
    assert reg.load(Kind.STATS, sb, "stats.npz") == b"b"
    with pytest.raises(NotFoundError):
        reg.current(Kind.STATS, model_version="mC")
    ix = reg.publish(Kind.INDEX, IndexVersion("i1", "mA", "s1", 10, 32, "Flat"), {"index.faiss": b"i"})
    assert reg.current(Kind.INDEX, model_version="mA") == ix
    cal = reg.publish(Kind.CALIBRATION, Calibration("c1", "mA", "s1", 0.42, 0.9, {"uap": 0.8}), {})
    assert reg.current(Kind.CALIBRATION, model_version="mA", stats_version="s1") == cal
    with pytest.raises(NotFoundError):
        reg.current(Kind.CALIBRATION, model_version="mA", stats_version="s2")
    assert store.exists("calibrations/mA/s1/c1/manifest.json")
    assert [r.version for r in reg.versions(Kind.STATS, model_version="mA")] == ["s1"]


def test_version_ids_are_sortable_and_unique():
    a, b = new_version_id(), new_version_id()
    assert a != b and len(a) == len("20250101T000000-") + 8
    assert new_version_id("abcdef0123456789").endswith("-abcdef01")


BROKEN_POINTERS = {
    "flipped byte": lambda good: good[:12] + bytes([good[12] ^ 0x20]) + good[13:],
    "truncated": lambda good: good[: len(good) // 2],
    "empty": lambda good: b"",
    "not utf-8": lambda good: b"\xff\xfe\x00garbage",
    "no version": lambda good: b'{"at": "2026-01-01T00:00:00+00:00"}',
    "a list": lambda good: b'["i1"]',
    "escaping version": lambda good: b'{"version": "../../models/m1"}',
    "missing version": lambda good: b'{"version": "i-never-published"}',
}


@pytest.mark.parametrize("damage", sorted(BROKEN_POINTERS))
def test_a_broken_pointer_names_itself_and_the_rebuild(store, damage):
    """Hardening item 13: a bad CURRENT is a clear ModerationError, not a raw JSON/Key/TypeError."""
    from moderation.errors import ModerationError

    reg = Registry(store)
    reg.publish(Kind.INDEX, IndexVersion("i1", "mA", "s1", 10, 32, "Flat"), {"index.faiss": b"i"})
    good = store.get("indexes/mA/CURRENT")
    store.put("indexes/mA/CURRENT", BROKEN_POINTERS[damage](good))
    with pytest.raises(ModerationError) as info:
        reg.current(Kind.INDEX, model_version="mA")
    assert type(info.value).__name__ == "CorruptPointerError" and not isinstance(info.value, NotFoundError)
    msg = str(info.value)
    assert msg.startswith("indexes/mA/CURRENT ") and info.value.key == "indexes/mA/CURRENT"
    assert "moderation index build" in msg and "reference_index_nightly" in msg
    # the job that publishes an index treats it as nothing in force, and publishing repairs it
    assert reg.replaceable_current(Kind.INDEX, model_version="mA") is None
    reg.publish(Kind.INDEX, IndexVersion("i2", "mA", "s1", 10, 32, "Flat"), {"index.faiss": b"j"})
    assert reg.current(Kind.INDEX, model_version="mA").version == "i2"


@pytest.mark.parametrize("kind,pins,command", [
    (Kind.MODEL, {}, "moderation model import"),
    (Kind.STATS, {"model_version": "mA"}, "moderation stats refresh"),
    (Kind.CALIBRATION, {"model_version": "mA", "stats_version": "s1"}, "moderation calibrate"),
])
def test_every_kind_names_its_own_rebuild(store, kind, pins, command):
    from moderation.errors import ModerationError
    from moderation.registry import _scope

    store.put(f"{_scope(kind, pins)}/{POINTER}", b"{not json")
    with pytest.raises(ModerationError, match=command):
        Registry(store).current(kind, **pins)


def test_an_unreadable_manifest_is_an_integrity_error_and_is_skipped_in_listings(store):
    from moderation.errors import ModerationError

    reg = Registry(store)
    reg.publish(Kind.MODEL, model("m1"), {"model.pt": b"one"})
    reg.publish(Kind.MODEL, model("m2"), {"model.pt": b"two"})
    store.put(f"models/m2/{MANIFEST}", b'{"version": "m2", "dim": ')
    with pytest.raises(IntegrityError, match="models/m2/manifest.json is not a readable model manifest"):
        reg.manifest(Kind.MODEL, "m2")
    with pytest.raises(ModerationError, match="names version m2, which has an unreadable manifest"):
        reg.current(Kind.MODEL)
    assert [r.version for r in reg.versions(Kind.MODEL)] == ["m1"]


class NoWholeIndexTransfer(PassThrough):
    """Refuses whole-object get/put of ``index.faiss``: it must be streamed through a file."""

    def get(self, key):
        assert not key.endswith("/index.faiss"), "the index file was read whole"
        return self.inner.get(key)

    def put(self, key, data, content_type="application/octet-stream"):
        assert not key.endswith("/index.faiss"), "the index file was written whole"
        self.inner.put(key, data, content_type)

    def put_file(self, key, path, content_type="application/octet-stream"):
        self.inner.put_file(key, path, content_type)

    def get_file(self, key, path):
        self.inner.get_file(key, path)


def test_a_file_artifact_is_streamed_and_checked(store, tmp_path):
    """publish() takes a local Path and load_file() brings it back, checked, without whole-object transfers."""
    reg = Registry(NoWholeIndexTransfer(store))
    m = model("20250101T000000-aaaaaaaa")
    reg.publish(Kind.MODEL, m, {"model.pt": b"weights"})
    src = tmp_path / "index.faiss"
    src.write_bytes(b"x" * (3 << 20))
    rec = IndexVersion(version="20250101T000003-dddddddd", model_version=m.version, stats_version="s1",
                       count=1, dim=64, factory="Flat", content_sha256="c")
    stored = reg.publish(Kind.INDEX, rec, {"index.faiss": src, "ids.json": b"[]"})
    assert stored.files["index.faiss"] == sha256_hex(src.read_bytes())
    out = reg.load_file(Kind.INDEX, stored, "index.faiss", tmp_path / "back.faiss")
    assert out.read_bytes() == src.read_bytes()
    # A damaged object fails its sha256 check, and the damaged copy is not left behind.
    store.put(reg.key_of(Kind.INDEX, stored, "index.faiss"), b"tampered")
    with pytest.raises(IntegrityError):
        reg.load_file(Kind.INDEX, stored, "index.faiss", tmp_path / "bad.faiss")
    assert not (tmp_path / "bad.faiss").exists()
