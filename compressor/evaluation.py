"""Perplexity over non-overlapping windows, as a torchmetrics metric (sums reduce across devices)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchmetrics import Metric


class WindowPerplexity(Metric):
    """exp(mean next-token cross-entropy over all predicted positions), accumulated in fp64 sums."""

    full_state_update = False
    higher_is_better = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("nll_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, ids: torch.Tensor) -> None:
        """``logits`` ``[batch, seqlen, vocab]`` predicting ``ids`` ``[batch, seqlen]`` shifted by one."""
        pred = logits[:, :-1].float().reshape(-1, logits.shape[-1])
        target = ids[:, 1:].reshape(-1).to(pred.device)
        self.nll_sum += F.cross_entropy(pred, target, reduction="sum").double()
        self.count += target.numel()

    def compute(self) -> torch.Tensor:
        return torch.exp(self.nll_sum / self.count)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, device, batch_size: int = 1, progress: bool = True,
               desc: str = "perplexity", prefix=None) -> float:
    """Perplexity of ``model`` (moved to ``device``) over ``windows`` ``[k, seqlen]``.

    ``prefix`` (a ``compressor.cushion.prefix.Prefix``): each window runs after the prefix's keys/values, its
    positions shifted by the prefix length; only the window's own tokens are predicted and counted.

    Several ranks (``compressor.distributed``): each measures its share of the windows and the metric's sums
    (NLL, token count) are reduced across ranks when it is computed, so every rank returns the same value.
    """
    from tqdm.auto import tqdm

    from compressor.cushion.prefix import prefixed_inputs
    from compressor.distributed import current

    windows = current().shard(windows)

    model.to(device)
    if prefix is not None:
        prefix = prefix.to(device, next(model.parameters()).dtype)
    metric = WindowPerplexity().to(device)
    for start in tqdm(range(0, windows.shape[0], batch_size), desc=desc, unit="batch", disable=not progress):
        ids = windows[start : start + batch_size].to(device)
        kwargs = prefixed_inputs(prefix, ids)
        kwargs.setdefault("use_cache", False)
        logits = model(**kwargs).logits
        metric.update(logits, ids)
    value = metric.compute().item()
    return value if math.isfinite(value) else float("inf")
