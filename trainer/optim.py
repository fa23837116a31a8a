"""Optimisers (AdamW, SGD, LARS) and the warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch

from moderation.errors import ModerationError


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al., 2017).

    Each parameter's step is scaled by the trust ratio
    ``eta * ||w|| / (||g|| + wd * ||w||)``; groups with ``lars_exclude``
    (biases, norms) take plain SGD steps without weight decay, as in SimCLR
    and SSCD.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 1e-6,
                 eta: float = 0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta,
                                      lars_exclude=False))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if not group["lars_exclude"]:
                    g = g.add(p, alpha=group["weight_decay"])
                    w_norm, g_norm = torch.norm(p), torch.norm(g)
                    trust = torch.where((w_norm > 0) & (g_norm > 0),
                                        group["eta"] * w_norm / g_norm, torch.ones_like(w_norm))
                    g = g.mul(trust)
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = g.clone()
                else:
                    buf.mul_(group["momentum"]).add_(g)
                p.add_(buf, alpha=-group["lr"])
        return loss


def build_optimizer(name: str, groups: list[dict], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """``adamw``, ``sgd`` (momentum 0.9) or ``lars`` over parameter ``groups`` (each with its lr)."""
    clean = [{k: v for k, v in g.items() if k not in ("name", "lars_exclude")} for g in groups]
    if name == "adamw":
        return torch.optim.AdamW(clean, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(clean, lr=lr, momentum=0.9, weight_decay=weight_decay)
    if name == "lars":
        return LARS([{k: v for k, v in g.items() if k != "name"} for g in groups], lr=lr,
                    weight_decay=weight_decay)
    raise ModerationError(f"unknown optimizer {name!r}; one of adamw, sgd, lars")


def lr_factor(step: int, total_steps: int, warmup_steps: int, final: float = 0.0) -> float:
    """Multiplier of the base rate at ``step``: linear warm-up, then cosine decay to ``final``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup_steps))
