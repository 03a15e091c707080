"""Pure mask math: which weights to prune, given scores. No models here, only tensors.

Convention: a mask is a bool tensor shaped like the weight, ``True`` where the weight is KEPT.
Weights are ``[out_features, in_features]`` (rows are outputs, columns are inputs).
"""

from __future__ import annotations

import torch


def n_pruned(numel: int, sparsity: float) -> int:
    """How many of ``numel`` weights a ``sparsity`` fraction prunes (rounded to nearest)."""
    return int(round(numel * sparsity))


def smallest_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask pruning exactly ``n_pruned(numel, sparsity)`` lowest scores of the whole tensor."""
    k = n_pruned(scores.numel(), sparsity)
    mask = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    if k > 0:
        idx = torch.topk(scores.flatten().float(), k, largest=False).indices
        mask.view(-1)[idx] = False
    return mask


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask pruning exactly ``n_pruned(cols, sparsity)`` lowest scores in every row."""
    k = n_pruned(scores.shape[1], sparsity)
    mask = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    if k > 0:
        idx = torch.topk(scores.float(), k, dim=1, largest=False).indices
        mask.scatter_(1, idx, False)
    return mask


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M keep-mask: in every group of ``m`` consecutive inputs of a row keep the ``n`` highest scores.

    Args:
        scores: ``[rows, cols]`` with ``cols`` divisible by ``m``.
    """
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"N:M pattern {n}:{m} needs in_features divisible by {m}, got {cols}")
    groups = scores.float().reshape(rows, cols // m, m)
    # rank of each score within its group (ties: the lower index ranks lower): elementwise work over m x m
    # pairs, no top-k kernel per group; the m - n lowest ranks are pruned
    a, b = groups.unsqueeze(-1), groups.unsqueeze(-2)  # [.., i, 1] and [.., 1, j]
    before = torch.ones(m, m, dtype=torch.bool, device=groups.device).tril(-1)  # j < i
    rank = ((a > b) | ((a == b) & before)).sum(-1)
    return (rank >= m - n).reshape(rows, cols)


def magnitude_mask(weight: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None) -> torch.Tensor:
    """Magnitude pruning: one threshold over the whole matrix (or N:M groups of |W|)."""
    scores = weight.abs()
    return nm_mask(scores, *nm) if nm else smallest_mask(scores, sparsity)


def wanda_scores(weight: torch.Tensor, input_sq_norm: torch.Tensor) -> torch.Tensor:
    """Wanda score |W_ij| * ||X_j||_2, from the per-input sum of squares ``input_sq_norm`` ``[cols]``."""
    return weight.abs().float() * input_sq_norm.float().sqrt().unsqueeze(0)


def wanda_mask(
    weight: torch.Tensor, input_sq_norm: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None
) -> torch.Tensor:
    """Wanda pruning: scores compared within each output row, every row loses the same fraction."""
    scores = wanda_scores(weight, input_sq_norm)
    return nm_mask(scores, *nm) if nm else row_mask(scores, sparsity)


def achieved_sparsity(mask: torch.Tensor) -> float:
    """Fraction of pruned (``False``) entries."""
    return 1.0 - mask.float().mean().item()
