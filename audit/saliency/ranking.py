"""Rank statistics shared by the saliency engine (Score-CAM's channel-budget agreement, the sanity check)."""

from __future__ import annotations

import math

import torch

from audit.errors import ShapeError


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """[B, N] → [B, N] ranks (0-based) per row, ties sharing their average rank (as scipy.stats.rankdata)."""
    b, n = values.shape
    ordered, order = values.sort(dim=1)
    new_group = torch.ones_like(ordered, dtype=torch.bool)
    new_group[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    group = new_group.long().cumsum(1) - 1 + torch.arange(b, device=values.device)[:, None] * n  # unique per row
    position = torch.arange(n, device=values.device, dtype=torch.float64).expand(b, n).reshape(-1)
    first = torch.full((b * n,), float(n), dtype=torch.float64, device=values.device)
    last = torch.full((b * n,), -1.0, dtype=torch.float64, device=values.device)
    first.scatter_reduce_(0, group.reshape(-1), position, reduce="amin")
    last.scatter_reduce_(0, group.reshape(-1), position, reduce="amax")
    mean_rank = ((first + last) / 2)[group.reshape(-1)].view(b, n)
    ranks = torch.empty_like(mean_rank)
    return ranks.scatter_(1, order, mean_rank)


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation per row: a, b float [B, ...] of the same shape → float [B] in [-1, 1].

    Ties (the zeros of a ReLU'd map) get their average rank, as ``scipy.stats.spearmanr``; NaN where either row is
    constant (no ranking exists).
    """
    if a.shape != b.shape or a.ndim < 2:
        raise ShapeError("b", f"{tuple(a.shape)} (the shape of a, [B, ...])", tuple(b.shape))
    ranks_a = average_ranks(a.flatten(1))
    ranks_b = average_ranks(b.flatten(1))
    centred_a = ranks_a - ranks_a.mean(1, keepdim=True)
    centred_b = ranks_b - ranks_b.mean(1, keepdim=True)
    covariance = (centred_a * centred_b).sum(1)
    scale = centred_a.square().sum(1).sqrt() * centred_b.square().sum(1).sqrt()
    correlation = torch.where(scale > 0, covariance / scale.clamp_min(1e-300), torch.full_like(scale, math.nan))
    return correlation.float()
