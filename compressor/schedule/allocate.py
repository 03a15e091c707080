"""Sparsity allocators: how a target sparsity is spread over layers (algorithms.md section 3).

Pure functions over plain numbers. A *unit* is what gets one sparsity: a decoder block (all its
pruned linears alike) or a single linear layer. Every allocator returns sparsities whose
parameter-weighted mean equals the target (up to float round-off) and that lie in its range.

- ``uniform``: every unit at the target.
- ``owl``: outlier-weighted (OWL, Yin et al. 2024): a unit's outlier ratio D, min-max scaled to
  [0, 2*lambda], lowers its sparsity: s = target - (D_scaled - mean D_scaled), range target +- lambda.
- ``hessian``: log-level clustering of the estimated error at the target, level
  k = floor(log10 E / step); the levels, highest error first, get sparsities spread evenly from
  min_sparsity to max_sparsity; then one shift (with clipping) makes the weighted mean exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from compressor.config import ConfigError

ALLOCATORS = ("uniform", "owl", "hessian")
GRANULARITIES = ("block", "layer")
NORMALIZE = ("none", "output", "residual")


@dataclass
class ScheduleConfig:
    """Layer-wise sparsity schedule: how pruning.sparsity is spread over blocks or layers."""

    allocator: str = "uniform"
    """uniform (same sparsity everywhere), owl (outlier-weighted, for comparison) or hessian (inverse-Hessian
    error estimate with log-level clustering)."""
    granularity: str = "block"
    """block (one sparsity per decoder block) or layer (one per linear layer)."""
    min_sparsity: float | None = None
    """Lowest sparsity the hessian allocator may give (default: target - spread)."""
    max_sparsity: float | None = None
    """Highest sparsity the hessian allocator may give (default: target + spread)."""
    spread: float = 0.1
    """Half-width of the hessian allocator's default range around the target."""
    level_step: float = 0.5
    """Width of one error level in decades (log10) for the hessian allocator."""
    normalize: str = "residual"
    """What the hessian allocator compares: none (E(s) as estimated, the output error in absolute units),
    output (E(s) over the layer's output energy tr(W H W^T)/2: the fraction of its output lost) or residual
    (E(s) over the mean squared norm of the block's input hidden state: the perturbation of the residual stream)."""
    owl_threshold: float = 5.0
    """OWL's M: a Wanda score above M x the mean score counts as an outlier."""
    owl_lambda: float = 0.08
    """OWL's lambda: sparsities stay within target +- lambda."""
    dry_run: bool = False
    """Compute and print the schedule (dense statistics pass only), write schedule.json and schedule.png, and stop
    before pruning."""

    def __post_init__(self):
        if self.allocator not in ALLOCATORS:
            raise ConfigError(f"schedule.allocator={self.allocator!r} is unknown: choose one of {', '.join(ALLOCATORS)}")
        if self.granularity not in GRANULARITIES:
            raise ConfigError(f"schedule.granularity={self.granularity!r}: choose one of {', '.join(GRANULARITIES)}")
        for name in ("min_sparsity", "max_sparsity"):
            v = getattr(self, name)
            if v is not None and not 0.0 <= v < 1.0:
                raise ConfigError(f"schedule.{name}={v} is outside [0, 1)")
        if self.min_sparsity is not None and self.max_sparsity is not None and self.min_sparsity > self.max_sparsity:
            raise ConfigError(f"schedule.min_sparsity={self.min_sparsity} is above max_sparsity={self.max_sparsity}")
        if not 0.0 <= self.spread < 1.0 or not 0.0 <= self.owl_lambda < 1.0:
            raise ConfigError(f"schedule.spread={self.spread} and owl_lambda={self.owl_lambda} must be in [0, 1)")
        if self.normalize not in NORMALIZE:
            raise ConfigError(f"schedule.normalize={self.normalize!r}: choose one of {', '.join(NORMALIZE)}")
        if not self.level_step > 0 or not self.owl_threshold > 0:
            raise ConfigError(f"schedule.level_step={self.level_step} and owl_threshold={self.owl_threshold} "
                              "must be > 0")

    @property
    def needs_statistics(self) -> bool:
        return self.allocator != "uniform" or self.dry_run

    def sparsity_range(self, target: float) -> tuple[float, float]:
        """(lowest, highest) sparsity the allocator may give at ``target``."""
        half = self.owl_lambda if self.allocator == "owl" else self.spread
        lo = self.min_sparsity if self.min_sparsity is not None and self.allocator == "hessian" else target - half
        hi = self.max_sparsity if self.max_sparsity is not None and self.allocator == "hessian" else target + half
        return max(lo, 0.0), min(hi, 0.99)

    def check(self, target: float, nm: tuple[int, int] | None) -> None:
        """Checks that need the pruning config: N:M fixes sparsity; the target must lie in the range."""
        if self.allocator == "uniform":
            return
        if nm is not None:
            raise ConfigError(f"schedule.allocator={self.allocator!r} needs unstructured pruning: an N:M pattern "
                              f"({nm[0]}:{nm[1]}) fixes every layer's sparsity; use allocator 'uniform'")
        lo, hi = self.sparsity_range(target)
        if not lo <= target <= hi:
            raise ConfigError(f"pruning.sparsity={target} is outside the schedule's range [{lo}, {hi}]: widen "
                              "schedule.min_sparsity / max_sparsity")


def weighted_mean(values: list[float], weights: list[float]) -> float:
    return sum(v * w for v, w in zip(values, weights)) / sum(weights)


def match_mean(values: list[float], weights: list[float], target: float, lo: float, hi: float) -> list[float]:
    """Shift all values by one delta, clipped to [lo, hi], so the weighted mean equals ``target`` (bisection)."""
    if not lo <= target <= hi:
        raise ValueError(f"target {target} outside [{lo}, {hi}]")

    def mean_at(delta: float) -> float:
        return weighted_mean([min(max(v + delta, lo), hi) for v in values], weights)

    a, b = lo - max(values), hi - min(values)  # mean_at(a) == lo, mean_at(b) == hi
    for _ in range(200):
        mid = 0.5 * (a + b)
        if mean_at(mid) < target:
            a = mid
        else:
            b = mid
    return [min(max(v + 0.5 * (a + b), lo), hi) for v in values]


def uniform_allocation(weights: list[float], target: float) -> list[float]:
    return [target] * len(weights)


def owl_allocation(ratios: list[float], weights: list[float], target: float, lam: float) -> list[float]:
    """Higher outlier ratio -> lower sparsity, within target +- lam, weighted mean = target."""
    lo, hi = min(ratios), max(ratios)
    scaled = [(r - lo) / (hi - lo) * 2 * lam if hi > lo else 0.0 for r in ratios]
    mean = sum(scaled) / len(scaled)
    raw = [target - (d - mean) for d in scaled]
    return match_mean(raw, weights, target, max(target - lam, 0.0), min(target + lam, 0.99))


def error_levels(errors: list[float], step: float) -> list[int]:
    """Log-level of each error: floor(log10 E / step); zero errors share the lowest level."""
    logs = [math.log10(e) / step if e > 0 else None for e in errors]
    floor = min((x for x in logs if x is not None), default=0.0)
    return [math.floor(x if x is not None else floor) for x in logs]


def hessian_allocation(errors: list[float], weights: list[float], target: float, lo: float, hi: float,
                       step: float) -> tuple[list[float], list[int]]:
    """Sparsity per unit from its estimated error at the target; returns ``(sparsities, levels)``."""
    levels = error_levels(errors, step)
    distinct = sorted(set(levels), reverse=True)  # highest error first -> lowest sparsity
    if len(distinct) == 1:
        return uniform_allocation(weights, target), levels
    rank = {k: i for i, k in enumerate(distinct)}
    raw = [lo + (hi - lo) * rank[k] / (len(distinct) - 1) for k in levels]
    return match_mean(raw, weights, target, lo, hi), levels
