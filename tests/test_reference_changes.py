"""Change detection from listings: fingerprints of folders and stores, the manifest, the comparison."""

from __future__ import annotations

import os
import time

import pytest

from conftest import fast_env, s3_env
from moderation.embedding import FolderSource, StoreSource
from moderation.errors import ModerationError
from moderation.images import ImageRef
from moderation.reference_changes import detect_changes, manifest_bytes, read_manifest

SHA_A, SHA_B, SHA_C = "a" * 64, "b" * 64, "c" * 64


def _rewrite(path, data: bytes) -> None:
    before = os.lstat(path).st_mtime_ns
    path.write_bytes(data)
    if os.lstat(path).st_mtime_ns == before:  # a coarse clock: make the new write visible
        os.utime(path, ns=(before + 1_000_000, before + 1_000_000))


def test_folder_fingerprints_follow_the_bytes(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"one")
    (tmp_path / "b.jpg").write_bytes(b"two")
    os.symlink(tmp_path / "a.jpg", tmp_path / "link.jpg")
    first = {r.image_id: r for r in FolderSource(tmp_path).listed()}
    assert first["a"].fingerprint and first["b"].fingerprint
    assert first["link"].fingerprint == ""  # never "unchanged": read, and refused as a link
    time.sleep(0.01)
    _rewrite(tmp_path / "a.jpg", b"ONE")  # same size, new bytes
    second = {r.image_id: r for r in FolderSource(tmp_path).listed()}
    assert second["a"].fingerprint != first["a"].fingerprint
    assert second["b"].fingerprint == first["b"].fingerprint


def test_store_listing_carries_etags(tmp_path, s3_server, s3_bucket):
    from moderation.config import Settings
    from moderation.store import open_store

    for env in ({**fast_env(tmp_path / "local")},
                {**fast_env(tmp_path / "s3"), **s3_env(s3_server, s3_bucket)}):
        settings = Settings.from_env(env)
        store = open_store(settings)
        store.put("references/x.jpg", b"first")
        store.put("references/notes.txt", b"not an image")
        before = StoreSource(settings, "references/").listed()
        assert [r.location for r in before] == ["references/x.jpg"] and before[0].fingerprint
        time.sleep(0.01)
        store.put("references/x.jpg", b"again")  # same size
        after = StoreSource(settings, "references/").listed()
        assert after[0].fingerprint != before[0].fingerprint, store.url
        shard = StoreSource(settings, "references/", keys=("references/x.jpg",)).listed()
        assert shard == after


def test_detect_changes_sorts_new_changed_unchanged_deleted():
    previous = read_manifest(manifest_bytes([ImageRef("a", "r/a.jpg", SHA_A, "5:e1"),
                                             ImageRef("b", "r/b.jpg", SHA_B, "5:e2"),
                                             ImageRef("gone", "r/gone.jpg", SHA_C, "5:e3"),
                                             ImageRef("moved", "r/old/moved.jpg", SHA_C, "5:e4")]))
    listed = [ImageRef("a", "r/a.jpg", fingerprint="5:e1"), ImageRef("b", "r/b.jpg", fingerprint="6:e9"),
              ImageRef("moved", "r/new/moved.jpg", fingerprint="5:e4"),
              ImageRef("new", "r/new.jpg", fingerprint="7:e5"), ImageRef("a", "r/x/a.jpg", fingerprint="1:e")]
    changes = detect_changes(listed, previous)
    assert [(r.image_id, r.sha256) for r in changes.unchanged] == [("a", SHA_A)]
    assert [r.image_id for r in changes.to_read] == ["b", "moved", "new"]
    assert changes.replaced == ["b", "moved"] and changes.deleted == ["gone"]
    assert [(f.image_id, f.reason) for f in changes.duplicates] == [("a", "duplicate_id")]
    assert changes.summary() == {"unchanged": 1, "new": 1, "changed": 2, "deleted": 1, "to_read": 3, "still_failed": 0}
    # Without a previous manifest everything is read; an unknown fingerprint is never "unchanged".
    assert len(detect_changes(listed[:4], None).to_read) == 4
    indexed = read_manifest(manifest_bytes([ImageRef("a", "r/a.jpg", SHA_A)]))
    blind = detect_changes([ImageRef("a", "r/a.jpg")], indexed)
    assert [r.image_id for r in blind.to_read] == ["a"]


def test_hints_count_only_for_the_same_fingerprint():
    listed = [ImageRef("n", "r/n.jpg", fingerprint="3:e1"), ImageRef("m", "r/m.jpg", fingerprint="3:e2")]
    hints = {"r/n.jpg": ("3:e1", SHA_A), "r/m.jpg": ("3:OLD", SHA_B)}
    changes = detect_changes(listed, None, hints)
    assert {r.image_id: r.sha256 for r in changes.added} == {"n": SHA_A, "m": ""}
    assert [r.image_id for r in changes.to_read] == ["m"]


def test_unreadable_manifest_says_to_rebuild_in_full():
    for bad in (b"not json", b'{"format": 99, "references": []}', b'{"format": 1}'):
        with pytest.raises(ModerationError, match="--full"):
            read_manifest(bad)


def test_failed_references_are_still_failed_while_their_fingerprint_is_unchanged():
    from moderation.reference_changes import FailedReference

    bad = FailedReference("bad", "r/bad.jpg", "9:e7", "truncated", "image file is truncated")
    data = manifest_bytes([ImageRef("a", "r/a.jpg", SHA_A, "5:e1")], [bad])
    manifest = read_manifest(data)
    assert manifest.failed == {"bad": bad} and list(manifest.references) == ["a"]
    listed = [ImageRef("a", "r/a.jpg", fingerprint="5:e1"), ImageRef("bad", "r/bad.jpg", fingerprint="9:e7")]
    changes = detect_changes(listed, manifest)
    assert changes.still_failed == [bad] and changes.to_read == [] and changes.replaced == []
    assert changes.summary()["still_failed"] == 1
    # Replaced (a new fingerprint): read again; deleted: simply gone.
    replaced = detect_changes([listed[0], ImageRef("bad", "r/bad.jpg", fingerprint="11:e8")], manifest)
    assert [r.image_id for r in replaced.to_read] == ["bad"] and not replaced.still_failed
    assert detect_changes(listed[:1], manifest).deleted == []
    # A shard read it since (a hint for the same fingerprint): it decoded, so it is added.
    hinted = detect_changes(listed, manifest, {"r/bad.jpg": ("9:e7", SHA_B)})
    assert [(r.image_id, r.sha256) for r in hinted.added] == [("bad", SHA_B)]


def test_a_manifest_without_failed_references_still_loads():
    old = b'{"format":1,"references":[["a","r/a.jpg","5:e1","' + SHA_A.encode() + b'"]]}'
    manifest = read_manifest(old)
    assert manifest.failed == {} and manifest.references["a"].sha256 == SHA_A
    assert manifest_bytes([ImageRef("a", "r/a.jpg", SHA_A, "5:e1")]) == old  # no failure: the bytes as before
