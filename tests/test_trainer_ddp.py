"""The DDP path with 2 CPU processes (gloo): cross-process negatives and gradients equal a
single-process run on the same global batch, and a DDP training step matches one process.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from trainer.loss import SSCDLoss

from test_trainer_helpers import keep_torch_threads  # noqa: F401

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _setup(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)


def _global_batch():
    g = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(16, 8, generator=g), dim=1)
    inst = torch.stack([torch.arange(8).repeat_interleave(2), torch.full((16,), -1)], 1)
    inst[5, 1] = 6  # one mixed view, shared across the process boundary
    return z, inst


def _loss_worker(rank: int, port: int, out: dict) -> None:
    _setup(rank, port)
    from trainer import distributed as D

    env = D.init_distributed("cpu")
    try:
        z, inst = _global_batch()
        part = slice(rank * 8, (rank + 1) * 8)
        local = z[part].clone().requires_grad_(True)
        gathered = D.gather_with_grad(local)
        parts = SSCDLoss(0.05, 10.0)(gathered, D.gather(inst[part]))
        parts.total.backward()
        # what DDP does to parameter gradients: average over ranks
        grad = local.grad / env.world_size
        out[rank] = (float(parts.total), float(parts.infonce), gathered.detach().clone(), grad.clone())
    finally:
        D.cleanup()


def test_cross_process_negatives_equal_single_process():
    z, inst = _global_batch()
    single = z.clone().requires_grad_(True)
    parts = SSCDLoss(0.05, 10.0)(single, inst)
    parts.total.backward()

    out = mp.Manager().dict()
    mp.spawn(_loss_worker, args=(_free_port(), out), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        total, nce, gathered, grad = out[rank]
        assert torch.allclose(gathered, z)
        assert total == pytest.approx(parts.total.item(), rel=1e-6)
        assert nce == pytest.approx(parts.infonce.item(), rel=1e-6)
        assert torch.allclose(grad, single.grad[rank * 8:(rank + 1) * 8], atol=1e-6)


def _config(folder, out_dir):
    from test_trainer_helpers import tiny_config

    # SGD, not Adam: Adam's first steps are about lr * sign(gradient), which turns float
    # rounding differences in near-zero gradients into lr-sized weight differences.
    return tiny_config(folder, out_dir, steps=2, checkpoint_every=100, optimizer="sgd", lr=0.05,
                       trunk_lr_mult=1.0)


def _trunk_start() -> dict:
    """The pretrained weights of the trainable trunk blocks, before any step."""
    from trainer.model import build_training_model

    model = build_training_model("mobilenet_v2", 32, pretrained=True, freeze_stages=16)
    return {n: p.detach().clone() for n, p in model.named_parameters()
            if n.startswith("trunk.") and p.requires_grad}


def _train_worker(rank: int, port: int, folder: str, out_dir: str, out: dict) -> None:
    _setup(rank, port)
    from trainer import distributed as D
    from trainer.loop import train

    env = D.init_distributed("cpu")
    try:
        result = train(_config(folder, out_dir), env=env)
        out[rank] = {k: v.clone() for k, v in result.model.state_dict().items()}
    finally:
        D.cleanup()


def test_ddp_training_matches_one_process(tmp_path):
    from trainer.loop import train
    from trainer.synthetic import synthetic_image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(16):
        synthetic_image(700 + i, max_side=96).save(folder / f"i{i}.png")
    single = train(_config(folder, tmp_path / "single"))
    ref = single.model.state_dict()

    out = mp.Manager().dict()
    mp.spawn(_train_worker, args=(_free_port(), str(folder), str(tmp_path / "ddp"), out),
             nprocs=WORLD, join=True)
    for rank in range(WORLD):
        state = out[rank]
        for name, value in ref.items():
            diff = (state[name].float() - value.float()).abs().max().item()
            assert diff < 1e-5, (rank, name, diff)
    assert any((ref[n].float() - start).abs().max() > 1e-4 for n, start in _trunk_start().items())
    assert (tmp_path / "ddp" / "checkpoint.pt").exists()  # written by rank 0
