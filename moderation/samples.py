"""Sample images made by code: the demo's and the tests' data set.

The project ships no photos. ``make_sample_set`` draws synthetic "photos"
(gradients, shapes, texture, text), makes edited copies of some of them
with typical copy edits (crop, flip, rotate, colour, blur, JPEG, text and
emoji overlays, padding), and adds edited non-copies and a separate
background set, with a DISC21-style ground-truth CSV.
"""

from __future__ import annotations

import csv
import io
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps


def synthetic_image(rng: random.Random, size: tuple[int, int] = (320, 256)) -> Image.Image:
    """A random picture: gradient sky, textured ground, a few shapes and a word."""
    w, h = size
    nprng = np.random.default_rng(rng.getrandbits(32))
    top = np.array([rng.randint(0, 255) for _ in range(3)], np.float32)
    bottom = np.array([rng.randint(0, 255) for _ in range(3)], np.float32)
    t = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    arr = top * (1 - t) + bottom * t
    arr = np.broadcast_to(arr, (h, w, 3)).copy()
    arr += nprng.normal(0, rng.uniform(2, 18), (h, w, 3)).astype(np.float32)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(4, 9)):
        color = tuple(rng.randint(0, 255) for _ in range(3))
        x0, y0 = rng.randint(-w // 4, w), rng.randint(-h // 4, h)
        x1, y1 = x0 + rng.randint(w // 10, w // 2), y0 + rng.randint(h // 10, h // 2)
        kind = rng.choice(["ellipse", "rectangle", "polygon", "line"])
        if kind == "ellipse":
            draw.ellipse([x0, y0, x1, y1], fill=color)
        elif kind == "rectangle":
            draw.rectangle([x0, y0, x1, y1], fill=color)
        elif kind == "polygon":
            pts = [(rng.randint(0, w), rng.randint(0, h)) for _ in range(rng.randint(3, 6))]
            draw.polygon(pts, fill=color)
        else:
            draw.line([x0, y0, x1, y1], fill=color, width=rng.randint(2, 12))
    font = ImageFont.load_default(size=rng.randint(14, 40))
    word = "".join(rng.choice("ABCDEFGHJKLMNPRSTUVWXYZ") for _ in range(rng.randint(3, 7)))
    draw.text((rng.randint(0, w // 2), rng.randint(0, h - 20)), word,
              fill=tuple(rng.randint(0, 255) for _ in range(3)), font=font)
    return img.filter(ImageFilter.GaussianBlur(rng.uniform(0, 1.2)))


# -- copy edits ---------------------------------------------------------------------------


def _crop(img, rng):
    w, h = img.size
    frac = rng.uniform(0.55, 0.9)
    cw, ch = int(w * frac), int(h * frac)
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    return img.crop((x, y, x + cw, y + ch))


def _flip(img, rng):
    return ImageOps.mirror(img)


def _rotate(img, rng):
    return img.rotate(rng.choice([rng.uniform(-20, 20), 90, 180, 270]), expand=True,
                      fillcolor=(0, 0, 0))


def _colour(img, rng):
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.6, 1.4))
    img = ImageEnhance.Contrast(img).enhance(rng.uniform(0.6, 1.4))
    return ImageEnhance.Color(img).enhance(rng.uniform(0.0, 1.6))


def _grayscale(img, rng):
    return ImageOps.grayscale(img).convert("RGB")


def _blur(img, rng):
    return img.filter(ImageFilter.GaussianBlur(rng.uniform(1, 3)))


def _jpeg(img, rng):
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=rng.randint(10, 40))
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _text(img, rng):
    img = img.copy()
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=max(12, img.size[1] // rng.randint(6, 12)))
    draw.text((rng.randint(0, img.size[0] // 3), rng.randint(0, img.size[1] * 2 // 3)),
              rng.choice(["LOL", "so true", "wait for it", "#repost", "OMG!!"]),
              fill=tuple(rng.randint(0, 255) for _ in range(3)), font=font, stroke_width=2,
              stroke_fill=(0, 0, 0))
    return img


def _emoji(img, rng):
    """A round yellow face: our own stand-in for emoji overlays."""
    img = img.copy()
    draw = ImageDraw.Draw(img)
    r = min(img.size) // rng.randint(5, 8)
    cx, cy = rng.randint(r, img.size[0] - r), rng.randint(r, img.size[1] - r)
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(255, 214, 0), outline=(120, 80, 0), width=2)
    e = max(1, r // 5)
    draw.ellipse([cx - r // 2 - e, cy - r // 3 - e, cx - r // 2 + e, cy - r // 3 + e], fill=(60, 40, 0))
    draw.ellipse([cx + r // 2 - e, cy - r // 3 - e, cx + r // 2 + e, cy - r // 3 + e], fill=(60, 40, 0))
    draw.arc([cx - r // 2, cy - r // 4, cx + r // 2, cy + r // 2], 20, 160, fill=(60, 40, 0), width=e)
    return img


def _pad(img, rng):
    border = rng.randint(8, max(9, min(img.size) // 5))
    return ImageOps.expand(img, border, fill=tuple(rng.randint(0, 255) for _ in range(3)))


def _scale(img, rng):
    f = rng.uniform(0.4, 0.8)
    return img.resize((max(8, int(img.size[0] * f)), max(8, int(img.size[1] * f))), Image.BILINEAR)


EDITS = {"crop": _crop, "flip": _flip, "rotate": _rotate, "colour": _colour, "grayscale": _grayscale,
         "blur": _blur, "jpeg": _jpeg, "text": _text, "emoji": _emoji, "pad": _pad, "scale": _scale}


def edit_copy(img: Image.Image, rng: random.Random, n_edits: tuple[int, int] = (1, 3)) -> tuple[Image.Image, list[str]]:
    """Apply a random chain of copy edits; returns the copy and the edit names."""
    names = rng.sample(sorted(EDITS), rng.randint(*n_edits))
    for name in names:
        img = EDITS[name](img, rng)
    return img, names


@dataclass(frozen=True)
class SampleSet:
    root: Path
    references: Path
    queries: Path
    background: Path
    ground_truth: Path
    n_copies: int


def make_sample_set(root: Path, *, n_references: int = 40, n_copies: int = 20, n_distractors: int = 10,
                    n_background: int = 40, seed: int = 0, size: tuple[int, int] = (320, 256)) -> SampleSet:
    """Write a labelled sample set under ``root`` (idempotent for a given seed).

    ``references/R*.jpg``, ``background/B*.jpg``, ``queries/Q*.jpg`` (edited
    copies of the first ``n_copies`` references plus edited unrelated
    images) and ``ground_truth.csv``.
    """
    rng = random.Random(seed)
    root = Path(root)
    dirs = {name: root / name for name in ("references", "queries", "background")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    refs = []
    for i in range(n_references):
        img = synthetic_image(rng, size)
        refs.append(img)
        img.save(dirs["references"] / f"R{i:05d}.jpg", quality=90)
    for i in range(n_background):
        synthetic_image(rng, size).save(dirs["background"] / f"B{i:05d}.jpg", quality=90)
    rows = []
    order = list(range(n_copies + n_distractors))
    rng.shuffle(order)
    for qnum, j in enumerate(order):
        qid = f"Q{qnum:05d}"
        if j < n_copies:
            img, _ = edit_copy(refs[j], rng)
            rows.append((qid, f"R{j:05d}"))
        else:
            img, _ = edit_copy(synthetic_image(rng, size), rng)
            rows.append((qid, ""))
        img.convert("RGB").save(dirs["queries"] / f"{qid}.jpg", quality=90)
    gt = root / "ground_truth.csv"
    with open(gt, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["query_id", "reference_id"])
        w.writerows(rows)
    return SampleSet(root, dirs["references"], dirs["queries"], dirs["background"], gt, n_copies)
