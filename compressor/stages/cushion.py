"""The cushion stage: a CushionCache prefix (``model.cushion``) for the model as the stages before left it.

Runs ``compressor.cushion.stage.run_cushion`` (greedy search, tuning or the outlier-token baseline, the
outlier measurement and plot) and sets ``ctx.prefix``: the W8A8 calibration after it and the run's final
perplexity run behind the prefix. Checkpoints: each greedy step (``checkpoints/cushion_search.json``) and
the finished stage (``stage_cushion.safetensors`` in the manifest, keyed by its own config, the pruning
checkpoints' config and the data). File: ``cushion.safetensors`` in the model folder (``validate``
applies it), or in the output folder when the model is not saved.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict

from compressor.checkpoint import digest
from compressor.cushion.prefix import FILE_NAME, prefix_from_tensors, prefix_tensors, save_prefix
from compressor.cushion.stage import run_cushion
from compressor.stages import RunContext

log = logging.getLogger("compressor")


class CushionStage:
    name = "cushion"

    def enabled(self, settings) -> bool:
        return settings.cushion.enabled

    def run(self, ctx: RunContext) -> dict:
        cfg, cp = ctx.settings.cushion, ctx.checkpoints
        key = digest([asdict(cfg), {k: v for k, v in asdict(ctx.settings).items() if k == "moe"},
                      cp.config_hash if cp else None, cp.data_fingerprint if cp else None])
        saved = cp.load_stage(self.name, key) if cp is not None else None
        if saved is not None:
            tensors, meta = saved
            ctx.prefix = prefix_from_tensors(tensors, meta).to(ctx.device)
            section = json.loads(meta["section"])
            log.info("cushion: prefix %s loaded from the checkpoint (not searched again)", section["tokens"])
            return {"cushion": {**section, "resumed": True}}
        if ctx.settings.output.start_over:
            (ctx.out / "checkpoints" / "cushion_search.json").unlink(missing_ok=True)
        ctx.prefix, section = run_cushion(ctx.model, ctx.tokenizer, ctx.calib, cfg, ctx.out, ctx.device,
                                          ctx.progress, ctx.accelerator)
        if cp is not None:
            tensors, meta = prefix_tensors(ctx.prefix)
            cp.save_stage(self.name, key, tensors, {**meta, "section": json.dumps(section, default=str)})
        return {"cushion": {**section, "resumed": False}}

    def save(self, ctx: RunContext, report: dict) -> dict[str, str]:
        folder = ctx.out / "model" if ctx.settings.output.save_model else ctx.out
        return {"cushion": str(save_prefix(ctx.prefix, folder / FILE_NAME))}
