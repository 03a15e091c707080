"""The prune stage: the sequential walk (statistics, masks, reconstruction, INT4 weights), its report and files.

Configured by the ``pruning``, ``schedule``, ``reconstruction`` and ``quantization`` groups; it runs when
it changes something (sparsity above 0, reconstruction or weight quantization). Checkpoints: one per
finished block (``BlockCheckpoints``), loaded instead of redone on resume. Files: ``masks.safetensors``,
``quantized.safetensors`` (packed INT4), ``schedule.json``, ``sparsity.png`` and ``block_error.png``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import torch

from compressor.distributed import current
from compressor.io import atomic_write, atomic_write_json
from compressor.models.adapters import ModelAdapter
from compressor.quant.int4 import QuantizationConfig, bits_per_weight
from compressor.report import plot_block_error, plot_sparsity
from compressor.schedule.schedule import Schedule, build_schedule, plot_schedule
from compressor.sequential import SequentialPruner, choose_store_device
from compressor.stages import RunContext

log = logging.getLogger("compressor")


def make_schedule(settings, model, calib: torch.Tensor, device: torch.device, out: Path, progress: bool) -> Schedule:
    """The dense statistics pass and the allocator; the schedule is written to schedule.json (+ png)."""
    hidden = getattr(model.config, "hidden_size", None) or model.config.n_embd
    need = 2 * calib.numel() * hidden * torch.finfo(model.dtype).bits // 8
    store = choose_store_device(need, device, settings.runtime.activations)
    schedule = build_schedule(model, calib, settings.schedule, settings.pruning, settings.runtime.batch_size, device,
                              store, progress)
    group = current()
    if group.distributed:  # every rank measured the same windows; rank 0's levels are the ones all follow
        schedule.sparsity = group.broadcast_object(schedule.sparsity)
    if group.is_main:
        atomic_write_json(out / "schedule.json", schedule.to_dict())
        if settings.output.plots:
            plot_schedule(schedule, out / "schedule.png")
    return schedule


def quantization_summary(cfg: QuantizationConfig, pruner: SequentialPruner, blocks) -> dict | None:
    """Bits per weight (values, scales, mask) over the quantized layers, and the per-layer output error."""
    if not cfg.enabled:
        return None
    numel = kept = groups = 0
    for name, mask in pruner.masks.items():
        if f"{name}.scales" in pruner.quantized:
            numel += mask.numel()
            kept += int(mask.sum())
            groups += pruner.quantized[f"{name}.scales"].numel()
    errors = {f"{b.index}.{n}": e for b in blocks for n, e in b.quant_error.items()}
    return {"method": cfg.method, "bits": cfg.bits, "group_size": cfg.group_size, "clip": cfg.clip,
            "symmetric": cfg.symmetric,
            "act_order": cfg.act_order if cfg.method == "gptq" else None, "joint": pruner.joint,
            "bits_per_weight": bits_per_weight(numel, kept, groups, cfg.bits),
            "output_error_total": sum(errors.values()) if errors else None, "layer_output_error": errors}


class PruneStage:
    name = "prune"

    def __init__(self):
        self.pruner: SequentialPruner | None = None

    def enabled(self, settings) -> bool:
        return (settings.pruning.target_sparsity > 0 or settings.reconstruction.enabled
                or settings.quantization.enabled)

    def run(self, ctx: RunContext) -> dict:
        s = ctx.settings
        schedule = None
        if s.schedule.needs_statistics:
            schedule = make_schedule(s, ctx.model, ctx.calib, ctx.device, ctx.out, ctx.progress)
            ctx.timings["schedule"] = schedule.seconds
        cp = ctx.checkpoints
        if cp is not None and schedule is not None:
            cp.schedule = schedule.sparsity
            if ctx.finished and cp.saved_schedule and cp.saved_schedule != schedule.sparsity:
                # the finished blocks followed the saved schedule: keep it (the dense pass may differ in the last
                # bits on another machine and cross a level boundary)
                log.warning("the recomputed schedule differs from the one the finished blocks used: keeping the saved")
                schedule.sparsity = cp.schedule = cp.saved_schedule
        self.pruner = pruner = SequentialPruner(
            ctx.model, s.pruning, s.runtime, ctx.device, sparsity_map=schedule.sparsity if schedule else None,
            reconstruction=s.reconstruction, log_dir=ctx.out / "logs", accelerator=ctx.accelerator,
            quantization=s.quantization)
        blocks = pruner.run(ctx.calib, ctx.heldout, progress=ctx.progress, recon_calib=ctx.recon_calib,
                            checkpoints=cp, finished=ctx.finished,
                            on_block=lambda r: log.info("block %d: %.2fs rel_err calib %s held-out %s", r.index,
                                                        r.seconds, r.calib_rel_error, r.heldout_rel_error))
        adapter = ModelAdapter(ctx.model)
        per_layer = {f"{adapter.block_path}.{b.index}.{n}": v for b in blocks for n, v in b.sparsity.items()}
        pruned_params = sum(m.numel() for m in pruner.masks.values())
        achieved = 1 - sum(int(m.sum()) for m in pruner.masks.values()) / max(pruned_params, 1)
        dense_zeros = sum(ctx.dense.get("linear_zeros", {}).get(n, 0) for n in pruner.masks)
        ctx.artifacts[self.name] = {"masks": pruner.masks, "quantized": pruner.quantized}
        return {
            "pruning": {"method": s.pruning.method, "pattern": s.pruning.label,
                        "reconstruction": s.reconstruction.mode, "schedule": s.schedule.allocator},
            "schedule": schedule.to_dict() if schedule else None,
            "quantization": quantization_summary(s.quantization, pruner, blocks),
            "sparsity": {"target": s.pruning.target_sparsity, "achieved": achieved,
                         "dense": dense_zeros / max(pruned_params, 1),
                         "pruned_parameters": pruned_params, "per_layer": per_layer},
            "blocks": [asdict(b) for b in blocks],
        }

    def save(self, ctx: RunContext, report: dict) -> dict[str, str]:
        from safetensors.torch import save_file

        s, out, outputs = ctx.settings, ctx.out, {}
        masks, quantized = self.pruner.masks, self.pruner.quantized
        if s.output.save_masks and masks:
            contiguous = {k: v.contiguous() for k, v in masks.items()}
            outputs["masks"] = str(atomic_write(out / "masks.safetensors", lambda tmp: save_file(contiguous, tmp)))
        if quantized:
            from compressor.quant.pack import pack_layer

            packed = {}
            for name, mask in masks.items():
                if f"{name}.codes" in quantized:
                    layer = pack_layer(quantized[f"{name}.codes"], mask, quantized[f"{name}.scales"],
                                       quantized[f"{name}.zeros"])
                    packed.update({f"{name}.{k}": v for k, v in layer.items()})
            meta = {"group_size": str(s.quantization.group_size), "bits": str(s.quantization.bits)}
            path = atomic_write(out / "quantized.safetensors", lambda tmp: save_file(packed, tmp, metadata=meta))
            outputs["quantized"] = str(path)
            report["quantization"]["file_bytes"] = path.stat().st_size
        if s.output.plots:
            outputs["sparsity_plot"] = str(plot_sparsity(report["sparsity"]["per_layer"], out / "sparsity.png",
                                                         report["sparsity"]["target"]))
            err = plot_block_error(report["blocks"], out / "block_error.png")
            if err:
                outputs["error_plot"] = str(err)
        return outputs
