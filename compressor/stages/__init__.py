"""A run as a sequence of stages over one model (shared/guide/design.md, "A run is a sequence of stages").

The pipeline loads the model, prepares the data and measures the dense model once, then runs every
configured stage in the project's fixed order (:data:`ORDER`), then measures, saves and reports once.
A stage is a small object: its config group (a field of ``RunSettings`` named like the stage),
``enabled(settings)``, ``run(ctx) -> report sections`` and ``save(ctx, report) -> output files``.
What stages share lives in :class:`RunContext`; results a later stage needs go in ``ctx.artifacts``
(e.g. a prefix that activation calibration must run behind).

Resume: stages checkpoint through the one manifest of ``ctx.checkpoints`` (``BlockCheckpoints``), the
prune stage per block, the others per stage (``load_stage``/``save_stage``) under their own config hash,
so a later stage's setting does not invalidate the pruning checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

ORDER = ("prune", "moe", "cushion", "activations")
"""The fixed order of stages by name (the project's, not the user's)."""


@dataclass
class RunContext:
    """What the stages of one run share."""

    settings: Any  # compressor.pipeline.RunSettings
    model: torch.nn.Module
    tokenizer: Any
    device: torch.device
    accelerator: str  # Lightning's name for the device kind ("gpu", "cpu")
    out: Path
    calib: torch.Tensor
    """Calibration windows ``[n, seqlen]``."""
    recon_calib: torch.Tensor | None = None
    corpora: dict[str, torch.Tensor] = field(default_factory=dict)
    """Evaluation windows by corpus (held-out windows come from the first)."""
    checkpoints: Any = None  # compressor.checkpoint.BlockCheckpoints, or None without checkpoints
    finished: list[dict] = field(default_factory=list)
    """Manifest entries of blocks finished by an interrupted run (the prune stage loads them)."""
    progress: bool = True
    timings: dict[str, float] = field(default_factory=dict)
    artifacts: dict[str, Any] = field(default_factory=dict)
    """Results a later stage needs, by the name of the stage that made them."""
    identity: dict = field(default_factory=dict)
    """``compressor.models.identity.model_identity`` of the source model (dtype, fingerprint)."""
    dense: dict = field(default_factory=dict)
    """The source model's counts before any stage (``pipeline.dense_counts``: parameters, nonzeros, zeros per
    linear)."""
    prefix: Any = None
    """The cushion prefix (set by the cushion stage): the final measurement and W8A8 calibration run behind it."""

    @property
    def heldout(self) -> torch.Tensor | None:
        ev = self.settings.evaluation
        if not self.corpora or not ev.heldout_samples:
            return None
        return next(iter(self.corpora.values()))[: ev.heldout_samples]


class Stage(Protocol):
    name: str
    """Its config group, its report section and its key in ``timings``."""

    def enabled(self, settings) -> bool: ...

    def run(self, ctx: RunContext) -> dict:
        """Change ``ctx.model`` in place; returns the report sections it owns (top-level keys)."""
        ...

    def save(self, ctx: RunContext, report: dict) -> dict[str, str]:
        """Write its files (after the model folder is saved); returns ``{output name: path}``."""
        ...


def stages() -> list[Stage]:
    """Every stage, in the project's order: pruning (with reconstruction and INT4 weights), MoE conversion, the
    cushion prefix, then W8A8 activation quantization."""
    from compressor.stages.activations import ActivationsStage
    from compressor.stages.cushion import CushionStage
    from compressor.stages.moe import MoEStage
    from compressor.stages.prune import PruneStage

    return sorted([PruneStage(), MoEStage(), CushionStage(), ActivationsStage()],
                  key=lambda stage: ORDER.index(stage.name))
