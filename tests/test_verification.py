"""The verifier on generated images: real copies verify, shared logos and unrelated images do not."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import ImageOps

from local_images import as_jpeg, flat, paste, textured
from moderation.local_features import Detector, FeatureCache, FeatureConfig, LocalFeatures, extract, root_sift
from moderation.verification import (GeometryModel, QueryTask, VerifyConfig, verify_many, verify_one,
                                     verify_pair)

SIFT = FeatureConfig()


def check(query, reference, config: FeatureConfig = SIFT, verifier: VerifyConfig = VerifyConfig()):
    return verify_pair(extract(query, config), extract(reference, config),
                       mirrored_query=extract(query, config, mirror=True), features=config, config=verifier)


def test_a_crop_verifies_and_covers_what_it_shows():
    ref = textured(1)
    crop = ref.crop((60, 40, 330, 250)).resize((400, 311))  # about half of the reference, enlarged
    v = check(as_jpeg(crop, 60), ref)
    assert v.verified and v.inliers >= 30
    assert 0.3 < v.reference_coverage < 0.75  # the crop's share of the reference
    assert v.query_coverage > 0.6


def test_a_rotation_verifies():
    ref = textured(2)
    rotated = ref.rotate(17, expand=True, fillcolor=(255, 255, 255))
    v = check(rotated, ref)
    assert v.verified and v.inliers >= 20 and v.reference_coverage > 0.5


def test_a_small_paste_into_another_picture_verifies_with_the_outline_inside_the_query():
    ref, host = textured(3), textured(103, size=(512, 400))
    query = as_jpeg(paste(ref, host, 0.4, (250, 180)))
    v = check(query, ref)
    assert v.verified and v.reference_coverage > 0.5
    assert v.query_coverage < 0.3  # the copy fills only a small part of the query
    h = np.array(v.homography).reshape(3, 3)
    corner = h @ np.array([0.0, 0.0, 1.0])
    scale = 512 / max(query.size)  # detection-image pixels
    assert corner[0] / corner[2] == pytest.approx(250 * scale, abs=6)
    assert corner[1] / corner[2] == pytest.approx(180 * scale, abs=6)


def test_a_mirrored_copy_verifies_through_the_mirrored_features():
    ref = textured(4)
    mirrored = ImageOps.mirror(ref)
    assert check(mirrored, ref).mirrored is True and check(mirrored, ref).verified
    no_mirror = check(mirrored, ref, verifier=VerifyConfig(try_mirror=False))
    assert not no_mirror.verified


def test_a_shared_logo_alone_does_not_verify():
    logo = textured(99, size=(70, 70), shapes=25)
    a = paste(logo, textured(5), 1.0, (10, 10))
    b = paste(logo, textured(6), 1.0, (300, 200))
    v = check(a, b)
    assert v.inliers >= 4  # the logo itself does match ...
    assert v.reference_coverage < 0.1 and not v.verified  # ... but covers little of the picture


def test_unrelated_images_do_not_verify():
    for seed in range(3):
        v = check(textured(10 + seed), textured(50 + seed))
        assert not v.verified and v.reference_coverage < 0.1


def test_an_image_without_features_is_no_error():
    empty = extract(flat(), SIFT)
    assert len(empty) == 0
    v = verify_pair(empty, extract(textured(7), SIFT), mirrored_query=empty)
    assert v.inliers == 0 and not v.verified
    assert len(extract(flat(size=(3, 3)), SIFT)) == 0


@pytest.mark.parametrize("detector", [Detector.ORB, Detector.AKAZE])
def test_cheaper_detectors_verify_a_crop_too(detector):
    cfg = FeatureConfig(detector=detector, max_features=1500)
    ref = textured(8)
    crop = ref.crop((40, 30, 340, 260))
    assert check(crop, ref, cfg).verified
    assert not check(textured(9), ref, cfg).verified


def test_partial_affine_model_verifies_a_scaled_crop():
    ref = textured(11)
    crop = ref.crop((50, 50, 330, 260)).resize((200, 150))
    assert check(crop, ref, verifier=VerifyConfig(geometry=GeometryModel.AFFINE)).verified


def test_features_roundtrip_and_refuse_garbage():
    f = extract(textured(12), SIFT)
    g = LocalFeatures.from_bytes(f.to_bytes())
    assert np.array_equal(f.points, g.points) and np.array_equal(f.descriptors, g.descriptors)
    assert (g.width, g.height) == (f.width, f.height) and f.descriptors.dtype == np.uint8
    with pytest.raises(ValueError):
        LocalFeatures.from_bytes(b"not an npz")
    rs = root_sift(f.descriptors)
    assert np.allclose((rs ** 2).sum(axis=1), 1.0, atol=1e-4)


def test_features_are_taken_at_a_bounded_size():
    big = textured(13, size=(1600, 1200), shapes=300)
    f = extract(big, FeatureConfig(max_side=512))
    assert max(f.width, f.height) == 512 and len(f) <= 1000
    small = textured(14, size=(200, 150))
    assert (extract(small, SIFT).width, extract(small, SIFT).height) == (200, 150)  # never enlarged


def test_feature_cache_by_config_and_sha(tmp_path):
    from moderation.store import LocalStore

    store = LocalStore(tmp_path / "store")
    cache = FeatureCache(store, SIFT)
    f = extract(textured(15), SIFT)
    cache.put("ab" * 32, f)
    assert cache.known() == {"ab" * 32}
    assert len(cache.get("ab" * 32)) == len(f)
    assert cache.get("cd" * 32) is None
    assert FeatureCache(store, FeatureConfig(max_features=500)).known() == set()  # another config
    store.put(cache.key("ef" * 32), b"corrupt")
    assert cache.get("ef" * 32) is None  # unreadable: recomputed by the caller, not an error


def test_verify_many_in_worker_processes_matches_in_process():
    ref, other = textured(16), textured(17)
    q1 = ref.crop((30, 30, 300, 250))
    tasks = [QueryTask("q1", extract(q1, SIFT), extract(q1, SIFT, mirror=True),
                       (("r", extract(ref, SIFT)), ("o", extract(other, SIFT)), ("missing", None))),
             QueryTask("q2", extract(other, SIFT), None, (("r", extract(ref, SIFT)),))]
    inline = verify_many(tasks, SIFT, VerifyConfig(), workers=0)
    pooled = verify_many(tasks, SIFT, VerifyConfig(), workers=2)
    assert inline.keys() == pooled.keys() == {("q1", "r"), ("q1", "o"), ("q1", "missing"), ("q2", "r")}
    assert inline[("q1", "r")].verified and not inline[("q1", "o")].verified
    assert inline[("q1", "missing")].inliers == 0
    assert pooled[("q1", "r")].verified == inline[("q1", "r")].verified


def test_one_orientation_alone():
    ref = textured(18)
    v = verify_one(extract(ref, SIFT), extract(ref, SIFT), False, VerifyConfig())
    assert v.verified and v.inlier_ratio > 0.8 and not v.mirrored


def test_feature_cache_finds_missing_shas_one_by_one_or_by_listing(tmp_path):
    from moderation.store import LocalStore

    cache = FeatureCache(LocalStore(tmp_path / "store"), SIFT)
    f = extract(textured(19, size=(120, 90), shapes=20), SIFT)
    have = [f"{i:02x}" * 32 for i in range(3)]
    for sha in have:
        cache.put(sha, f)
    wanted = have + ["ee" * 32, "ff" * 32]
    assert cache.missing(wanted) == ["ee" * 32, "ff" * 32]
    assert cache.missing(wanted, list_above=1) == ["ee" * 32, "ff" * 32]
