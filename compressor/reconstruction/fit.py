"""Fitting one window of blocks with a fresh, lean Lightning Trainer."""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from pathlib import Path

import torch
from lightning.pytorch import Trainer
from torch import nn
from torch.utils.data import DataLoader, Dataset

from compressor.engine import BlockKwargs
from compressor.reconstruction.module import BlockReconstruction, ReconstructionConfig

log = logging.getLogger(__name__)


class StreamRows(Dataset):
    """(input, target) rows of activation batches without concatenating them (no second copy in memory)."""

    def __init__(self, inputs: list[torch.Tensor], targets: list[torch.Tensor]):
        self.inputs, self.targets = inputs, targets
        self.index = [(b, r) for b, t in enumerate(inputs) for r in range(t.shape[0])]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        b, r = self.index[i]
        return self.inputs[b][r], self.targets[b][r]


@contextlib.contextmanager
def float32_master(blocks: list[nn.Module]):
    """Within the context, every floating parameter of ``blocks`` starts as float32; after it, each is back in its
    own storage dtype (fp16/bf16: rounded). The ``Parameter`` objects stay the same (only their data is swapped), so masks
    and references to them stay valid; buffers (rotary tables) are left as they are. Training half-precision
    weights directly fails: AdamW's eps (1e-8) and small squared gradients round to zero in fp16, and the
    first step divides by zero."""
    params = [p for b in blocks for p in b.parameters() if p.is_floating_point()]
    dtypes = [p.dtype for p in params]
    for p in params:
        if p.dtype != torch.float32:
            p.data = p.data.float()
    try:
        yield
    finally:
        with torch.no_grad():
            for p, dtype in zip(params, dtypes):
                if p.dtype != dtype:  # also after a "-true" precision converted the module
                    p.data = p.data.to(dtype)


@contextlib.contextmanager
def quiet_lightning():
    """One Trainer per block: keep Lightning's start-up chatter and known-benign warnings off the console."""
    names = ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda",
             "lightning.fabric.utilities.rank_zero", "lightning.pytorch.trainer.connectors.signal_connector")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            for pattern in (".*treespec.*", ".*does not have many workers.*", ".*in eval mode at the start of training.*",
                            ".*The number of training batches.*", ".*litlogger.*"):
                warnings.filterwarnings("ignore", message=pattern)
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def fit_window(
    blocks: list[nn.Module],
    masked: list,
    block_kwargs: BlockKwargs,
    inputs: list[torch.Tensor],
    targets: list[torch.Tensor],
    cfg: ReconstructionConfig,
    name: str,
    log_dir: Path | None = None,
    accelerator: str = "auto",
    progress: bool = False,
    deterministic: bool = False,
) -> dict:
    """Train ``blocks`` so that they map ``inputs`` to ``targets`` (lists of ``[batch, seqlen, hidden]``).

    Whatever the blocks' storage dtype, an fp32 master copy is trained (``cfg.precision`` then applies as
    Lightning defines it: fp32, or fp32 master weights under bf16/fp16 autocast) and the result is written
    back in the storage dtype; pruned weights stay exactly zero through the rounding.

    Returns ``{"seconds", "steps", "first_loss", "last_loss", "peak_gpu_gb"}``; the loss curve goes to
    CSV and TensorBoard under ``log_dir/name`` when ``log_dir`` is given.
    """
    rows = StreamRows(inputs, targets)
    loader = DataLoader(rows, batch_size=cfg.batch_size, shuffle=True, generator=torch.Generator().manual_seed(cfg.seed))
    steps = math.ceil(len(rows) / cfg.batch_size) * cfg.epochs
    module = BlockReconstruction(blocks, masked, block_kwargs, cfg, steps)
    loggers = False
    if log_dir is not None:
        from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

        loggers = [CSVLogger(log_dir, name=name, version=""), TensorBoardLogger(log_dir, name=name, version="tb")]
    with quiet_lightning():
        trainer = Trainer(max_epochs=cfg.epochs, accelerator=accelerator, devices=1, precision=cfg.precision,
                          logger=loggers, enable_checkpointing=False, enable_model_summary=False,
                          enable_progress_bar=progress, num_sanity_val_steps=0, log_every_n_steps=1,
                          gradient_clip_val=None, deterministic=deterministic or None)
    device = next(module.parameters()).device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    t = time.perf_counter()
    with float32_master(blocks), quiet_lightning(), torch.enable_grad():
        trainer.fit(module, loader)
        module.blocks.to(device)  # Lightning's teardown moves the module to the CPU
    seconds = time.perf_counter() - t
    metrics = trainer.callback_metrics
    losses = [float(metrics[k]) for k in ("train_loss_epoch",) if k in metrics]
    for p in module.blocks.parameters():
        p.requires_grad_(False)
    return {"seconds": seconds, "steps": steps, "last_epoch_loss": losses[-1] if losses else None,
            "peak_gpu_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None}
