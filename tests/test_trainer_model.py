"""The trainable descriptor: whitened head, PCA init, freezing, parameter groups, optimisers."""

import pytest
import torch
from torch import nn

from moderation.errors import ModerationError
from trainer.model import (WhitenedLinear, build_training_model, finalise_head, init_projection,
                           param_groups, pca_whitening, set_train_mode)
from trainer.optim import LARS, build_optimizer, lr_factor


def test_whitened_head_folds_into_one_linear():
    head = WhitenedLinear(12, 5)
    with torch.no_grad():
        head.whiten.copy_(torch.randn(5, 12))
        head.whiten_bias.copy_(torch.randn(5))
        head.linear.weight.add_(0.1 * torch.randn(5, 5))
        head.linear.bias.copy_(torch.randn(5))
    x = torch.randn(7, 12)
    folded = head.folded()
    assert isinstance(folded, nn.Linear)
    assert torch.allclose(head(x), folded(x), atol=1e-5)


def test_pca_whitening_whitens_the_strong_directions():
    g = torch.Generator().manual_seed(0)
    scales = torch.tensor([10.0, 5.0, 2.0, 1.0] + [0.01] * 6)
    x = torch.randn(500, 10, generator=g) * scales + 3.0
    p, b = pca_whitening(x, 4, eps_relative=1e-4)
    y = x @ p.t() + b
    assert y.mean(0).abs().max() < 1e-3
    cov = torch.cov(y.t())
    assert torch.allclose(cov, torch.eye(4), atol=0.05)
    assert pca_whitening(x[:4], 4) is None  # too few rows
    assert pca_whitening(torch.zeros(50, 10), 4) is None  # degenerate


def test_init_projection_pca_and_fallbacks():
    model = build_training_model("mobilenet_v2", 8, pretrained=False, projection_init="pca")
    feats = torch.rand(40, 1280)
    assert init_projection(model, "pca", feats) == "pca"
    assert torch.equal(model.projection.linear.weight, torch.eye(8))
    assert init_projection(model, "pca", torch.zeros(40, 1280)) == "orthogonal"
    plain = build_training_model("mobilenet_v2", 8, pretrained=False, projection_init="orthogonal")
    assert isinstance(plain.projection, nn.Linear)
    assert init_projection(plain, "orthogonal") == "orthogonal"
    w = plain.projection.weight
    assert torch.allclose(w @ w.t(), torch.eye(8), atol=1e-5)
    with pytest.raises(ModerationError):
        init_projection(plain, "nope")


def test_freezing_and_parameter_groups():
    model = build_training_model("mobilenet_v2", 16, pretrained=False, freeze_stages=17,
                                 projection_init="pca")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("trunk.17.", "trunk.18.", "projection.")) for n in trainable)
    groups = param_groups(model, lr=1e-3, trunk_lr_mult=0.1, weight_decay=1e-4)
    by_name = {g["name"]: g for g in groups}
    assert by_name["trunk"]["lr"] == pytest.approx(1e-4) and by_name["head"]["lr"] == 1e-3
    assert by_name["trunk-nodecay"]["weight_decay"] == 0.0
    set_train_mode(model, freeze_bn=True)
    assert model.training and not model.trunk[18][1].training and not model.trunk[3].training
    set_train_mode(model, freeze_bn=False)
    assert model.trunk[18][1].training and not model.trunk[3].training  # frozen block stays eval
    with pytest.raises(ModerationError):
        build_training_model("mobilenet_v2", 16, pretrained=False, freeze_stages=99)
    with pytest.raises(ModerationError):
        build_training_model("mobilenet_v2", 0, pretrained=False)


def test_finalise_reverts_sync_batchnorm_and_scripts():
    from moderation.descriptor import export_torchscript, load_torchscript

    model = build_training_model("mobilenet_v2", 8, pretrained=False, freeze_stages=18)
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    finalise_head(model.eval())
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    assert isinstance(model.projection, nn.Linear)
    scripted = load_torchscript(export_torchscript(model, example_size=32))
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(scripted(x), model(x), atol=1e-5)


@pytest.mark.parametrize("name", ["adamw", "sgd", "lars"])
def test_optimisers_reduce_a_quadratic(name):
    w = nn.Parameter(torch.tensor([3.0, -2.0]))
    b = nn.Parameter(torch.tensor([1.0]))
    groups = [{"params": [w], "lr": 0.1, "weight_decay": 0.0, "name": "w", "lars_exclude": False},
              {"params": [b], "lr": 0.1, "weight_decay": 0.0, "name": "b", "lars_exclude": True}]
    opt = build_optimizer(name, groups, 0.1, 0.0)
    if name == "lars":
        assert isinstance(opt, LARS)
        opt.param_groups[0]["eta"] = 0.1
    start = float((w.detach() ** 2).sum() + b.detach() ** 2)
    for _ in range(30):
        opt.zero_grad()
        loss = (w ** 2).sum() + (b ** 2).sum()
        loss.backward()
        opt.step()
    assert float((w.detach() ** 2).sum() + b.detach() ** 2) < start
    with pytest.raises(ModerationError):
        build_optimizer("nope", groups, 0.1, 0.0)


def test_warmup_then_cosine():
    assert lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10) == pytest.approx(0.5)
    assert lr_factor(100, 100, 10) == pytest.approx(0.0, abs=1e-9)
