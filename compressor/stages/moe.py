"""The MoE stage: G-MoEfication (``model.moe``) of the model as pruning left it (Lee et al., EMNLP 2024).

Runs ``compressor.moe.run_moe``: balanced k-means experts, calibration means, one router per block trained by a
Lightning Trainer, then the FFNs replaced in place by top-k expert FFNs, so the stages after it (cushion prefix,
W8A8) and the run's final perplexity see the converted model. Files (written by ``run_moe``):
``moe.safetensors`` (assignment, routers, mean tables, k) in the output folder beside ``model/``, and
``moe_recall.png``. No stage checkpoint: a resumed run converts again (routers take minutes, not hours).
"""

from __future__ import annotations

from compressor.stages import RunContext


class MoEStage:
    name = "moe"

    def __init__(self):
        self.section: dict | None = None

    def enabled(self, settings) -> bool:
        return settings.moe.enabled

    def run(self, ctx: RunContext) -> dict:
        from compressor.moe import run_moe

        s = ctx.settings
        self.section = run_moe(ctx.model, ctx.calib, s.moe, ctx.out, ctx.device, ctx.progress, s.runtime.batch_size,
                               s.output.plots)
        return {"moe": self.section}

    def save(self, ctx: RunContext, report: dict) -> dict[str, str]:
        files = (self.section or {}).get("outputs", {})
        names = {"tables": "moe", "recall_plot": "moe_recall_plot"}
        return {names.get(k, f"moe_{k}"): v for k, v in files.items()}
