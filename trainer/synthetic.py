"""Procedurally generated training images.

The trainer needs many distinct images; a small background folder alone
gives few negatives and overfits. These images are drawn from a seed:
a backdrop (gradient, multi-octave noise "clouds", or a flat colour) with
random shapes, lines and words on it. They look like clip-art and
textured scenes, not photographs, and cost ~2 ms each, so DataLoader
workers make them on the fly and no file is stored. ``synthetic_image(i,
seed)`` always returns the same image for the same arguments.
"""

from __future__ import annotations

import random

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from trainer.overlays import font, random_words

_SIZES = ((384, 384), (384, 288), (288, 384), (384, 256), (256, 384), (320, 320))


def synthetic_image(index: int, seed: int = 0, max_side: int = 384) -> Image.Image:
    """The ``index``-th generated RGB image of the family ``seed`` (deterministic).

    Its long side is at most ``max_side`` (drawing smaller is cheaper).
    """
    rng = random.Random((seed * 1_000_003 + index) * 2654435761 % (2**63))
    nrng = np.random.default_rng(rng.getrandbits(63))
    w, h = rng.choice(_SIZES)
    if max(w, h) > max_side:
        w, h = max(16, w * max_side // max(w, h)), max(16, h * max_side // max(w, h))
    img = _backdrop(w, h, rng, nrng)
    draw = ImageDraw.Draw(img, "RGBA")
    for _ in range(rng.randint(2, 14)):
        _shape(draw, w, h, rng)
    if rng.random() < 0.3:
        words = random_words(rng, rng.randint(1, 3))
        size = rng.randint(max(10, h // 16), max(12, h // 5))
        draw.text((rng.randint(0, w // 2), rng.randint(0, h - size)), words, font=font(size),
                  fill=_colour(rng, alpha=rng.randint(160, 255)))
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 2.0)))
    return img


def _colour(rng: random.Random, alpha: int | None = None) -> tuple[int, ...]:
    c = (rng.randint(0, 255), rng.randint(0, 255), rng.randint(0, 255))
    return c if alpha is None else c + (alpha,)


def _backdrop(w: int, h: int, rng: random.Random, nrng: np.random.Generator) -> Image.Image:
    kind = rng.random()
    if kind < 0.35:  # linear gradient between two colours at a random angle
        a, b = np.array(_colour(rng), np.float32), np.array(_colour(rng), np.float32)
        theta = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        t = (np.cos(theta) * xx / w + np.sin(theta) * yy / h)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        arr = a * (1 - t[..., None]) + b * t[..., None]
    elif kind < 0.8:  # multi-octave value noise: textured, photo-like frequency content
        arr = np.zeros((h, w, 3), np.float32)
        amp = 1.0
        for octave in range(rng.randint(2, 5)):
            cells = 2 ** (octave + 1)
            small = nrng.random((cells + 1, cells + 1, 3)).astype(np.float32) * 255
            layer = np.asarray(Image.fromarray(small.astype(np.uint8)).resize((w, h), Image.BICUBIC),
                               np.float32)
            arr += amp * layer
            amp *= rng.uniform(0.35, 0.65)
        arr = arr - arr.min()
        arr = arr / max(float(arr.max()), 1e-6) * 255
        tint = np.array(_colour(rng), np.float32) / 255
        arr = arr * (0.4 + 0.6 * tint)
    else:
        arr = np.broadcast_to(np.array(_colour(rng), np.float32), (h, w, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def _shape(draw: ImageDraw.ImageDraw, w: int, h: int, rng: random.Random) -> None:
    kind = rng.randrange(5)
    size = rng.uniform(0.05, 0.6) * min(w, h)
    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    box = [cx - size / 2, cy - size * rng.uniform(0.3, 0.7), cx + size / 2, cy + size * rng.uniform(0.3, 0.7)]
    fill = _colour(rng, alpha=rng.randint(120, 255))
    outline = _colour(rng) if rng.random() < 0.5 else None
    width = rng.randint(1, 6)
    if kind == 0:
        draw.ellipse(box, fill=fill, outline=outline, width=width)
    elif kind == 1:
        draw.rectangle(box, fill=fill, outline=outline, width=width)
    elif kind == 2:
        pts = [(cx + size * rng.uniform(-0.6, 0.6), cy + size * rng.uniform(-0.6, 0.6))
               for _ in range(rng.randint(3, 7))]
        draw.polygon(pts, fill=fill, outline=outline)
    elif kind == 3:
        pts = [(rng.uniform(0, w), rng.uniform(0, h)) for _ in range(rng.randint(2, 5))]
        draw.line(pts, fill=fill, width=rng.randint(2, 12))
    else:
        start = rng.uniform(0, 360)
        draw.pieslice(box, start, start + rng.uniform(40, 300), fill=fill, outline=outline)
