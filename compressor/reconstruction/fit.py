"""Fitting one window of blocks with a fresh, lean Lightning Trainer."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import time
import warnings
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer
from torch import nn
from torch.utils.data import DataLoader, Dataset

from compressor.accelerators import is_hpu, reset_peak_gpu_memory, trainer_settings
from compressor.engine import BlockKwargs
from compressor.reconstruction.module import BlockReconstruction, ReconstructionConfig

log = logging.getLogger(__name__)


def bf16_average(process_group, bucket):
    """A DDP communication hook (``DistributedDataParallel.register_comm_hook``): sum a gradient bucket over the ranks
    in bfloat16, half the bytes of float32, and write the sum divided by the rank count back into the bucket.

    PyTorch's own ``bf16_compress_hook`` does the same but refuses any backend other than NCCL (or XCCL), so the
    gloo test processes could not run it; this one runs wherever the backend all-reduces bfloat16."""
    import torch.distributed as dist

    group = process_group if process_group is not None else dist.group.WORLD
    grads = bucket.buffer()
    ranks = dist.get_world_size(group)
    work = dist.all_reduce(grads.to(torch.bfloat16), group=group, async_op=True).get_future()

    def unpack(fut):  # the sum arrives in bfloat16 (the backend may round at every hop); divide in full precision
        grads.copy_(fut.value()[0]).div_(ranks)
        return grads

    return work.then(unpack)


class BF16GradientAllreduce(Callback):
    """Average DDP's gradients in bfloat16 (``reconstruction.gradient_allreduce``): :func:`bf16_average` registered
    on the DDP-wrapped module once Lightning has wrapped it (Lightning's ``DDPStrategy(ddp_comm_hook=...)`` registers
    hooks on CUDA only)."""

    dtype = "bfloat16"

    def __init__(self):
        self.registered = False

    def on_fit_start(self, trainer, pl_module) -> None:
        from torch.nn.parallel import DistributedDataParallel

        ddp = trainer.strategy.model
        if not isinstance(ddp, DistributedDataParallel):
            raise RuntimeError(f"reconstruction.gradient_allreduce=bfloat16 needs Lightning's DDP strategy; the "
                               f"module is wrapped by {type(ddp).__name__}")
        ddp.register_comm_hook(state=None, hook=bf16_average)
        self.registered = True


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
                            ".*The number of training batches.*", ".*litlogger.*",
                            ".*sync_dist=True.*"):  # DDP: the logged epoch loss is rank 0's share (report only)
                warnings.filterwarnings("ignore", message=pattern)
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def ctrl_c_propagates(trainer: Trainer):
    """Ctrl-C inside ``trainer.fit`` reaches the caller as KeyboardInterrupt (Lightning catches it, ignores further
    SIGINTs and calls ``sys.exit(1)``), so the run stops as one: checkpointed blocks stay, the rest is redone."""
    handler = signal.getsignal(signal.SIGINT)
    try:
        yield
    except SystemExit:
        if not trainer.interrupted:
            raise
        signal.signal(signal.SIGINT, handler)
        raise KeyboardInterrupt from None


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
    group=None,
) -> dict:
    """Train ``blocks`` so that they map ``inputs`` to ``targets`` (lists of ``[batch, seqlen, hidden]``).

    Whatever the blocks' storage dtype, an fp32 master copy is trained (``cfg.precision`` then applies as
    Lightning defines it: fp32, or fp32 master weights under bf16/fp16 autocast) and the result is written
    back in the storage dtype; pruned weights stay exactly zero through the rounding.

    Returns ``{"seconds", "steps", "last_epoch_loss", "accelerator", "gradient_allreduce", "peak_gpu_gb"}``
    (``gradient_allreduce``: the dtype DDP averaged gradients in, None on one device; ``accelerator``: the
    Trainer's accelerator class, e.g. ``CPUAccelerator``, ``CUDAAccelerator``, ``HPUAccelerator``); the loss curve
    goes to CSV and TensorBoard under ``log_dir/name`` when ``log_dir`` is given. ``accelerator="hpu"`` trains
    with lightning-habana's classes (``compressor.accelerators.trainer_settings``).

    ``group`` (``compressor.distributed.ProcessGroup``) of several ranks: each rank holds its share of the rows
    (the same count on every rank: ``compressor.distributed.check_settings``) and draws ``cfg.batch_size / ranks``
    of them per step; Lightning's DDP strategy, inside the process group torchrun started, averages the gradients,
    so a step sees ``cfg.batch_size`` rows in all, as on one device (drawn in another order).
    """
    rows = StreamRows(inputs, targets)
    ranks = group.world_size if group is not None and group.distributed else 1
    batch = cfg.batch_size // ranks
    loader = DataLoader(rows, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(cfg.seed))
    steps = math.ceil(len(rows) / batch) * cfg.epochs
    settings = trainer_settings(accelerator, devices=1)
    if ranks > 1:  # torchrun's processes; Lightning joins the process group already there
        local = int(os.environ.get("LOCAL_WORLD_SIZE", ranks))
        settings = trainer_settings(accelerator, local, "auto" if is_hpu(accelerator) else "ddp")
        settings.update(num_nodes=ranks // local, use_distributed_sampler=False)
    callbacks = [BF16GradientAllreduce()] if ranks > 1 and cfg.gradient_allreduce == "bfloat16" else []
    module = BlockReconstruction(blocks, masked, block_kwargs, cfg, steps)
    loggers = False
    if log_dir is not None:
        from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

        loggers = [CSVLogger(log_dir, name=name, version=""), TensorBoardLogger(log_dir, name=name, version="tb")]
    with quiet_lightning():
        trainer = Trainer(max_epochs=cfg.epochs, **settings, precision=cfg.precision,
                          logger=loggers, enable_checkpointing=False, enable_model_summary=False,
                          enable_progress_bar=progress, num_sanity_val_steps=0, log_every_n_steps=1,
                          gradient_clip_val=None, deterministic=deterministic or None, callbacks=callbacks)
    device = next(module.parameters()).device
    reset_peak_gpu_memory(device)

    t = time.perf_counter()
    with float32_master(blocks), quiet_lightning(), torch.enable_grad(), ctrl_c_propagates(trainer):
        trainer.fit(module, loader)  # the blocks stay on the device (BlockReconstruction.on_train_end)
    seconds = time.perf_counter() - t
    metrics = trainer.callback_metrics
    losses = [float(metrics[k]) for k in ("train_loss_epoch",) if k in metrics]
    for block in blocks:
        for p in block.parameters():  # the last step's gradients too: fp32, twice a bf16 block's bytes, they would
            p.requires_grad_(False)  # travel with the block to its home and stay there
            p.grad = None
    return {"seconds": seconds, "steps": steps, "last_epoch_loss": losses[-1] if losses else None,
            "accelerator": type(trainer.accelerator).__name__,
            "gradient_allreduce": next((c.dtype for c in callbacks if c.registered), "float32") if ranks > 1 else None,
            "peak_gpu_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None}
