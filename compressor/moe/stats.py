"""G-MoEfication's statistics, pure tensor math (algorithms.md section 5).

``a`` is the activation entering the down projection, ``[tokens, d_ff]``; ``mu`` its per-neuron mean
over the calibration tokens. A router is taught, per token, which experts' neurons move furthest
from their mean: ``s_e = sum_{i in e} (a_i - mu_i)^2``; replacing an unselected neuron by ``mu_i``
costs exactly that expert's share of ``||a - mu||^2`` before the down projection.

The reference computes ``s`` from a re-run of the FFN on normalised inputs without bias while ``mu``
comes from the real activations (inconsistent for GELU MLPs); here both come from the real ``a``.
"""

from __future__ import annotations

import math

import torch


class MeanAccumulator:
    """Per-neuron mean of ``a`` over all tokens seen, summed in fp64."""

    def __init__(self):
        self.total: torch.Tensor | None = None
        self.count = 0

    def update(self, a: torch.Tensor) -> None:
        """``a`` ``[..., d_ff]``."""
        flat = a.reshape(-1, a.shape[-1])
        s = flat.sum(0, dtype=torch.float64)
        self.total = s if self.total is None else self.total + s
        self.count += flat.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        """``mu`` ``[d_ff]`` fp32."""
        if self.total is None:
            raise ValueError("no activations were recorded")
        return (self.total / self.count).float()


def expert_sums(values: torch.Tensor, assignment: torch.Tensor, experts: int) -> torch.Tensor:
    """``values`` ``[n, d_ff]`` summed over each expert's neurons: ``[n, experts]``."""
    out = values.new_zeros(values.shape[0], experts)
    return out.index_add_(1, assignment.to(values.device), values)


def expert_targets(a: torch.Tensor, mu: torch.Tensor, assignment: torch.Tensor, experts: int,
                   absolute: bool = False) -> torch.Tensor:
    """Router targets before normalisation, ``s`` ``[n, experts]`` fp32: per expert the sum over its neurons of
    ``(a_i - mu_i)^2`` (``|a_i - mu_i|`` with ``absolute``)."""
    dev = a.float() - mu.to(a.device).float()
    return expert_sums(dev.abs() if absolute else dev.square(), assignment, experts)


def normalise_targets(s: torch.Tensor, mode: str = "batch") -> torch.Tensor:
    """Targets in [0, 1] for BCE: ``s`` ``[n, E]`` divided by the batch maximum (``"batch"``, as the reference does) or
    each token's row by its own maximum (``"token"``: a few outlier tokens then do not flatten every other target)."""
    tiny = torch.finfo(s.dtype).tiny
    if mode == "token":
        return s / s.amax(dim=-1, keepdim=True).clamp_min(tiny)
    return s / s.max().clamp_min(tiny)


def target_recall(logits: torch.Tensor, s: torch.Tensor, top: float = 0.2) -> float:
    """Share of the target mass ``sum s`` that falls in each token's ``ceil(top * E)`` highest-scored experts
    (``logits`` and ``s`` ``[n, E]``). 1.0: the router picks the experts that matter; ``top``: chance level
    when mass is spread evenly."""
    q = max(1, math.ceil(top * logits.shape[-1]))
    idx = logits.topk(q, dim=-1).indices
    picked = s.gather(-1, idx).sum()
    return float(picked / s.sum().clamp_min(torch.finfo(s.dtype).tiny))


def expert_bias(w_out: torch.Tensor, mu: torch.Tensor, assignment: torch.Tensor, experts: int) -> torch.Tensor:
    """Each expert's output when all its neurons sit at their mean, ``B`` ``[experts, d]`` fp32:
    ``B_e = sum_{i in e} W_out[:, i] mu_i``. Unselected experts add ``sum_{e unselected} B_e``."""
    scaled = w_out.float() * mu.to(w_out.device).float()  # [d, d_ff]
    return expert_sums(scaled, assignment.to(w_out.device), experts).t().contiguous()


def ffn_flops_fraction(d: int, d_ff: int, experts: int, k: int, gated: bool, router: bool = True) -> float:
    """Multiply-adds per token of the converted FFN (k experts + router ``d*E + E*E``) over the dense FFN's."""
    mats = 3 if gated else 2
    dense = mats * d * d_ff
    moe = mats * d * (d_ff // experts) * k + ((d * experts + experts * experts) if router else 0)
    return moe / dense
