"""The SSCD objective: multi-positive InfoNCE plus the KoLeo differential-entropy term.

Embeddings ``z`` (N, D) are unit-norm. ``instances`` (N, K) lists, per
embedding, the training images whose content it holds (``-1`` = unused
slot); two embeddings are positives when they share an image (two views of
one image; a mixed view and either of its sources). Every other embedding
of the global batch is a negative.

InfoNCE, for anchor i with positives P(i) (never i itself)::

    l_i = -1/|P(i)| * sum_{p in P(i)} log( exp(s_ip / t) / sum_{j != i} exp(s_ij / t) )

with s = cosine similarity and t the temperature (0.05); the loss is the
mean of l_i. With two views and no mixing this is the NT-Xent / SimCLR
loss.

KoLeo (differential entropy), with rho_i the distance from z_i to its
nearest *non-positive* embedding::

    H = -mean_i log(rho_i)

Positives are excluded because they are meant to be close; the term
spreads the negatives (SSCD: "consistent separation between descriptor
vectors"). Total loss = InfoNCE + lambda * H.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def positive_mask(instances: torch.Tensor) -> torch.Tensor:
    """(N, N) bool: rows i, cols j that share a (non-negative) instance, diagonal excluded."""
    if instances.ndim == 1:
        instances = instances[:, None]
    a = instances[:, None, :, None]
    b = instances[None, :, None, :]
    shared = ((a == b) & (a >= 0)).any(dim=-1).any(dim=-1)
    shared.fill_diagonal_(False)
    return shared


def infonce(z: torch.Tensor, positives: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    """Multi-positive InfoNCE (see module doc). Every row needs at least one positive."""
    if not bool(positives.any(dim=1).all()):
        raise ValueError("every embedding needs a positive (use at least 2 views per image)")
    sim = (z @ z.t()) / temperature
    eye = torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(eye, float("-inf"))
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    pos = positives.to(log_prob.dtype)
    per_anchor = -(log_prob.masked_fill(~positives, 0.0) * pos).sum(dim=1) / pos.sum(dim=1)
    return per_anchor.mean()


def koleo(z: torch.Tensor, positives: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """-mean log(distance to the nearest non-positive other embedding)."""
    norms = z.pow(2).sum(dim=1)
    # |a|^2 + |b|^2 - 2ab: no (N, N, D) intermediate, so it scales to large GPU batches.
    sq = (norms[:, None] + norms[None, :] - 2 * (z @ z.t())).clamp(min=0)
    eye = torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
    sq = sq.masked_fill(eye | positives, float("inf"))
    nearest = sq.min(dim=1).values
    # sqrt(x + eps): finite gradient when two embeddings coincide.
    return -torch.log(torch.sqrt(nearest + eps)).mean()


@dataclass
class LossParts:
    total: torch.Tensor
    infonce: torch.Tensor
    entropy: torch.Tensor


class SSCDLoss(torch.nn.Module):
    """InfoNCE(temperature) + entropy_weight * KoLeo, computed in float32."""

    def __init__(self, temperature: float = 0.05, entropy_weight: float = 10.0):
        super().__init__()
        self.temperature = temperature
        self.entropy_weight = entropy_weight

    def forward(self, z: torch.Tensor, instances: torch.Tensor) -> LossParts:
        z = z.float()
        pos = positive_mask(instances.to(z.device))
        nce = infonce(z, pos, self.temperature)
        ent = koleo(z, pos)
        return LossParts(nce + self.entropy_weight * ent, nce, ent)
