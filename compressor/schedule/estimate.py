"""Per-layer pruning-error estimates, pure tensor math (algorithms.md section 3).

``error_curve``: E_l(s) = 1/2 * sum over the pruned set of w^2 / [U_qq]^2, the OBS saliency along
SparseGPT's column order (U the upper Cholesky factor of the damped H^-1, the same factor SparseGPT
uses). Pruning the s-fraction with the smallest saliencies, the whole curve over s comes from one
sort and one prefix sum.

``outlier_ratio``: OWL's layer-outlier measure, the fraction of Wanda scores |W_ij| * ||X_j|| above
``threshold`` times their mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compressor.pruning.masks import wanda_scores
from compressor.pruning.sparsegpt import inverse_hessian_factor


@dataclass
class ErrorCurve:
    """E(s) of one layer at ``s = k / (len(values) - 1)``, k = 0..points; ``numel`` weights."""

    values: list[float]
    numel: int

    def at(self, sparsity: float) -> float:
        """E at any sparsity in [0, 1], linearly interpolated between grid points."""
        points = len(self.values) - 1
        x = min(max(sparsity, 0.0), 1.0) * points
        lo = min(int(x), points - 1)
        frac = x - lo
        return self.values[lo] * (1 - frac) + self.values[lo + 1] * frac


def obs_saliency(weight: torch.Tensor, upper: torch.Tensor, dead: torch.Tensor | None = None) -> torch.Tensor:
    """w^2 / [U_qq]^2 for every weight of ``weight`` ``[rows, cols]``; ``upper`` ``[cols, cols]``."""
    w = weight.float()
    if dead is not None and dead.any():
        w = w.clone()
        w[:, dead] = 0.0
    return w.square() / torch.diag(upper).square().unsqueeze(0)


def curve_from_saliency(saliency: torch.Tensor, points: int = 1000) -> ErrorCurve:
    """Sort once, prefix-sum once, sample E at ``points + 1`` evenly spaced sparsities."""
    flat = torch.sort(saliency.flatten().double()).values
    prefix = torch.cat([flat.new_zeros(1), torch.cumsum(flat, 0)])
    n = flat.numel()
    k = torch.round(torch.linspace(0, 1, points + 1, dtype=torch.float64) * n).long().to(prefix.device)
    return ErrorCurve((0.5 * prefix[k]).cpu().tolist(), n)


def error_curve(weight: torch.Tensor, hessian: torch.Tensor, percdamp: float = 0.01, points: int = 1000,
                factor: tuple[torch.Tensor, torch.Tensor] | None = None) -> ErrorCurve:
    """E_l(s) for ``weight`` ``[rows, cols]`` given its input Hessian ``[cols, cols]``.

    ``factor``: a precomputed ``(U, dead)`` from ``inverse_hessian_factor`` (layers sharing an input share it).
    """
    if factor is None:
        upper, dead, _ = inverse_hessian_factor(hessian.to(weight.device), percdamp)
    else:
        upper, dead = factor
    return curve_from_saliency(obs_saliency(weight, upper, dead), points)


def outlier_ratio(weights: list[torch.Tensor], input_sq_norms: list[torch.Tensor], threshold: float = 5.0) -> float:
    """Fraction of Wanda scores, over all given layers together, above ``threshold`` x their mean."""
    scores = [wanda_scores(w, n) for w, n in zip(weights, input_sq_norms)]
    total = sum(s.sum().item() for s in scores)
    count = sum(s.numel() for s in scores)
    cut = threshold * total / max(count, 1)
    return sum((s > cut).sum().item() for s in scores) / max(count, 1)
