"""Overlays drawn with Pillow alone: text, emoji-like glyphs, stripes.

No font or emoji file is downloaded: text uses Pillow's bundled scalable
font (``ImageFont.load_default(size)``), and the "emoji" are glyphs drawn
here (faces, hearts, stars, arrows, pins, badges). Each function takes an
RGB image and a ``random.Random`` and returns a new RGB image.
"""

from __future__ import annotations

import functools
import math
import random
import string

from PIL import Image, ImageDraw, ImageFont

_WORDS = ("copy", "sale", "news", "photo", "LOL", "wow", "meme", "free", "share", "2024", "OK",
          "hello", "best", "stock", "viral", "true", "love", "deal", "today", "NEW", "omg", "like")


@functools.lru_cache(maxsize=64)
def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled font at ``size`` px (cached per size)."""
    return ImageFont.load_default(size=max(6, int(size)))


def random_words(rng: random.Random, n: int) -> str:
    out = []
    for _ in range(n):
        if rng.random() < 0.7:
            out.append(rng.choice(_WORDS))
        else:
            out.append("".join(rng.choice(string.ascii_letters + string.digits)
                               for _ in range(rng.randint(2, 8))))
    return " ".join(out)


def overlay_text(img: Image.Image, rng: random.Random) -> Image.Image:
    """Words of random size (5-25 % of the height), colour, opacity and position."""
    w, h = img.size
    layer = Image.new("RGBA", img.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    for _ in range(rng.randint(1, 3)):
        size = max(6, int(h * rng.uniform(0.05, 0.25)))
        text = random_words(rng, rng.randint(1, 3))
        colour = (rng.randint(0, 255), rng.randint(0, 255), rng.randint(0, 255), rng.randint(150, 255))
        x = rng.randint(-w // 8, max(0, w - size))
        y = rng.randint(0, max(0, h - size))
        stroke = rng.randint(0, 2)
        draw.text((x, y), text, font=font(size), fill=colour, stroke_width=stroke,
                  stroke_fill=(0, 0, 0, colour[3]) if stroke else None)
    return Image.alpha_composite(img.convert("RGBA"), layer).convert("RGB")


def overlay_emoji(img: Image.Image, rng: random.Random) -> Image.Image:
    """One drawn glyph, 10-45 % of the short side, opacity 0.5-1, anywhere (may hang off an edge)."""
    w, h = img.size
    size = max(8, int(min(w, h) * rng.uniform(0.1, 0.45)))
    glyph = draw_glyph(size, rng)
    opacity = rng.uniform(0.5, 1.0)
    if opacity < 1.0:
        alpha = glyph.getchannel("A").point(lambda a: int(a * opacity))
        glyph.putalpha(alpha)
    x = rng.randint(-size // 4, max(0, w - 3 * size // 4))
    y = rng.randint(-size // 4, max(0, h - 3 * size // 4))
    base = img.convert("RGBA")
    base.alpha_composite(glyph, (max(0, x), max(0, y)), (max(0, -x), max(0, -y)))
    return base.convert("RGB")


def draw_glyph(size: int, rng: random.Random) -> Image.Image:
    """An RGBA emoji-like glyph of ``size`` x ``size`` px on transparency."""
    s = size
    g = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    d = ImageDraw.Draw(g)
    colour = rng.choice([(255, 204, 51), (230, 40, 50), (60, 140, 230), (90, 200, 90), (250, 140, 30),
                         (170, 90, 200), (255, 255, 255), (40, 40, 40)])
    kind = rng.randrange(7)
    m = max(1, s // 20)
    if kind == 0:  # smiley face
        d.ellipse([m, m, s - m, s - m], fill=colour + (255,), outline=(60, 40, 0, 255), width=m)
        e = s // 10
        d.ellipse([s * 0.3 - e, s * 0.35 - e, s * 0.3 + e, s * 0.35 + e], fill=(40, 30, 20, 255))
        d.ellipse([s * 0.7 - e, s * 0.35 - e, s * 0.7 + e, s * 0.35 + e], fill=(40, 30, 20, 255))
        d.arc([s * 0.25, s * 0.35, s * 0.75, s * 0.8], 20, 160, fill=(40, 30, 20, 255), width=max(1, s // 16))
    elif kind == 1:  # heart
        r = s / 4
        d.ellipse([m, s * 0.15, s / 2 + m, s * 0.15 + 2 * r], fill=colour + (255,))
        d.ellipse([s / 2 - m, s * 0.15, s - m, s * 0.15 + 2 * r], fill=colour + (255,))
        d.polygon([(m * 2, s * 0.4), (s - m * 2, s * 0.4), (s / 2, s - m)], fill=colour + (255,))
    elif kind == 2:  # five-pointed star
        pts = []
        for k in range(10):
            rad = (s / 2 - m) if k % 2 == 0 else (s / 5)
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((s / 2 + rad * math.cos(a), s / 2 + rad * math.sin(a)))
        d.polygon(pts, fill=colour + (255,), outline=(0, 0, 0, 255))
    elif kind == 3:  # triangle pointing up
        d.polygon([(s / 2, m), (s - m, s - m), (m, s - m)], fill=colour + (255,), outline=(0, 0, 0, 255))
    elif kind == 4:  # pushpin: ball and needle
        d.line([(s / 2, s / 2), (s * 0.2, s - m)], fill=(120, 120, 120, 255), width=max(1, s // 14))
        d.ellipse([s * 0.3, m, s * 0.9, s * 0.6], fill=colour + (255,), outline=(0, 0, 0, 255), width=m)
    elif kind == 5:  # arrow
        d.rectangle([m, s * 0.4, s * 0.6, s * 0.6], fill=colour + (255,))
        d.polygon([(s * 0.55, s * 0.15), (s - m, s / 2), (s * 0.55, s * 0.85)], fill=colour + (255,))
    else:  # round badge with a letter
        d.ellipse([m, m, s - m, s - m], fill=colour + (255,))
        d.text((s * 0.28, s * 0.12), rng.choice(string.ascii_uppercase), font=font(int(s * 0.65)),
               fill=(255, 255, 255, 255) if sum(colour) < 400 else (0, 0, 0, 255))
    if rng.random() < 0.5:
        g = g.rotate(rng.uniform(-30, 30), resample=Image.BILINEAR)
    return g


def overlay_stripes(img: Image.Image, rng: random.Random) -> Image.Image:
    """Parallel lines at a random angle, width, spacing, colour and opacity (solid or dashed)."""
    w, h = img.size
    diag = int(math.hypot(w, h)) + 2
    layer = Image.new("RGBA", (diag, diag), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    width = max(1, int(min(w, h) * rng.uniform(0.01, 0.1)))
    spacing = width + max(2, int(min(w, h) * rng.uniform(0.03, 0.3)))
    colour = (rng.randint(0, 255), rng.randint(0, 255), rng.randint(0, 255), int(255 * rng.uniform(0.3, 0.9)))
    dashed = rng.random() < 0.3
    for y in range(0, diag, spacing):
        if dashed:
            for x in range(0, diag, 4 * width):
                d.rectangle([x, y, x + 2 * width, y + width], fill=colour)
        else:
            d.rectangle([0, y, diag, y + width], fill=colour)
    layer = layer.rotate(rng.uniform(-90, 90), resample=Image.BILINEAR)
    left, top = (diag - w) // 2, (diag - h) // 2
    layer = layer.crop((left, top, left + w, top + h))
    return Image.alpha_composite(img.convert("RGBA"), layer).convert("RGB")
