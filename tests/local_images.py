"""Generated pictures for the local-feature and view tests: many small shapes, so SIFT finds corners."""

from __future__ import annotations

import random

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def textured(seed: int, size: tuple[int, int] = (384, 288), shapes: int = 90) -> Image.Image:
    rng = random.Random(seed)
    w, h = size
    img = Image.new("RGB", size, tuple(rng.randint(0, 255) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    for _ in range(shapes):
        colour = tuple(rng.randint(0, 255) for _ in range(3))
        x0, y0 = rng.randint(-20, w), rng.randint(-20, h)
        x1, y1 = x0 + rng.randint(6, w // 5), y0 + rng.randint(6, h // 5)
        kind = rng.random()
        if kind < 0.35:
            draw.rectangle([x0, y0, x1, y1], fill=colour)
        elif kind < 0.7:
            draw.ellipse([x0, y0, x1, y1], fill=colour)
        else:
            draw.polygon([(rng.randint(x0, x1), rng.randint(y0, y1)) for _ in range(rng.randint(3, 5))],
                         fill=colour)
    return img.filter(ImageFilter.GaussianBlur(0.6))


def paste(inner: Image.Image, outer: Image.Image, scale: float, at: tuple[int, int]) -> Image.Image:
    small = inner.resize((max(1, round(inner.width * scale)), max(1, round(inner.height * scale))), Image.LANCZOS)
    out = outer.copy()
    out.paste(small, at)
    return out


def flat(colour=(128, 128, 128), size=(200, 150)) -> Image.Image:
    return Image.new("RGB", size, colour)


def as_jpeg(img: Image.Image, quality: int = 80) -> Image.Image:
    import io

    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def noise(seed: int, size=(256, 192)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
