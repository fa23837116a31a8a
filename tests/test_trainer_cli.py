"""Command-line options -> TrainConfig, shared by ``moderation train`` and ``python -m trainer``."""

import argparse
from dataclasses import fields

import pytest

from trainer.cli import add_arguments, config_from_args
from trainer.config import TrainConfig


def parse(argv):
    return config_from_args(add_arguments(argparse.ArgumentParser()).parse_args(argv))


def test_defaults_equal_the_config_defaults():
    assert parse([]) == TrainConfig()


def test_options_map_to_config_fields():
    cfg = parse(["--images", "/a", "--images", "/b", "--images-prefix", "train/", "--generated", "5",
                 "--backbone", "resnet50", "--dim", "256", "--no-pretrained", "--freeze-stages", "3",
                 "--train-bn", "--preset", "advanced", "--anchor-preset", "same", "--views", "4",
                 "--mixup", "0.2", "--cutmix", "0.1", "--entropy-weight", "30", "--batch-size", "512",
                 "--steps", "9", "--optimizer", "lars", "--precision", "bf16", "--train-workers", "8",
                 "--threads", "1", "--train-device", "cuda", "--out", "/tmp/x", "--no-resume",
                 "--val-dir", "/val", "--eval-size", "288", "--eval-resize-mode", "short_edge",
                 "--no-publish", "--force-promote", "--export", "/tmp/m.pt", "--time-limit-min", "2.5"])
    assert cfg.images == ("/a", "/b") and cfg.images_prefix == ("train/",)
    assert (cfg.backbone, cfg.dim, cfg.pretrained, cfg.freeze_stages, cfg.freeze_bn) == \
        ("resnet50", 256, False, 3, False)
    assert (cfg.preset, cfg.anchor_preset, cfg.views, cfg.mixup, cfg.cutmix) == \
        ("advanced", "same", 4, 0.2, 0.1)
    assert (cfg.entropy_weight, cfg.batch_size, cfg.steps, cfg.optimizer, cfg.precision) == \
        (30.0, 512, 9, "lars", "bf16")
    assert (cfg.workers, cfg.threads, cfg.device, cfg.out_dir, cfg.resume) == (8, 1, "cuda", "/tmp/x", False)
    assert (cfg.val_dir, cfg.eval_size, cfg.eval_resize_mode, cfg.publish, cfg.force_promote) == \
        ("/val", 288, "short_edge", False, True)
    assert cfg.export_path == "/tmp/m.pt" and cfg.time_limit_min == 2.5


def test_every_config_field_but_bookkeeping_has_an_option():
    parser = add_arguments(argparse.ArgumentParser())
    dests = {a.dest for a in parser._actions}
    missing = {f.name for f in fields(TrainConfig)} - dests - {"command"}
    assert not missing


def test_config_round_trips_through_json_dict():
    cfg = TrainConfig(images=("/a",), images_prefix=("p/",), steps=3)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert TrainConfig.from_dict({**cfg.to_dict(), "unknown_key": 1}) == cfg


def test_bad_choice_is_refused():
    with pytest.raises(SystemExit):
        parse(["--optimizer", "rmsprop"])
