"""One entry point over the pruning criteria: weight + input statistics + config -> (new weight, mask)."""

from __future__ import annotations

import torch

from compressor.config import PruningConfig
from compressor.pruning.masks import magnitude_mask, wanda_mask
from compressor.pruning.sparsegpt import sparsegpt_prune_shared
from compressor.pruning.statistics import InputStatistics


def needs_statistics(method: str) -> str | None:
    """'gram' (full input Gram matrix), 'norm' (column norms) or None (no calibration pass)."""
    return {"sparsegpt": "gram", "wanda": "norm", "magnitude": None}[method]


def prune_weight(
    weight: torch.Tensor, stats: InputStatistics | None, cfg: PruningConfig, sparsity: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune an ``[out, in]`` weight; returns ``(new_weight fp32, keep_mask bool)``.

    ``sparsity`` overrides ``cfg.sparsity`` (per-layer schedules); N:M patterns ignore it.
    """
    s = cfg.sparsity if sparsity is None else sparsity
    nm = cfg.nm
    w = weight.detach().float().contiguous()
    if cfg.method == "magnitude":
        mask = magnitude_mask(w, s, nm)
        return w * mask, mask
    if cfg.method == "wanda":
        mask = wanda_mask(w, stats.column_sq_norm, s, nm)
        return w * mask, mask
    return sparsegpt_prune_shared([w], stats.hessian, s, nm, cfg.blocksize, cfg.percdamp, cfg.act_order)[0]


def prune_shared(
    weights: list[torch.Tensor], stats: InputStatistics | None, cfg: PruningConfig, sparsities: list[float | None],
    hessian: torch.Tensor | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Prune weights that read one input (q/k/v, gate/up): SparseGPT factors the Hessian (``hessian``, else
    the one of ``stats``) once and sweeps them stacked; the other criteria prune each weight on its own.
    Results as :func:`prune_weight`'s."""
    if cfg.method != "sparsegpt":
        return [prune_weight(w, stats, cfg, s) for w, s in zip(weights, sparsities)]
    s = [cfg.sparsity if x is None else x for x in sparsities]
    ws = [w.detach().float() for w in weights]
    h = stats.hessian if hessian is None else hessian
    return sparsegpt_prune_shared(ws, h, s, cfg.nm, cfg.blocksize, cfg.percdamp, cfg.act_order)
