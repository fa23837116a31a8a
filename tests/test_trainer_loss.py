"""The SSCD objective on hand-made embeddings, against values worked out by hand."""

import math

import pytest
import torch
import torch.nn.functional as F

from trainer.loss import SSCDLoss, infonce, koleo, positive_mask


def test_positive_mask_views_and_mixed_views():
    # rows 0,1: image 0; rows 2,3: image 1; row 4: a mix of image 1 and image 0
    inst = torch.tensor([[0, -1], [0, -1], [1, -1], [1, -1], [1, 0]])
    m = positive_mask(inst)
    assert not m.diagonal().any()
    assert m[0].tolist() == [False, True, False, False, True]
    assert m[2].tolist() == [False, False, False, True, True]
    assert m[4].tolist() == [True, True, True, True, False]
    assert torch.equal(m, m.t())


def test_infonce_two_pairs_by_hand():
    # z0 = z1 = e1 (positives), z2 = e2, z3 = -e2 (positives); temperature 1.
    z = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    pos = positive_mask(torch.tensor([0, 0, 1, 1]))
    # anchor 0: others score 1 (z1), 0, 0   -> -log(e / (e + 2))
    a = -math.log(math.e / (math.e + 2))
    # anchor 2: others score 0, 0, -1 (z3) -> -log(e^-1 / (2 + e^-1))
    b = -math.log(math.exp(-1) / (2 + math.exp(-1)))
    assert infonce(z, pos, temperature=1.0).item() == pytest.approx((2 * a + 2 * b) / 4, rel=1e-6)


def test_infonce_temperature_and_multiple_positives_by_hand():
    t = 0.05
    # three views of image 0 at angles 0, 0.1, 0.2 rad; two identical views of image 1 at pi/2.
    angles = [0.0, 0.1, 0.2, math.pi / 2, math.pi / 2]
    z = torch.tensor([[math.cos(a), math.sin(a)] for a in angles], dtype=torch.float64)
    pos = positive_mask(torch.tensor([0, 0, 0, 1, 1]))
    s = (z @ z.t()).numpy()
    expected = []
    for i in range(5):
        others = [j for j in range(5) if j != i]
        denom = sum(math.exp(s[i, j] / t) for j in others)
        ps = [j for j in others if pos[i, j]]
        expected.append(-sum(math.log(math.exp(s[i, p] / t) / denom) for p in ps) / len(ps))
    got = infonce(z, pos, temperature=t).item()
    assert got == pytest.approx(sum(expected) / 5, rel=1e-9)


def test_infonce_requires_a_positive_per_row():
    z = F.normalize(torch.randn(3, 4), dim=1)
    with pytest.raises(ValueError):
        infonce(z, positive_mask(torch.tensor([0, 0, 1])), 0.05)


def test_koleo_by_hand_ignores_positives():
    # z0, z1 positives at distance 0.1 apart; z2 at distance 1 from z0 and ~0.9 from z1; z3 = -z0.
    z = torch.tensor([[0.0, 0.0], [0.1, 0.0], [1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    pos = positive_mask(torch.tensor([0, 0, 1, 2]))
    # nearest non-positive: z0 -> z2 (1.0), z1 -> z2 (0.9), z2 -> z1 (0.9), z3 -> z0 (2.0)
    expected = -(math.log(1.0) + math.log(0.9) + math.log(0.9) + math.log(2.0)) / 4
    assert koleo(z, pos).item() == pytest.approx(expected, rel=1e-6)


def test_entropy_gradient_pushes_close_negatives_apart():
    z = F.normalize(torch.randn(12, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    z[1] = F.normalize(z[0] + 0.02 * torch.ones(8), dim=0)  # rows 0 and 1: a close pair
    pos = positive_mask(torch.arange(12))  # every row its own image: all pairs are negatives
    zz = z.clone().requires_grad_(True)
    koleo(zz, pos).backward()
    before = (z[0] - z[1]).norm()
    moved = z - 0.01 * zz.grad
    after = (moved[0] - moved[1]).norm()
    assert after > before
    # the gradient on the closest pair is along their difference, outward
    assert torch.dot(zz.grad[0], z[0] - z[1]) < 0


def test_total_loss_combines_terms_with_lambda():
    z = F.normalize(torch.randn(8, 16, generator=torch.Generator().manual_seed(3)), dim=1)
    inst = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    parts = SSCDLoss(temperature=0.05, entropy_weight=30.0)(z, inst)
    assert parts.total.item() == pytest.approx(parts.infonce.item() + 30.0 * parts.entropy.item(), rel=1e-6)


def test_loss_lower_for_aligned_positives():
    g = torch.Generator().manual_seed(4)
    base = F.normalize(torch.randn(4, 32, generator=g), dim=1)
    good = torch.stack([base, base], 1).reshape(8, 32)  # image-major: rows 2i, 2i+1 are views of i
    bad = F.normalize(torch.randn(8, 32, generator=g), dim=1)
    inst = torch.arange(4).repeat_interleave(2)
    loss = SSCDLoss(0.05, 0.0)
    assert loss(good, inst).infonce < loss(bad, inst).infonce
