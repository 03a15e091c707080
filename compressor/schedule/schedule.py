"""Building a sparsity schedule: one pass over the dense model, then an allocator.

Design choice (issue 4): the estimates come from a first pass over the *dense* model, before any
block is pruned. A schedule must be fixed before block 0 is pruned for its weighted mean to hit the
target exactly, and it needs every layer's estimate to place the levels; the sequential pass only
reaches layer l after the layers before it are pruned. The pass costs one block forward per block
plus the Gram matrices and one Cholesky factor per distinct input (no OBS sweep); its time is
reported (``seconds``) beside the pruning time.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from compressor.models.adapters import ModelAdapter, weight_of
from compressor.pruning.sparsegpt import inverse_hessian_factor, output_error
from compressor.pruning.statistics import BlockStatistics
from compressor.schedule.allocate import (
    ScheduleConfig,
    hessian_allocation,
    owl_allocation,
    uniform_allocation,
    weighted_mean,
)
from compressor.schedule.estimate import ErrorCurve, error_curve, outlier_ratio

log = logging.getLogger(__name__)


@dataclass
class LayerEstimate:
    """What the dense pass learned about one prunable linear."""

    block: int
    numel: int
    curve: ErrorCurve | None = None
    outlier_ratio: float | None = None
    output_energy: float | None = None
    """tr(W H W^T) / 2: the layer's mean squared output per token."""
    input_energy: float | None = None
    """Mean squared norm per token of the block's input hidden state."""


@dataclass
class Schedule:
    """Per-layer sparsities chosen by an allocator, with the evidence behind them."""

    allocator: str
    granularity: str
    target: float
    range: tuple[float, float]
    sparsity: dict[str, float]
    mean: float
    units: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    statistics: str = "dense first pass"

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def dense_estimates(model: nn.Module, calib: torch.Tensor, targets_of, config: ScheduleConfig, percdamp: float,
                    batch_size: int, device: torch.device, store: torch.device, progress: bool = True
                    ) -> dict[str, LayerEstimate]:
    """Walk the dense model once; per prunable linear: its E(s) curve (hessian) or outlier ratio (owl).

    ``targets_of(block)`` -> ``{name: linear}`` of the layers the pruner will prune in that block. Several ranks
    (``compressor.distributed``): each runs its share of ``calib``; statistics and energies are summed over ranks.
    """
    from tqdm.auto import tqdm

    from compressor.distributed import current
    from compressor.sequential import capture_block_inputs, run_block

    adapter = ModelAdapter(model)
    group = current()
    calib = group.shard(calib)
    stream = capture_block_inputs(model, adapter, calib, batch_size, device, store)
    gram = config.allocator == "hessian" or config.dry_run
    out: dict[str, LayerEstimate] = {}
    for i in tqdm(range(len(adapter.blocks)), desc="schedule: dense statistics", unit="block", disable=not progress):
        block = adapter.blocks[i]
        home = next(block.parameters()).device
        block.to(device)
        targets = targets_of(block)
        tokens = sum(b.shape[0] * b.shape[1] for b in stream.batches)
        energy = sum(b.to(device).float().square().sum().item() for b in stream.batches)
        tokens, energy = group.all_reduce_sum([tokens, energy])
        input_energy = energy / max(tokens, 1)
        with BlockStatistics(targets, gram=gram) as stats:
            outputs = run_block(block, stream, device, on_batch=stats.end_batch)
        for acc in stats.accumulators.values():  # in the order of the first batch's hooks: the same on every rank
            group.reduce_statistics(acc)
        factors = {}
        for name, module in targets.items():
            full = f"{adapter.block_path}.{i}.{name}"
            w = weight_of(module)
            est = LayerEstimate(block=i, numel=w.numel(), input_energy=input_energy)
            if gram:
                est.output_energy = output_error(w, torch.zeros_like(w), stats.of(name).hessian)
                owner = stats.owner[name]
                if owner not in factors:
                    upper, dead, _ = inverse_hessian_factor(stats.of(name).hessian, percdamp)
                    factors[owner] = (upper, dead)
                est.curve = error_curve(w, None, factor=factors[owner])
            if config.granularity == "layer":
                est.outlier_ratio = outlier_ratio([w], [stats.of(name).column_sq_norm], config.owl_threshold)
            out[full] = est
        if config.granularity == "block":
            ratio = outlier_ratio([weight_of(m) for m in targets.values()],
                                  [stats.of(n).column_sq_norm for n in targets], config.owl_threshold)
            for name in targets:
                out[f"{adapter.block_path}.{i}.{name}"].outlier_ratio = ratio
        stream.batches = outputs
        block.to(home)
    return out


def allocate(estimates: dict[str, LayerEstimate], config: ScheduleConfig, target: float) -> Schedule:
    """Group layers into units (blocks or layers), run the allocator, expand back to layers."""
    lo, hi = config.sparsity_range(target)
    if not estimates:  # nothing prunable (pruning.skip covers every layer)
        return Schedule(config.allocator, config.granularity, target, (lo, hi), {}, target)
    units: dict[str, list[str]] = {}
    for name, est in estimates.items():
        key = f"block {est.block}" if config.granularity == "block" else name
        units.setdefault(key, []).append(name)
    keys = list(units)
    weights = [float(sum(estimates[n].numel for n in units[k])) for k in keys]
    has_curves = all(e.curve is not None for e in estimates.values())
    err_target = [sum(estimates[n].curve.at(target) for n in units[k]) for k in keys] if has_curves else None
    compared = err_target
    if has_curves and config.normalize == "output":
        compared = [e / max(sum(estimates[n].output_energy for n in units[k]), 1e-30) for e, k in zip(err_target, keys)]
    elif has_curves and config.normalize == "residual":
        compared = [e / max(estimates[units[k][0]].input_energy, 1e-30) for e, k in zip(err_target, keys)]
    levels = None
    if config.allocator == "uniform":
        chosen = uniform_allocation(weights, target)
    elif config.allocator == "owl":
        ratios = [estimates[units[k][0]].outlier_ratio for k in keys]
        chosen = owl_allocation(ratios, weights, target, config.owl_lambda)
    else:
        chosen, levels = hessian_allocation(compared, weights, target, lo, hi, config.level_step)
    sparsity = {n: s for k, s in zip(keys, chosen) for n in units[k]}
    rows = []
    for j, k in enumerate(keys):
        row = {"unit": k, "layers": len(units[k]), "parameters": int(weights[j]), "sparsity": chosen[j]}
        if has_curves:
            if config.normalize != "none":
                row[f"compared_error_{config.normalize}"] = compared[j]
            row["est_error_at_target"] = err_target[j]
            row["est_error_at_sparsity"] = sum(estimates[n].curve.at(chosen[j]) for n in units[k])
        if estimates[units[k][0]].outlier_ratio is not None:
            row["outlier_ratio"] = estimates[units[k][0]].outlier_ratio
        if levels is not None:
            row["level"] = levels[j]
        rows.append(row)
    return Schedule(config.allocator, config.granularity, target, (lo, hi), sparsity,
                    weighted_mean(chosen, weights), rows)


def schedule_table(schedule: Schedule):
    """A rich Table of the schedule, one row per unit."""
    from rich.table import Table

    table = Table(title=f"sparsity schedule: {schedule.allocator} per {schedule.granularity}, target "
                        f"{schedule.target:g}, range [{schedule.range[0]:.3f}, {schedule.range[1]:.3f}], "
                        f"weighted mean {schedule.mean:.4f}")
    cols = ["unit", "parameters", "sparsity"]
    extra = [c for c in ("level", "outlier_ratio", "est_error_at_target", "est_error_at_sparsity")
             if schedule.units and c in schedule.units[0]]
    for c in cols + extra:
        table.add_column(c.replace("_", " "), justify="left" if c == "unit" else "right")
    for row in schedule.units:
        cells = [row["unit"], f"{row['parameters']:,}", f"{row['sparsity']:.4f}"]
        for c in extra:
            v = row[c]
            cells.append(str(v) if c == "level" else f"{v:.4g}")
        table.add_row(*cells)
    return table


def plot_schedule(schedule: Schedule, path) -> None:
    """Chosen sparsity per unit (bars) and estimated error at the target and at the chosen sparsity (log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from compressor.io import atomic_write

    rows = schedule.units
    x = range(len(rows))
    has_err = rows and "est_error_at_target" in rows[0]
    fig, axes = plt.subplots(2 if has_err else 1, 1, figsize=(max(8, len(rows) * 0.12), 6 if has_err else 3.5),
                             sharex=True, squeeze=False)
    ax = axes[0][0]
    ax.bar(x, [r["sparsity"] for r in rows], width=0.9, color="tab:blue")
    ax.axhline(schedule.target, color="tab:red", ls="--", lw=1, label=f"target {schedule.target:g}")
    ax.set_ylim(max(0.0, schedule.range[0] - 0.05), min(1.0, schedule.range[1] + 0.05))
    ax.set_ylabel("sparsity")
    ax.set_title(f"{schedule.allocator} schedule per {schedule.granularity} (weighted mean {schedule.mean:.4f})")
    ax.legend()
    if has_err:
        ax = axes[1][0]
        ax.plot(x, [r["est_error_at_target"] for r in rows], marker=".", label="at the target (uniform)")
        ax.plot(x, [r["est_error_at_sparsity"] for r in rows], marker=".", label="at the scheduled sparsity")
        ax.set_yscale("log")
        ax.set_ylabel("estimated error E(s)")
        ax.legend()
    axes[-1][0].set_xlabel(schedule.granularity + " (model order)")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def build_schedule(model: nn.Module, calib: torch.Tensor, config: ScheduleConfig, pruning, batch_size: int,
                   device: torch.device, store: torch.device, progress: bool = True) -> Schedule:
    """The dense pass plus the allocator, timed."""
    t = time.perf_counter()
    adapter = ModelAdapter(model)

    def targets_of(block):
        return {n: m for n, m in adapter.linears(block).items() if not any(n.endswith(s) for s in pruning.skip)}

    estimates = dense_estimates(model, calib, targets_of, config, pruning.percdamp, batch_size, device, store,
                                progress)
    schedule = allocate(estimates, config, pruning.target_sparsity)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    schedule.seconds = time.perf_counter() - t
    log.info("schedule %s per %s: weighted mean %.5f, %.1fs", config.allocator, config.granularity, schedule.mean,
             schedule.seconds)
    return schedule
