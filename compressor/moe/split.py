"""Experts as balanced clusters of neurons (MoEfication's parameter clustering, as G-MoEfication uses it).

Each neuron's input weight row (the gate row for SwiGLU, as LLaMA-MoE's clustering split does; the
first matrix's row for GELU MLPs) is L2-normalised and the rows are clustered by k-means with every
cluster holding exactly ``d_ff / E`` rows (``k-means-constrained``: Lloyd steps whose assignment is a
min-cost flow). Pure math on one weight matrix; runs on the CPU.
"""

from __future__ import annotations

import numpy as np
import torch


def balanced_split(w_in: torch.Tensor, experts: int, seed: int = 0,
                   max_iter: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``d_ff`` neurons into ``experts`` equal clusters of their L2-normalised rows ``w_in`` ``[d_ff, d]``.

    Returns ``(assignment, centroids)``: ``assignment`` ``[d_ff]`` int64 in ``[0, experts)`` with every expert
    exactly ``d_ff / experts`` times, ``centroids`` ``[experts, d]`` fp32 (means of the normalised rows).
    Seeded (k-means++ start from ``seed``, one start). Raises ValueError when ``experts`` does not divide ``d_ff``.
    """
    from k_means_constrained import KMeansConstrained

    d_ff = w_in.shape[0]
    if d_ff % experts:
        raise ValueError(f"{experts} experts do not divide {d_ff} neurons")
    size = d_ff // experts
    rows = torch.nn.functional.normalize(w_in.detach().double().cpu(), dim=1).numpy()
    if experts == 1:
        return torch.zeros(d_ff, dtype=torch.long), torch.from_numpy(rows.mean(0, keepdims=True)).float()
    if size == 1:  # one neuron per expert: nothing to cluster
        return torch.arange(d_ff), torch.from_numpy(rows).float()
    km = KMeansConstrained(n_clusters=experts, size_min=size, size_max=size, random_state=seed, n_init=1,
                           max_iter=max_iter)
    labels = km.fit_predict(rows)
    return torch.from_numpy(np.asarray(labels, dtype=np.int64)), torch.from_numpy(km.cluster_centers_).float()


def expert_order(assignment: torch.Tensor) -> torch.Tensor:
    """Neuron indices grouped by expert (expert 0's neurons first, ascending within an expert): ``[d_ff]``."""
    return torch.sort(assignment, stable=True).indices


def check_assignment(assignment: torch.Tensor, experts: int) -> None:
    """ValueError unless ``assignment`` gives every one of ``experts`` the same number of neurons."""
    counts = torch.bincount(assignment, minlength=experts)
    if counts.numel() != experts or counts.min() != counts.max() or assignment.min() < 0:
        raise ValueError(f"assignment is not a balanced split into {experts} experts: sizes {counts.tolist()}")
