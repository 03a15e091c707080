"""``BlockReconstruction``: a LightningModule fitting one block (or a window of blocks) to a target,
with the pruning masks fixed (algorithms.md section 2).

Trainable: every linear weight of the window (pruned positions stay exactly zero: their gradients
are zeroed before each step and the mask is re-applied after it), plus norms and biases.
Loss: MSE between the window's output and the target activations. Optimizer: Adam (AdamW with
weight decay 0), linear decay of the learning rate to zero, no warm-up, no clipping.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn

from compressor.config import ConfigError
from compressor.engine import BlockKwargs, block_output

MODES = ("lr", "br", "br+gp", "br+gp+cr")
ALLREDUCE_DTYPES = ("float32", "bfloat16")


@dataclass
class ReconstructionConfig:
    """Block-wise reconstruction after pruning (BR), with global propagation (GP) and cross-block windows (CR)."""

    mode: str = "lr"
    """lr (none), br (target: dense block on the sparse input), br+gp (target: the dense model's activation),
    br+gp+cr (two-block windows, stride 1, against the dense activation at the window's end)."""
    epochs: int = 10
    lr: float = 1e-3
    """Peak learning rate. The paper uses 2e-4; on SmolLM2-135M 1e-3 cut the final-block calibration error
    81% below LR against 67% at 2e-4 (bench/results/protocol_reconstruction.json)."""
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0
    batch_size: int = 8
    precision: str = "32-true"
    """Lightning precision: 32-true (fp32), bf16-mixed or 16-mixed (fp32 master weights under autocast),
    bf16-true (bf16 weights and optimizer state). The block trains as an fp32 master copy whatever the model's
    dtype, written back in that dtype; 16-true is refused (AdamW's eps and small squared gradients round to
    zero in fp16: NaN)."""
    train_norms: bool = True
    """Also train norm weights (and LayerNorm/linear biases where the family has them)."""
    seed: int = 0
    """Seed of the batch shuffling."""
    gradient_allreduce: str = "float32"
    """Several ranks (DDP): the dtype in which each step's gradients are summed across ranks. float32 (DDP's own:
    the fp32 master gradients) or bfloat16 (``compressor.reconstruction.fit.bf16_average``, a DDP communication
    hook: half the bytes on the link; the sum travels in bf16, rounded at each hop). Ignored on one device and
    without reconstruction."""

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError(f"reconstruction.mode={self.mode!r} is unknown: choose one of {', '.join(MODES)}")
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ConfigError(f"reconstruction: epochs ({self.epochs}), batch_size ({self.batch_size}) must be >= 1 "
                              f"and lr ({self.lr}) > 0")
        if str(self.precision) in ("16-true", "fp16-true"):
            raise ConfigError(f"reconstruction.precision={self.precision!r} trains in fp16, where AdamW's eps and "
                              "small squared gradients round to zero (NaN): use 32-true, bf16-mixed or 16-mixed")
        if self.gradient_allreduce not in ALLREDUCE_DTYPES:
            raise ConfigError(f"reconstruction.gradient_allreduce={self.gradient_allreduce!r}: choose "
                              f"{' or '.join(ALLREDUCE_DTYPES)}")
        self.betas = tuple(self.betas)

    @property
    def enabled(self) -> bool:
        return self.mode != "lr"

    @property
    def global_target(self) -> bool:
        return "gp" in self.mode

    @property
    def cross_block(self) -> bool:
        return "cr" in self.mode


def window_masks(blocks: list[nn.Module], masks_by_linear: list[dict[str, torch.Tensor]], weight_of) -> list:
    """``[(parameter, keep_mask in the parameter's own layout)]`` for every pruned linear of the window."""
    out = []
    for block, masks in zip(blocks, masks_by_linear):
        for name, mask in masks.items():
            module = block.get_submodule(name)
            param = module.weight
            keep = mask.t() if weight_of(module) is not param else mask  # Conv1D stores [in, out]
            out.append((param, keep.to(param.device).contiguous()))
    return out


def _cast_floating(value, dtype: torch.dtype):
    """Floating tensors (additive masks, rotary tables) of a capture in the blocks' training dtype, tuples too."""
    if torch.is_tensor(value):
        return value.to(dtype) if value.is_floating_point() and value.dtype != dtype else value
    if isinstance(value, dict):
        return {k: _cast_floating(v, dtype) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_cast_floating(v, dtype) for v in value)
    return value


class BlockReconstruction(LightningModule):
    """Fits ``blocks`` (applied in sequence) so that their output on ``inputs`` matches ``targets``.

    Args:
        blocks: the window, e.g. ``[block_i]`` or ``[block_i, block_i+1]``.
        masked: ``[(weight parameter, keep_mask)]`` for the pruned weights (see ``window_masks``).
        block_kwargs: each block's own forward arguments (masks, position tables), from the capture.
        total_steps: optimizer steps over the whole fit, for the linear decay.

    ``fit_window`` hands it an fp32 master copy of a half-precision block; inputs and floating arguments are
    cast to the parameters' dtype on the way in (fp32, or a ``-true`` precision's dtype).
    """

    def __init__(self, blocks: list[nn.Module], masked: list[tuple[nn.Parameter, torch.Tensor]],
                 block_kwargs: BlockKwargs, cfg: ReconstructionConfig, total_steps: int):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.masked = masked
        self.block_kwargs = block_kwargs
        self.cfg = cfg
        self.total_steps = max(total_steps, 1)
        self._step_losses: list[tuple[int, torch.Tensor, int]] = []  # (global step, loss on the device, rows)
        masked_ids = {id(p) for p, _ in masked}
        for name, p in self.blocks.named_parameters():
            linear_weight = id(p) in masked_ids or (p.dim() == 2)
            p.requires_grad_(linear_weight or cfg.train_norms)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        shape = tuple(hidden.shape[:2])
        dtype = next(self.blocks.parameters()).dtype  # fp32 (the master copy), or a "-true" precision's dtype
        hidden = hidden.to(dtype)
        for block in self.blocks:
            hidden = block_output(block, hidden, _cast_floating(self.block_kwargs.of(block, shape), dtype))
        return hidden

    def train(self, mode: bool = True):
        # dropout stays off: the target is a deterministic function of the input
        return super().train(False)

    def training_step(self, batch, batch_idx):
        inputs, targets = batch
        loss = F.mse_loss(self(inputs).float(), targets.float())
        self._step_losses.append((self.global_step, loss.detach(), inputs.shape[0]))
        return loss

    def on_train_epoch_end(self) -> None:
        """The epoch's step losses to the loggers (``train_loss_step``) and their mean over the epoch's rows (each
        step's loss weighted by its batch's rows, as Lightning's epoch mean: a short last batch counts for its rows) as
        ``train_loss_epoch`` (progress bar, ``trainer.callback_metrics``). Read from the GPU once per epoch: logging
        every step would wait for the GPU at every step, and the CPU could no longer queue the next step's work while
        the GPU runs this one."""
        if not self._step_losses:
            return
        steps = [s for s, _, _ in self._step_losses]
        values = torch.stack([v for _, v, _ in self._step_losses]).tolist()
        rows = [n for _, _, n in self._step_losses]
        self._step_losses.clear()
        for logger in self.loggers:
            for step, value in zip(steps, values):
                logger.log_metrics({"train_loss_step": value, "epoch": self.current_epoch}, step=step)
        mean = sum(v * n for v, n in zip(values, rows)) / sum(rows)
        self.log("train_loss_epoch", mean, prog_bar=True, on_step=False, on_epoch=True)

    def on_train_end(self) -> None:
        """Training is over: drop the optimizer's state and let go of the blocks (the caller holds them), so that
        Lightning's teardown, which moves the module and the optimizer state to the CPU, has nothing to move: for a
        LLaMA-7B block that was 2.4 GB (fp32 weights, Adam's two moments) to the host and 0.8 GB back, about 2 s a
        window on one H200, whatever the number of GPUs."""
        for optimizer in self.trainer.optimizers:
            optimizer.state.clear()
        self.blocks = nn.ModuleList()

    def on_before_optimizer_step(self, optimizer) -> None:
        grads = [(p.grad, keep) for p, keep in self.masked if p.grad is not None]
        if grads:
            torch._foreach_mul_([g for g, _ in grads], [k for _, k in grads])

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        with torch.no_grad():
            torch._foreach_mul_([p for p, _ in self.masked], [k for _, k in self.masked])

    def configure_optimizers(self):
        params = [p for p in self.blocks.parameters() if p.requires_grad]
        fused = all(p.is_cuda and p.dtype in (torch.float32, torch.bfloat16, torch.float16) for p in params)
        opt = torch.optim.AdamW(params, lr=self.cfg.lr, betas=self.cfg.betas, eps=self.cfg.eps,
                                weight_decay=self.cfg.weight_decay, fused=fused or None)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: max(0.0, 1.0 - step / self.total_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
