"""The augmentation chain that makes two views of one image look like a copy and its source.

Every op is ``op(img, rng, ctx) -> img`` on an RGB PIL image, driven by a
``random.Random`` so a view is a pure function of (image, seed). A preset
is a crop range plus a list of (op, probability); ``Augmenter`` applies the
random-resized crop, then each op with its probability (in a shuffled
order for presets that ask for it, as real copies are edited in any
order), then the final square resize to the training crop size (square,
like the ``square`` inference resize).

Presets:

- ``light``: crop, flip, colour jitter. For tests and smoke runs.
- ``advanced``: the SSCD "advanced" chain: flip, rotations, random resized
  crop, colour jitter, grayscale, blur, JPEG, text overlay, emoji or image
  overlay, in SSCD's fixed order.
- ``wide``: ``advanced`` plus the other edits seen in copies: small-angle
  rotation, padding / aspect change, perspective, opacity, stripes,
  pixelisation, down-scaling, and pasting the image into another one; in
  a shuffled order.

Mixup and cutmix combine two images and are batch-level: see
``trainer.data.MultiViewCollate``.
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from trainer import overlays

OtherImage = Callable[[], Image.Image]


@dataclass
class Context:
    """What an op may need besides the image: a source of *other* images (for overlays)."""

    other: OtherImage | None = None


def _rand_colour(rng: random.Random) -> tuple[int, int, int]:
    return rng.randint(0, 255), rng.randint(0, 255), rng.randint(0, 255)


def random_resized_crop(img: Image.Image, rng: random.Random, scale: tuple[float, float],
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Image.Image:
    """A crop of ``scale`` of the area with aspect ratio in ``ratio`` (log-uniform); not resized."""
    w, h = img.size
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            x = rng.randint(0, w - cw)
            y = rng.randint(0, h - ch)
            return img.crop((x, y, x + cw, y + ch))
    return img


def hflip(img, rng, ctx):
    return ImageOps.mirror(img)


def vflip(img, rng, ctx):
    return ImageOps.flip(img)


def rotate90(img, rng, ctx):
    return img.transpose(rng.choice([Image.ROTATE_90, Image.ROTATE_180, Image.ROTATE_270]))


def rotate_small(img, rng, ctx):
    """3-25 degrees either way, canvas expanded, corners filled black, white or a colour."""
    angle = rng.uniform(3, 25) * rng.choice([-1, 1])
    fill = rng.choice([(0, 0, 0), (255, 255, 255), _rand_colour(rng)])
    return img.rotate(angle, resample=Image.BILINEAR, expand=True, fillcolor=fill)


def colour_jitter(img, rng, ctx, strength: float = 0.4, hue: float = 0.1):
    ops = [lambda im: ImageEnhance.Brightness(im).enhance(rng.uniform(1 - strength, 1 + strength)),
           lambda im: ImageEnhance.Contrast(im).enhance(rng.uniform(1 - strength, 1 + strength)),
           lambda im: ImageEnhance.Color(im).enhance(rng.uniform(1 - strength, 1 + strength)),
           lambda im: _hue_shift(im, rng.uniform(-hue, hue))]
    rng.shuffle(ops)
    for op in ops:
        img = op(img)
    return img


def _hue_shift(img: Image.Image, shift: float) -> Image.Image:
    if abs(shift) < 1e-3:
        return img
    h, s, v = img.convert("HSV").split()
    delta = int(round(shift * 255))
    h = h.point(lambda x: (x + delta) % 256)
    return Image.merge("HSV", (h, s, v)).convert("RGB")


def grayscale(img, rng, ctx):
    return ImageOps.grayscale(img).convert("RGB")


def blur(img, rng, ctx):
    return img.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 3.0) * max(img.size) / 384))


def jpeg(img, rng, ctx):
    """Re-encode as JPEG at quality 10-60, as copies spread on the web are."""
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=rng.randint(10, 60))
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def text(img, rng, ctx):
    return overlays.overlay_text(img, rng)


def emoji(img, rng, ctx):
    return overlays.overlay_emoji(img, rng)


def stripes(img, rng, ctx):
    return overlays.overlay_stripes(img, rng)


def emoji_or_image(img, rng, ctx):
    """SSCD's "emoji or image overlay": one of the two, evenly."""
    return emoji(img, rng, ctx) if rng.random() < 0.5 or ctx.other is None else image_overlay(img, rng, ctx)


def image_overlay(img, rng, ctx):
    """Another image laid over 10-40 % of this one's width (this image stays the content)."""
    if ctx.other is None:
        return img
    w, h = img.size
    other = ctx.other()
    scale = rng.uniform(0.1, 0.4)
    ow = max(4, int(w * scale))
    oh = max(4, int(ow * other.height / max(other.width, 1)))
    oh = min(oh, h)
    other = other.resize((ow, oh), Image.BILINEAR)
    out = img.copy()
    x, y = rng.randint(0, max(0, w - ow)), rng.randint(0, max(0, h - oh))
    opacity = rng.uniform(0.6, 1.0)
    mask = Image.new("L", other.size, int(255 * opacity))
    out.paste(other, (x, y), mask)
    return out


def paste_into_other(img, rng, ctx):
    """This image shrunk to 30-70 % of another image's size and pasted into it.

    The result's copied content is ``img``; the other image is filler, so
    positives stay defined by ``img`` alone.
    """
    if ctx.other is None:
        return img
    canvas = ctx.other().copy()
    cw, ch = canvas.size
    frac = rng.uniform(0.3, 0.7)
    scale = min(cw * frac / img.width, ch * frac / img.height)
    pw, ph = max(4, int(img.width * scale)), max(4, int(img.height * scale))
    piece = img.resize((pw, ph), Image.BILINEAR)
    canvas.paste(piece, (rng.randint(0, cw - pw), rng.randint(0, ch - ph)))
    return canvas


def pad(img, rng, ctx):
    """A coloured border (5-30 % per side) or an aspect-ratio change by padding one axis."""
    w, h = img.size
    colour = _rand_colour(rng)
    if rng.random() < 0.5:
        fw, fh = rng.uniform(0.05, 0.3), rng.uniform(0.05, 0.3)
        return ImageOps.expand(img, (int(w * fw), int(h * fh)), fill=colour)
    if rng.random() < 0.5:
        nw, nh = int(w * rng.uniform(1.1, 1.8)), h
    else:
        nw, nh = w, int(h * rng.uniform(1.1, 1.8))
    canvas = Image.new("RGB", (nw, nh), colour)
    canvas.paste(img, ((nw - w) // 2, (nh - h) // 2))
    return canvas


def perspective(img, rng, ctx):
    """Move each corner inwards by up to 20 % of the side (keystone / tilt)."""
    w, h = img.size
    d = 0.2

    def jitter(x, y):
        return (x + rng.uniform(0, d) * w * (1 if x == 0 else -1),
                y + rng.uniform(0, d) * h * (1 if y == 0 else -1))

    src = [jitter(0, 0), jitter(w, 0), jitter(w, h), jitter(0, h)]
    coeffs = _perspective_coeffs([(0, 0), (w, 0), (w, h), (0, h)], src)
    fill = rng.choice([(0, 0, 0), (255, 255, 255), _rand_colour(rng)])
    return img.transform((w, h), Image.PERSPECTIVE, coeffs, Image.BILINEAR, fillcolor=fill)


def _perspective_coeffs(dst, src):
    """Coefficients mapping output corners ``dst`` to input corners ``src`` (PIL's convention)."""
    import numpy as np

    rows, rhs = [], []
    for (x, y), (u, v) in zip(dst, src, strict=True):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs += [u, v]
    return np.linalg.solve(np.array(rows, float), np.array(rhs, float)).tolist()


def opacity(img, rng, ctx):
    """Blend with a flat colour, keeping 30-80 % of the image."""
    return Image.blend(Image.new("RGB", img.size, _rand_colour(rng)), img, rng.uniform(0.3, 0.8))


def pixelate(img, rng, ctx):
    w, h = img.size
    r = rng.uniform(0.1, 0.5)
    small = img.resize((max(1, int(w * r)), max(1, int(h * r))), Image.BILINEAR)
    return small.resize((w, h), Image.NEAREST)


def downscale(img, rng, ctx):
    """Shrink to 30-80 %: the final resize then brings back a softer image."""
    w, h = img.size
    r = rng.uniform(0.3, 0.8)
    return img.resize((max(1, int(w * r)), max(1, int(h * r))), Image.BILINEAR)


Op = Callable[[Image.Image, random.Random, Context], Image.Image]


@dataclass(frozen=True)
class Preset:
    """A crop area range, (op, probability) pairs, and whether the order is shuffled."""

    crop_scale: tuple[float, float]
    ops: tuple[tuple[Op, float], ...]
    shuffle: bool = False


PRESETS: dict[str, Preset] = {
    "light": Preset((0.4, 1.0), ((hflip, 0.5), (colour_jitter, 0.8))),
    "advanced": Preset((0.08, 1.0), (
        (hflip, 0.5), (rotate90, 0.25), (colour_jitter, 0.8), (grayscale, 0.2), (blur, 0.3),
        (jpeg, 0.3), (text, 0.2), (emoji_or_image, 0.2),
    )),
    "wide": Preset((0.25, 1.0), (
        (hflip, 0.5), (vflip, 0.05), (rotate90, 0.1), (rotate_small, 0.2), (pad, 0.15),
        (perspective, 0.12), (colour_jitter, 0.7), (grayscale, 0.2), (opacity, 0.12),
        (text, 0.2), (emoji, 0.25), (stripes, 0.12), (image_overlay, 0.1), (paste_into_other, 0.15),
        (blur, 0.2), (pixelate, 0.1), (downscale, 0.15), (jpeg, 0.3),
    ), shuffle=True),
}


class Augmenter:
    """Make one training view: crop, random edits, square resize to ``size``.

    Deterministic for a given ``rng`` state and image. Picklable (workers
    get a copy).
    """

    def __init__(self, preset: str = "wide", size: int = 224):
        if preset not in PRESETS:
            raise ValueError(f"unknown augmentation preset {preset!r}; one of {sorted(PRESETS)}")
        self.preset_name = preset
        self.preset = PRESETS[preset]
        self.size = size

    def __call__(self, img: Image.Image, rng: random.Random, ctx: Context | None = None) -> Image.Image:
        ctx = ctx or Context()
        img = random_resized_crop(img, rng, self.preset.crop_scale)
        chosen = [op for op, p in self.preset.ops if rng.random() < p]
        if self.preset.shuffle:
            rng.shuffle(chosen)
        for op in chosen:
            img = op(img, rng, ctx)
        return img.resize((self.size, self.size), Image.BILINEAR)
