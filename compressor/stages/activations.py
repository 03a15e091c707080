"""The activations stage: W8A8 (``model.activations``), simulated, after every stage that changes weights.

Calibrates on the run's calibration windows through the block walk (``compressor.quant.w8a8.calibrate``),
leaves the model with 8-bit weights and input quantizers hooked in, so the run's final perplexity is the
W8A8 model's. Checkpoint: the whole stage (``stage_activations.safetensors`` in the manifest), keyed by its
own config, the pruning checkpoints' config and the data; a rerun loads it instead of calibrating again.
File: ``activations.safetensors`` in the model folder (``validate`` applies it), or in the output folder
when the model is not saved.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict

import torch

from compressor.checkpoint import digest
from compressor.quant.w8a8 import FILE, W8A8, calibrate
from compressor.sequential import choose_store_device
from compressor.stages import RunContext

log = logging.getLogger("compressor")


class ActivationsStage:
    name = "activations"

    def __init__(self):
        self.state: W8A8 | None = None

    def enabled(self, settings) -> bool:
        return settings.activations.enabled

    def run(self, ctx: RunContext) -> dict:
        cfg, cp = ctx.settings.activations, ctx.checkpoints
        # its own config, what the stages before it were given (pruning's checkpoints hash, the groups of
        # the stages between), and the data
        between = {k: v for k, v in asdict(ctx.settings).items() if k in ("moe", "cushion")}
        key = digest([asdict(cfg), between, cp.config_hash if cp else None, cp.data_fingerprint if cp else None])
        t = time.perf_counter()
        n = min(cfg.calibration_windows or ctx.calib.shape[0], ctx.calib.shape[0])
        saved = cp.load_stage(self.name, key) if cp is not None else None
        if saved is not None:
            self.state = W8A8.from_tensors(*saved)
            self.state.apply(ctx.model)
            log.info("activations: W8A8 state loaded from the checkpoint (not calibrated again)")
        else:
            model, calib = ctx.model, ctx.calib
            hidden = getattr(model.config, "hidden_size", None) or model.config.n_embd
            elem = torch.finfo(model.dtype).bits // 8
            store = choose_store_device(2 * n * calib.shape[1] * hidden * elem, ctx.device,
                                        ctx.settings.runtime.activations)
            behind = {"prefix": ctx.prefix} if ctx.prefix is not None else {}  # ranges of the text behind it
            self.state = calibrate(model, calib, cfg, ctx.device, ctx.settings.runtime.batch_size, store,
                                   progress=ctx.progress, **behind)
            if cp is not None:
                cp.save_stage(self.name, key, *self.state.tensors())
        ctx.artifacts[self.name] = self.state  # the model folder's W8A8 export reads it
        summary = self.state.summary()
        log.info("activations: %s W8A8 on %d inputs of %d layers (SmoothQuant %s), largest input |x| %.1f",
                 cfg.granularity, summary["quantized_inputs"], summary["quantized_layers"], cfg.smoothquant,
                 summary["largest_input_absmax"] or 0.0)
        return {"activations": {**summary, "resumed": saved is not None,
                                "calibration_windows": n,
                                "seconds": time.perf_counter() - t}}

    def save(self, ctx: RunContext, report: dict) -> dict[str, str]:
        folder = ctx.out / "model" if ctx.settings.output.save_model else ctx.out
        return {"activations": str(self.state.save(folder / FILE))}
