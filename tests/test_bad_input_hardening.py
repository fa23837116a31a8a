"""Hostile folder entries and files (hardening issue, items 1-6): refused with a reason, never followed."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from fault_ledger import record
from moderation.embedding import FolderSource, embed
from moderation.errors import BadImageError
from moderation.images import decode_image, list_image_files, read_image_file


def png(size=(40, 30), colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def hostile(tmp_path):
    root, outside = tmp_path / "queries", tmp_path / "elsewhere"
    root.mkdir()
    outside.mkdir()
    (outside / "private.png").write_bytes(png(colour=(1, 2, 3)))
    (root / "good.png").write_bytes(png())
    os.symlink(outside / "private.png", root / "link.png")
    os.symlink("/etc/shadow", root / "shadow.jpg")
    os.symlink(root / "missing.png", root / "dangling.png")
    os.symlink(root / "loop.png", root / "loop.png")
    os.mkfifo(root / "pipe.jpg")
    os.symlink(outside, root / "linked-folder")
    return root


def test_links_fifos_and_linked_folders_are_refused_with_reasons(hostile, fast_settings):
    import torch

    result = embed(lambda x: torch.zeros(x.shape[0], 4), FolderSource(hostile), fast_settings)
    reasons = {f.image_id: f.reason for f in result.failures}
    hostile_ids = {"link", "shadow", "dangling", "loop", "pipe"}
    record("hostile input", "links out of the folder (/etc/shadow, a photo), dangling, loop, FIFO, linked folder",
           tried=len(hostile_ids) + 1, survived=len(hostile_ids & set(reasons)) + ("private" not in result.ids),
           lost=int("good" not in result.ids))
    assert result.ids == ["good"]
    assert reasons == {"link": "symlink", "shadow": "symlink", "dangling": "symlink", "loop": "symlink",
                       "pipe": "not_a_file"}
    assert "private" not in reasons  # the linked folder is not descended
    assert list_image_files(hostile) == [hostile / "good.png"]


def test_reading_refuses_links_and_leaving_the_root(hostile, tmp_path):
    with pytest.raises(BadImageError) as exc:
        FolderSource(hostile).read(str(hostile / "link.png"))
    assert exc.value.reason == "symlink"
    with pytest.raises(BadImageError) as exc:
        read_image_file(hostile, tmp_path / "elsewhere" / "private.png")
    assert exc.value.reason == "outside_root"
    assert read_image_file(hostile, hostile / "good.png") == (hostile / "good.png").read_bytes()


def test_a_huge_file_is_refused_from_its_size_before_it_is_read(tmp_path):
    big = tmp_path / "big.jpg"
    with open(big, "wb") as fh:
        fh.truncate(3 * 1024 ** 3)  # 3 GiB, sparse: costs no disk, would cost memory if read
    with pytest.raises(BadImageError) as exc:
        FolderSource(tmp_path, max_bytes=50_000_000).read(str(big))
    assert exc.value.reason == "too_large_file" and "50000000" in exc.value.detail


def test_a_thin_image_within_the_pixel_limit_is_refused_before_decoding():
    buf = io.BytesIO()
    Image.new("L", (3_000_000, 1), 0).save(buf, format="PNG")
    with pytest.raises(BadImageError) as exc:
        decode_image(buf.getvalue(), max_pixels=64_000_000)
    assert exc.value.reason == "extreme_shape"
    assert decode_image(png((600, 40))).size == (600, 40)  # a banner is fine


def test_postscript_never_reaches_ghostscript():
    eps = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 20 20\n"
           b"newpath 0 0 moveto 20 20 lineto stroke showpage\n%%EOF\n")
    with pytest.raises(BadImageError) as exc:
        decode_image(eps)
    assert exc.value.reason == "not_an_image" and "JPEG" in exc.value.detail


def test_our_pixel_limit_replaces_pillows(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow's own limit, far below ours
    assert decode_image(png((100, 100)), max_pixels=64_000_000).size == (100, 100)
    with pytest.raises(BadImageError) as exc:
        decode_image(png((100, 100)), max_pixels=5000)
    assert exc.value.reason == "decompression_bomb" and "5000" in exc.value.detail
    assert np.asarray(decode_image(png((30, 20)))).shape == (20, 30, 3)


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_an_object_larger_than_the_limit_is_refused_from_its_size(backend, tmp_path, request):
    from conftest import fast_env, s3_env
    from moderation.config import Settings
    from moderation.embedding import StoreSource
    from moderation.store import open_store

    env = fast_env(tmp_path / "home")
    if backend == "s3":
        env.update(s3_env(request.getfixturevalue("s3_server"), request.getfixturevalue("s3_bucket")))
    settings = Settings.from_env({**env, "MODERATION_MAX_FILE_BYTES": "1000"})
    store = open_store(settings)
    store.put("queries/big.png", png((300, 300)) + b"\0" * 2000)
    store.put("queries/small.png", png((10, 10)))
    assert store.size("queries/small.png") == len(png((10, 10)))
    source = StoreSource(settings, "queries/")
    assert source.read("queries/small.png") == png((10, 10))
    with pytest.raises(BadImageError) as exc:
        source.read("queries/big.png")
    assert exc.value.reason == "too_large_file" and "1000" in exc.value.detail


def test_hostile_files_in_one_batch_are_recorded_and_the_batch_goes_on(tmp_path, fast_settings):
    """Every kind of hostile file side by side with good ones: each refused with its reason, none read whole."""
    import torch
    from dataclasses import replace

    root = tmp_path / "batch"
    root.mkdir()
    for i in range(3):
        (root / f"good{i}.png").write_bytes(png(colour=(60 * i, 90, 30)))
    with open(root / "huge.jpg", "wb") as fh:
        fh.truncate(3 * 1024 ** 3)  # sparse 3 GiB
    thin = io.BytesIO()
    Image.new("L", (3_000_000, 1), 0).save(thin, format="PNG")
    (root / "thin.png").write_bytes(thin.getvalue())
    bomb = io.BytesIO()
    Image.new("L", (6000, 6000), 0).save(bomb, format="PNG")  # ~36 KB that decodes to 36 MP
    (root / "bomb.png").write_bytes(bomb.getvalue())
    (root / "script.eps").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 9 9\nshowpage\n")
    (root / "truncated.jpg").write_bytes(png()[:40])
    expected = {"huge": "too_large_file", "thin": "extreme_shape", "bomb": "decompression_bomb",
                "truncated": "not_an_image"}
    settings = replace(fast_settings, max_image_pixels=10_000_000, max_file_bytes=50_000_000)
    result = embed(lambda x: torch.zeros(x.shape[0], 4), FolderSource(root, max_bytes=settings.max_file_bytes),
                   settings)
    reasons = {f.image_id: f.reason for f in result.failures}
    good = {f"good{i}" for i in range(3)}
    record("hostile input", "3 GiB file, 1×3,000,000 PNG, 36 MP PNG bomb, truncated file, beside good images",
           tried=len(expected), survived=sum(reasons.get(k) == v for k, v in expected.items()),
           lost=len(good - set(result.ids)))
    assert set(result.ids) == good
    assert {k: reasons.get(k) for k in expected} == expected
