"""Augmentations, generated images and overlays: shapes, determinism, no network."""

import random

import numpy as np
import pytest
from PIL import Image

from trainer import augment
from trainer.augment import PRESETS, Augmenter, Context
from trainer.overlays import draw_glyph, overlay_emoji, overlay_stripes, overlay_text
from trainer.synthetic import synthetic_image

OPS = [augment.hflip, augment.vflip, augment.rotate90, augment.rotate_small, augment.colour_jitter,
       augment.grayscale, augment.blur, augment.jpeg, augment.text, augment.emoji, augment.stripes,
       augment.emoji_or_image, augment.image_overlay, augment.paste_into_other, augment.pad,
       augment.perspective, augment.opacity, augment.pixelate, augment.downscale]


def _img(w=96, h=72, seed=0):
    return synthetic_image(seed, max_side=max(w, h)).resize((w, h))


@pytest.mark.parametrize("op", OPS, ids=lambda f: f.__name__)
def test_every_op_returns_an_rgb_image(op):
    ctx = Context(other=lambda: _img(50, 40, seed=9))
    out = op(_img(), random.Random(1), ctx)
    assert out.mode == "RGB" and out.width > 0 and out.height > 0


def test_ops_change_the_image():
    img = _img()
    for op in (augment.text, augment.emoji, augment.stripes, augment.opacity, augment.jpeg):
        out = op(img, random.Random(2), Context())
        assert out.size == img.size
        assert np.abs(np.asarray(out, int) - np.asarray(img, int)).sum() > 0, op.__name__


def test_paste_into_other_keeps_content_smaller_inside_other_image():
    img = Image.new("RGB", (80, 80), (255, 0, 0))
    other = Image.new("RGB", (200, 100), (0, 0, 255))
    out = augment.paste_into_other(img, random.Random(3), Context(other=lambda: other))
    arr = np.asarray(out)
    assert out.size == (200, 100)
    red = (arr[..., 0] == 255) & (arr[..., 2] == 0)
    frac = red.sum() / (arr.shape[0] * arr.shape[1])
    assert 0.02 < frac < 0.6


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_augmenter_is_deterministic_and_sized(preset):
    aug = Augmenter(preset, size=48)
    img = _img()
    ctx = Context(other=lambda: _img(seed=5))
    a = aug(img, random.Random(42), ctx)
    b = aug(img, random.Random(42), ctx)
    assert a.size == (48, 48)
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_unknown_preset_is_refused():
    with pytest.raises(ValueError):
        Augmenter("nope")


def test_advanced_preset_has_the_sscd_chain():
    names = {op.__name__ for op, _ in PRESETS["advanced"].ops}
    assert {"hflip", "rotate90", "colour_jitter", "grayscale", "blur", "jpeg", "text",
            "emoji_or_image"} <= names


def test_synthetic_images_are_deterministic_and_distinct():
    a, b, c = synthetic_image(3), synthetic_image(3), synthetic_image(4)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert a.size != c.size or not np.array_equal(np.asarray(a), np.asarray(c))
    assert max(synthetic_image(7, max_side=64).size) <= 64


def test_overlays_and_glyphs():
    img = _img()
    for fn in (overlay_text, overlay_emoji, overlay_stripes):
        out = fn(img, random.Random(0))
        assert out.size == img.size and out.mode == "RGB"
    for seed in range(8):
        g = draw_glyph(40, random.Random(seed))
        assert g.mode == "RGBA" and g.size == (40, 40)
        assert np.asarray(g)[..., 3].max() == 255
