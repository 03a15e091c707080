"""Quantization-aware prefix tuning (Son et al., EMNLP 2024, section 3.2): the prefix's keys and values
are trained, the model frozen.

Loss per batch of texts ``[b, n]`` run after the prefix: next-token cross-entropy of the frozen
model over the text (the prefix's own positions predict nothing and are in no range), plus
``lambda_q`` x the quantization error of the text's distinct linear inputs. The error term, per
input X: mean over elements of (X - q(X))^2, summed over the inputs of all blocks, with the scale
and zero point of q taken from X and detached (stop-gradient, as the paper). The gradient of
round() inside q is not stated in the paper; ``round_gradient`` chooses:

- ``zero`` (default; torch.round's own derivative): q(X) carries no gradient, so the term's gradient
  is 2 (X - q(X)) / numel: each activation is pulled to its grid point.
- ``ste`` (straight-through estimator, dq/dX = 1 inside the grid): the term's gradient is zero wherever
  X is not clamped, and with min-max ranges of X itself only a few entries at the range's ends are
  (where the rounded zero point pushes them off the grid): the term then trains next to nothing.

Adam on the keys and values, ``cfg.lr``, ``cfg.epochs`` epochs over ``cfg.tuning_texts`` texts.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from compressor.cushion.config import CushionConfig
from compressor.cushion.error import LinearInputError, distinct_linear_inputs
from compressor.cushion.prefix import Prefix, prefixed_inputs
from compressor.quant.activations import fake_quant, quant_params


def input_error(x: torch.Tensor, granularity: str, bits: int, round_gradient: str) -> torch.Tensor:
    """Mean squared fake-quantization error of ``x`` ``[b, n, d]`` (scalar, differentiable in ``x``)."""
    x = x.float()
    flat = x if granularity == "per_token_dynamic" else x.flatten(1)  # one range per token, or per text
    scale, zero = quant_params(flat, "per_token_dynamic", bits)  # detached
    q = fake_quant(flat, scale, zero, bits, ste=round_gradient == "ste")
    return (flat - q).square().mean()


class PrefixTuning(LightningModule):
    """The prefix's per-layer keys and values as parameters in front of a frozen ``model``."""

    def __init__(self, model: nn.Module, prefix: Prefix, cfg: CushionConfig):
        super().__init__()
        object.__setattr__(self, "frozen", model)  # not a submodule: Lightning must neither move nor train it
        for p in model.parameters():
            p.requires_grad_(False)
        self.cfg = cfg
        self.token_ids = prefix.token_ids
        self.keys = nn.ParameterList([nn.Parameter(k.detach().clone().float()) for k in prefix.keys])
        self.values = nn.ParameterList([nn.Parameter(v.detach().clone().float()) for v in prefix.values])
        self.owners = distinct_linear_inputs(model)

    def prefix(self) -> Prefix:
        return Prefix(self.token_ids, list(self.keys), list(self.values), "tuned")

    def losses(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cross-entropy, quantization error) of texts ``ids`` ``[b, n]`` after the prefix."""
        errors = []
        cfg = self.cfg

        def on_input(_i, _name, x):
            errors.append(input_error(x, cfg.granularity, cfg.bits, cfg.round_gradient))

        with LinearInputError(self.owners, on_input=on_input):
            logits = self.frozen(**prefixed_inputs(self.prefix(), ids)).logits
        ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        return ce, torch.stack(errors).sum()

    def training_step(self, batch, _):
        ce, lq = self.losses(batch[0])
        loss = ce + self.cfg.lambda_q * lq
        self.log_dict({"ce": ce.detach(), "lq": lq.detach(), "loss": loss.detach()}, on_step=True, on_epoch=True,
                      prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.cfg.lr)


def tune_prefix(model, prefix: Prefix, texts: torch.Tensor, cfg: CushionConfig, accelerator: str = "auto",
                progress: bool = False) -> tuple[Prefix, dict]:
    """Train ``prefix`` (keys/values from the model, e.g. the greedy one) on ``texts`` ``[k, n]``.

    ``model`` stays on its device and unchanged. Returns the tuned prefix (on the model's device, fp32) and
    ``{"seconds", "steps", "first"/"last": {"ce", "lq"}}`` (means over the first and last epochs' batches).
    """
    from compressor.reconstruction.fit import quiet_lightning

    device = next(model.parameters()).device
    module = PrefixTuning(model, prefix.to(device), cfg)
    loader = DataLoader(TensorDataset(texts), batch_size=cfg.tuning_batch, shuffle=True,
                        generator=torch.Generator().manual_seed(cfg.seed))
    history = []

    with torch.no_grad():
        first = [module.losses(b[0].to(device)) for b in loader]
    history.append({"ce": float(torch.stack([c for c, _ in first]).mean()),
                    "lq": float(torch.stack([q for _, q in first]).mean())})
    with quiet_lightning():
        trainer = Trainer(max_epochs=cfg.epochs, accelerator=accelerator, devices=1, logger=False,
                          enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=progress,
                          num_sanity_val_steps=0, log_every_n_steps=1)
    t = time.perf_counter()
    with quiet_lightning(), torch.enable_grad():
        trainer.fit(module, loader)
    seconds = time.perf_counter() - t
    tuned = module.prefix().detach().to(device)
    with torch.no_grad():
        last = [module.to(device).losses(b[0].to(device)) for b in loader]
    history.append({"ce": float(torch.stack([c for c, _ in last]).mean()),
                    "lq": float(torch.stack([q for _, q in last]).mean())})
    return tuned, {"seconds": seconds, "steps": trainer.global_step, "before": history[0], "after": history[-1]}
