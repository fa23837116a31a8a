"""Batched embedding: vector cache, changed files, failures, the failure-rate limit, workers, ids."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from conftest import fast_env
from moderation.config import Settings
from moderation.errors import BatchFailedError
from moderation.images import decode_image, preprocess, sha256_hex
from moderation.embedding import (EmbeddingResult, FolderSource, StoreSource, VectorCache, check_failure_rate,
                                  dedupe_ids, embed)
from moderation.store import LocalStore


class Tiny(nn.Module):
    """A small deterministic descriptor (conv -> pooled -> L2), counting the images it sees."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.seen = 0

    def forward(self, x):
        self.seen += x.shape[0]
        return F.normalize(F.adaptive_avg_pool2d(F.relu(self.conv(x)), 2).flatten(1), dim=-1)


def picture(seed: int, size=(40, 32)) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def settings_for(tmp_path, **extra) -> Settings:
    env = {**fast_env(tmp_path / "home"), "MODERATION_IMAGE_SIZE": "32", "MODERATION_BATCH_SIZE": "4"}
    env.update({f"MODERATION_{k.upper()}": str(v) for k, v in extra.items()})
    return Settings.from_env(env)


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "images"
    d.mkdir()
    for i in range(6):
        (d / f"img{i}.png").write_bytes(picture(i))
    return d


def test_vectors_match_direct_computation(folder, tmp_path):
    s = settings_for(tmp_path)
    model = Tiny().eval()
    res = embed(model, FolderSource(folder), s)
    assert res.ids == [f"img{i}" for i in range(6)]
    assert res.vectors.shape == (6, 32) and res.vectors.dtype == np.float32
    assert res.failures == [] and res.cached == 0 and res.total == 6
    data = (folder / "img3.png").read_bytes()
    with torch.inference_mode():
        direct = model(preprocess(decode_image(data), 32, s.resize_mode)[None])[0].numpy()
    np.testing.assert_allclose(res.vectors[3], direct, rtol=1e-5, atol=1e-6)
    assert res.refs[3].sha256 == sha256_hex(data)


def test_cache_second_run_embeds_nothing_new(folder, tmp_path):
    s = settings_for(tmp_path)
    store = LocalStore(tmp_path / "store")
    model = Tiny().eval()
    first = embed(model, FolderSource(folder), s, cache=VectorCache(store, "mv1"))
    assert first.cached == 0 and model.seen == 6
    assert [k for k in store.list("embeddings/mv1/") if k.endswith(".npz")]
    model.seen = 0
    second = embed(model, FolderSource(folder), s, cache=VectorCache(store, "mv1"))  # reloaded from the store
    assert second.cached == 6
    assert model.seen == 0
    assert second.ids == first.ids
    assert [r.sha256 for r in second.refs] == [r.sha256 for r in first.refs]
    np.testing.assert_array_equal(second.vectors, first.vectors)
    # another model version shares nothing
    other = embed(model, FolderSource(folder), s, cache=VectorCache(store, "mv2"))
    assert other.cached == 0 and model.seen == 6


def test_changed_file_is_re_embedded(folder, tmp_path):
    s = settings_for(tmp_path)
    store = LocalStore(tmp_path / "store")
    model = Tiny().eval()
    first = embed(model, FolderSource(folder), s, cache=VectorCache(store, "mv1"))
    (folder / "img2.png").write_bytes(picture(99))
    model.seen = 0
    again = embed(model, FolderSource(folder), s, cache=VectorCache(store, "mv1"))
    assert again.cached == 5 and model.seen == 1
    assert again.refs[2].sha256 == sha256_hex(picture(99)) != first.refs[2].sha256
    assert not np.allclose(again.vectors[2], first.vectors[2])
    keep = [0, 1, 3, 4, 5]
    np.testing.assert_array_equal(again.vectors[keep], first.vectors[keep])
    fresh = embed(Tiny().eval(), FolderSource(folder), s)
    np.testing.assert_allclose(again.vectors, fresh.vectors, rtol=1e-5, atol=1e-6)


def test_same_content_twice_is_cached_once(folder, tmp_path):
    (folder / "copy_of_0.png").write_bytes((folder / "img0.png").read_bytes())
    store = LocalStore(tmp_path / "store")
    cache = VectorCache(store, "mv1")
    res = embed(Tiny().eval(), FolderSource(folder), settings_for(tmp_path), cache=cache)
    assert len(res.refs) == 7 and len(cache) == 6
    np.testing.assert_array_equal(res.vectors[res.ids.index("copy_of_0")], res.vectors[res.ids.index("img0")])


def _add_bad_files(folder):
    (folder / "bad_empty.png").write_bytes(b"")
    (folder / "bad_text.jpg").write_bytes(b"this is not an image at all")
    good = picture(5)
    (folder / "bad_truncated.png").write_bytes(good[: len(good) // 2])


def test_failures_are_recorded_and_the_batch_continues(folder, tmp_path):
    _add_bad_files(folder)
    store = LocalStore(tmp_path / "store")
    res = embed(Tiny().eval(), FolderSource(folder), settings_for(tmp_path), cache=VectorCache(store, "mv1"))
    assert res.ids == [f"img{i}" for i in range(6)]
    assert {f.image_id: f.reason for f in res.failures} == {
        "bad_empty": "empty", "bad_text": "not_an_image", "bad_truncated": "truncated"}
    assert all(f.location.endswith((".png", ".jpg")) for f in res.failures)
    assert res.total == 9
    # failures are not cached: the rerun reports them again and embeds no good image twice
    model = Tiny().eval()
    again = embed(model, FolderSource(folder), settings_for(tmp_path), cache=VectorCache(store, "mv1"))
    assert again.cached == 6 and model.seen == 0 and len(again.failures) == 3


def test_failure_rate_limit(folder, tmp_path):
    _add_bad_files(folder)
    res = embed(Tiny().eval(), FolderSource(folder), settings_for(tmp_path))
    check_failure_rate(res, 0.5)  # 3/9 = 33 %: fine
    check_failure_rate(res, 1 / 3)  # exactly at the limit: fine
    with pytest.raises(BatchFailedError) as info:
        check_failure_rate(res, 0.2, what="reference set")
    msg = str(info.value)
    assert "3 of 9 images in the reference set" in msg and "MODERATION_MAX_FAILURE_RATE" in msg
    assert "'truncated': 1" in msg and "'empty': 1" in msg
    with pytest.raises(BatchFailedError, match="has no images"):
        check_failure_rate(EmbeddingResult([], np.zeros((0, 32), np.float32)), 0.2)


def test_all_images_failing(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "a.jpg").write_bytes(b"x")
    (d / "b.png").write_bytes(b"")
    res = embed(Tiny().eval(), FolderSource(d), settings_for(tmp_path))
    assert res.refs == [] and res.vectors.shape[0] == 0 and len(res.failures) == 2
    with pytest.raises(BatchFailedError):
        check_failure_rate(res, 0.2)


def test_worker_processes_give_the_same_result(folder, tmp_path):
    _add_bad_files(folder)
    model = Tiny().eval()
    inline = embed(model, FolderSource(folder), settings_for(tmp_path))
    pooled = embed(model, FolderSource(folder), settings_for(tmp_path, workers=2))
    assert pooled.ids == inline.ids
    np.testing.assert_allclose(pooled.vectors, inline.vectors, rtol=1e-5, atol=1e-6)
    assert sorted((f.image_id, f.reason) for f in pooled.failures) == sorted(
        (f.image_id, f.reason) for f in inline.failures)


def test_duplicate_ids_keep_the_first(tmp_path):
    d = tmp_path / "dups"
    (d / "sub").mkdir(parents=True)
    (d / "a.jpg").write_bytes(picture(1))
    (d / "b.png").write_bytes(picture(2))
    (d / "sub" / "a.png").write_bytes(picture(3))
    res = embed(Tiny().eval(), FolderSource(d), settings_for(tmp_path))
    assert res.ids == ["a", "b", "a"]
    out = dedupe_ids(res)
    assert out.ids == ["a", "b"]
    assert [r.location for r in out.refs] == [str(d / "a.jpg"), str(d / "b.png")]
    np.testing.assert_array_equal(out.vectors, res.vectors[:2])
    assert [(f.image_id, f.reason, f.location) for f in out.failures] == [
        ("a", "duplicate_id", str(d / "sub" / "a.png"))]
    assert out.total == 3


def test_store_source_and_short_edge_shapes(tmp_path):
    s = settings_for(tmp_path, resize_mode="short_edge")
    store = LocalStore(s.home / "store")
    store.put("queries/day1/wide.png", picture(1, size=(60, 30)))
    store.put("queries/day1/tall.png", picture(2, size=(30, 60)))
    store.put("queries/day1/notes.txt", b"not an image key")
    store.put("queries/day2/other.png", picture(3))
    src = StoreSource(s, "queries/day1/")
    assert sorted(r.image_id for r in src.refs()) == ["tall", "wide"]
    res = embed(Tiny().eval(), src, s)
    assert sorted(res.ids) == ["tall", "wide"] and res.vectors.shape == (2, 32)
    np.testing.assert_allclose(np.linalg.norm(res.vectors, axis=1), 1.0, atol=1e-5)
    shard = StoreSource(s, "queries/", keys=("queries/day2/other.png",))
    assert [r.image_id for r in shard.refs()] == ["other"]
