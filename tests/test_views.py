"""Query views: the fixed plan, borders trimmed, pasted pictures proposed, bad specs refused."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageOps

from local_images import flat, paste, textured
from moderation.errors import ConfigError
from moderation.views import (ViewConfig, ViewKind, grid_boxes, plan_views, proposal_boxes, render,
                              trim_box)

ALL = ViewConfig.parse("full,mirror,grid2,grid3,center,trim,proposals")


def test_parse_keeps_full_first_and_refuses_unknown_kinds():
    assert ViewConfig.parse("mirror,grid2").kinds == (ViewKind.FULL, ViewKind.MIRROR, ViewKind.GRID2)
    assert ViewConfig.parse("full").only_full and ViewConfig.parse("").only_full
    assert ViewConfig.parse(" Grid3 , grid3 ").spec == "full,grid3"
    with pytest.raises(ConfigError, match="grid5"):
        ViewConfig.parse("full,grid5")


def test_grids_overlap_and_stay_inside():
    for n in (2, 3):
        boxes = grid_boxes(n)
        assert len(boxes) == n * n
        assert all(0 <= x0 < x1 <= 1 + 1e-9 and 0 <= y0 < y1 <= 1 + 1e-9 for x0, y0, x1, y1 in boxes)
        side = boxes[0][2] - boxes[0][0]
        stride = boxes[1][0] - boxes[0][0]
        assert side == pytest.approx(2 * stride)  # neighbours overlap by half
        assert boxes[-1][2] == pytest.approx(1.0)


def test_fixed_plan_of_a_plain_photo():
    img = textured(1)
    names = [v.name for v in plan_views(img, ViewConfig.parse("full,mirror,grid2,grid3,center"))]
    assert names[0] == "full" and names.count("mirror") == 1
    assert len(names) == 1 + 1 + 4 + 9 + 1
    mirror = next(v for v in plan_views(img, ALL) if v.name == "mirror")
    assert np.array_equal(np.asarray(render(img, mirror)), np.asarray(ImageOps.mirror(img)))


def test_full_only_plan_is_the_image_itself():
    img = textured(2)
    (view,) = plan_views(img, ViewConfig())
    assert render(img, view) is img


def test_trim_finds_the_picture_inside_a_border():
    inner = textured(3, size=(200, 150))
    framed = Image.new("RGB", (300, 260), (20, 40, 200))
    framed.paste(inner, (50, 60))
    box = trim_box(np.asarray(framed))
    assert box == pytest.approx((50 / 300, 60 / 260, 250 / 300, 210 / 260), abs=0.01)
    assert trim_box(np.asarray(textured(4))) is None  # nothing to trim
    crop = render(framed, next(v for v in plan_views(framed, ALL) if v.name == "trim"))
    assert abs(crop.width - 200) <= 2 and abs(crop.height - 150) <= 2


def test_proposals_find_a_pasted_picture():
    import numpy as np

    host = textured(5, size=(480, 360), shapes=12).filter(__import__("PIL.ImageFilter").ImageFilter.GaussianBlur(3))
    query = paste(textured(6), host, 0.5, (200, 120))  # 192 x 144 at (200, 120)
    boxes = proposal_boxes(np.asarray(query))
    target = (200 / 480, 120 / 360, 392 / 480, 264 / 360)

    def iou(a, b):
        ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
        iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
        return ix * iy / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - ix * iy)

    assert boxes and max(iou(b, target) for b in boxes) > 0.7, boxes


def test_flat_and_tiny_images_get_the_fixed_views_only():
    for img in (flat(), flat(size=(4, 3))):
        names = [v.name for v in plan_views(img, ALL)]
        assert "trim" not in names and not any(n.startswith("proposal") for n in names)
        for v in plan_views(img, ALL):
            out = render(img, v)
            assert out.width >= 1 and out.height >= 1
