"""The process-group view of a multi-GPU run: who am I, my share of the windows, the collectives the walk needs.

One process per device, started by ``torchrun`` (shared/guide/design.md, "Multi-GPU"). Every rank holds the
whole model and walks the blocks in step; the calibration windows are split between ranks exactly
(contiguous shards, no padding: a repeated window would count twice in a Hessian). Statistics are sums, so
they are reduced across ranks before use; each layer is pruned (and quantized) on one owner rank chosen to
balance the work and the result is broadcast, so that every rank holds the same weights and masks after
each block (checked by :meth:`ProcessGroup.check_identical`). Rank 0 writes.

Without ``torch.distributed`` initialised, :func:`current` is a one-process view whose collectives do
nothing, so single-device runs go through the same code.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """``[start, stop)`` of rank ``rank``'s contiguous share of ``n`` items: sizes differ by at most one, the first
    ``n % world`` ranks take one more; no item is repeated or left out (a rank may get none when ``n < world``)."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def assign_owners(costs: dict[str, float], world: int) -> dict[str, int]:
    """Owner rank of each job, balancing the summed cost per rank (longest job first, each to the least loaded
    rank; ties to the lowest rank, so every rank computes the same assignment)."""
    load = [0.0] * world
    owners = {}
    for name in sorted(costs, key=lambda k: (-costs[k], k)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owners[name] = rank
        load[rank] += costs[name]
    return owners


def sparsegpt_cost(rows: int, cols: int) -> float:
    """Work of pruning (or quantizing) ``rows`` outputs reading ``cols`` inputs with an OBS sweep, in multiply-adds of
    the sweep's updates (rows * cols^2). The Hessian's factorization (cols^3 multiply-adds) is left out: it runs at
    the GPU's full rate, and counting it gave LLaMA-7B's down projection 68% of a block's pruning where it took
    40% on an H200 (0.26 s of 0.64 s; bench/results/perf_multi_gpu.json). Only the first block is balanced by this
    estimate: later ones by the seconds each group took (``SequentialPruner``)."""
    return float(rows) * cols * cols


@dataclass(frozen=True)
class ProcessGroup:
    """This process's place in the run: ``rank`` of ``world_size``, and the device its collectives use (the rank's
    GPU under NCCL, the CPU under gloo). With ``world_size`` 1 every collective returns its input."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes outputs, checkpoints and the report."""
        return self.rank == 0

    def shard(self, windows: torch.Tensor | None) -> torch.Tensor | None:
        """This rank's contiguous share of ``windows`` ``[n, ...]`` (see :func:`shard_bounds`); None stays None."""
        if windows is None or not self.distributed:
            return windows
        start, stop = shard_bounds(windows.shape[0], self.rank, self.world_size)
        return windows[start:stop]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the body first (it may write a cache, e.g. generated text), then the others (reading it)."""
        if self.distributed and not self.is_main:
            dist.barrier()
        yield
        if self.distributed and self.is_main:
            dist.barrier()

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sums over ranks of a few numbers (error sums, token counts), in float64."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def reduce_statistics(self, acc, dst: int | None = None) -> None:
        """Sum an input-statistics accumulator (``compressor.pruning.statistics.InputStatistics``: its Gram matrix or
        column sums of squares, and its token count) over ranks, into rank ``dst`` (None: into every rank). After a
        reduce to ``dst`` the other ranks' copies are partial sums and must not be used."""
        if not self.distributed:
            return
        tensors = [t for t in (acc.gram, acc.sq_norm) if t is not None]
        tokens = torch.tensor([float(acc.tokens)], dtype=torch.float64, device=self.device)
        for t in (*tensors, tokens):
            moved = t.to(self.device)
            if dst is None:
                dist.all_reduce(moved)
            else:
                dist.reduce(moved, dst)
            if moved is not t:
                t.copy_(moved)
        acc.tokens = int(tokens.item())

    def broadcast_object(self, obj, src: int = 0):
        """A picklable object (a schedule, a report's numbers) from rank ``src`` to every rank."""
        if not self.distributed:
            return obj
        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def broadcast_tensors(self, tensors: dict[str, torch.Tensor] | None, src: int, meta=None):
        """``(tensors, meta)`` of rank ``src`` on every rank: names, shapes and dtypes (and ``meta``, any picklable
        value) go first as one object, then each tensor. Returned tensors are on this group's ``device`` (on ``src``
        the given ones, unmoved)."""
        if not self.distributed:
            return tensors, meta
        header = [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()] if self.rank == src else None
        header, meta = self.broadcast_object((header, meta), src)
        out = {}
        for name, shape, dtype in header:
            if self.rank == src:
                t = tensors[name].to(self.device).contiguous()
            else:
                t = torch.empty(shape, dtype=dtype, device=self.device)
            dist.broadcast(t, src)
            out[name] = tensors[name] if self.rank == src else t
        return out, meta

    def all_gather_object(self, obj) -> list:
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def check_identical(self, tensors: dict[str, torch.Tensor], what: str) -> None:
        """Raise RuntimeError when ranks hold different ``tensors``.

        Each rank reduces every tensor to an exact, position-dependent checksum of its bits (:func:`bit_checksum`,
        on this group's device: GPU work for a GPU run, whatever device the tensor lives on), and one all-gather of
        those numbers compares them: a mask with the same count of kept weights in other places differs."""
        if not self.distributed:
            return
        names = sorted(tensors)
        sums = torch.stack([bit_checksum(tensors[k].to(self.device)) for k in names])
        every = [torch.empty_like(sums) for _ in range(self.world_size)]
        dist.all_gather(every, sums)
        bad = (torch.stack(every) != sums).any(dim=0).tolist()
        differ = [k for k, b in zip(names, bad) if b]
        if differ:
            raise RuntimeError(f"{what}: ranks hold different values of {', '.join(differ[:5])}"
                               f"{' ...' if len(differ) > 5 else ''}: the run cannot continue consistently")


_INT_OF_WIDTH = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
# splitmix64's increment and odd multipliers, as signed 64-bit integers (torch has no uint64 arithmetic)
_MIX = (0x9E3779B97F4A7C15 - (1 << 64), 0xBF58476D1CE4E5B9 - (1 << 64), 0x94D049BB133111EB - (1 << 64))


def _shift_right(x: torch.Tensor, k: int) -> torch.Tensor:
    """``x >> k`` of int64 words read as unsigned (torch's ``>>`` copies the sign bit into the top ``k`` bits)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer on int64 words: a bijection of 64-bit words in which every input bit moves every
    output bit (wrapping multiplications)."""
    x = (x ^ _shift_right(x, 30)) * _MIX[1]
    x = (x ^ _shift_right(x, 27)) * _MIX[2]
    return x ^ _shift_right(x, 31)


def bit_checksum(t: torch.Tensor, chunk: int = 1 << 22) -> torch.Tensor:
    """A 0-d int64 on ``t``'s device: the sum over elements (over 64-bit words of the tensor's bytes when they divide
    into words) of a 64-bit hash of (its bits, its flat index), wrapping modulo 2**64, so integer sums give the same
    value in any order and on any device.

    Equal tensors give equal checksums; changing or moving any element changes it except by a hash collision (a mask
    keeping positions {0, 3} and one keeping {1, 2} differ, as do 2:4 patterns). Each word is hashed whole, as
    splitmix64 hashes its state (``_mix64`` of the word xor its index times splitmix64's odd increment): a word
    times a hash of its index would weigh the word's top byte by the hash's low 8 bits alone, and a mask entry moved
    between the top bytes of two words would go unseen one time in 128. Complex tensors are read as pairs of
    reals."""
    flat = t.detach()
    if flat.is_complex():
        flat = torch.view_as_real(flat)
    flat = flat.contiguous().reshape(-1)
    total = torch.zeros((), dtype=torch.int64, device=t.device)
    if flat.numel() == 0:
        return total
    if flat.dtype == torch.bool:
        flat = flat.view(torch.uint8)
    bits = flat.view(_INT_OF_WIDTH[flat.element_size()])
    if bits.numel() * bits.element_size() % 8 == 0:  # whole 64-bit words: 8 mask entries or 4 bf16 weights at once
        # (decided by the size alone, so a view at an odd offset and its copy agree; such a view is copied to align)
        aligned = bits.data_ptr() % 8 == 0 and bits.storage_offset() * bits.element_size() % 8 == 0
        bits = (bits if aligned else bits.clone()).view(torch.int64)
    for start in range(0, bits.numel(), chunk):
        part = bits[start:start + chunk].to(torch.int64)
        index = torch.arange(start, start + part.numel(), dtype=torch.int64, device=t.device) * _MIX[0]  # distinct
        total += _mix64(part ^ index).sum()
    return total


def current() -> ProcessGroup:
    """The view of the default process group when ``torch.distributed`` is initialised, else one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return ProcessGroup()
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    return ProcessGroup(dist.get_rank(), dist.get_world_size(), device)


def launched_by_torchrun() -> bool:
    """Whether this process is one of several started by torchrun (or a launcher setting the same variables)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(accelerator: str = "cpu") -> ProcessGroup:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR/PORT``):
    NCCL on GPUs (this rank takes GPU ``LOCAL_RANK``), gloo on the CPU. Already initialised: its view."""
    if dist.is_available() and dist.is_initialized():
        return current()
    if not launched_by_torchrun():
        return ProcessGroup()
    # ranks wait for one another while an owner prunes or rank 0 writes a checkpoint: allow an hour (a dead rank is
    # noticed by torchrun at once anyway)
    timeout = datetime.timedelta(minutes=60)
    if accelerator == "gpu":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl", device_id=torch.device("cuda", torch.cuda.current_device()), timeout=timeout)
    else:
        dist.init_process_group("gloo", timeout=timeout)
    group = current()
    log.info("rank %d of %d (%s)", group.rank, group.world_size, dist.get_backend())
    return group


def check_settings(settings, group: ProcessGroup) -> None:
    """Refuse, before any work, what a run over several ranks cannot do yet (``settings``: a
    ``compressor.pipeline.RunSettings``), naming the setting and what is valid.

    Raises:
        ConfigError: reconstruction, MoE, cushion or W8A8 stages with more than one rank, or fewer calibration
            windows than ranks (a rank without windows has no statistics to contribute).
    """
    from compressor.config import ConfigError

    if not group.distributed:
        return
    n = group.world_size
    refused = [(settings.moe.enabled, "model.moe.enabled=true", "false"),
               (settings.cushion.enabled, f"model.cushion.method={settings.cushion.method!r}", "none"),
               (settings.activations.enabled, f"model.activations.granularity={settings.activations.granularity!r}",
                "none")]
    for on, what, valid in refused:
        if on:
            raise ConfigError(f"{what} does not run on {n} devices yet (pruning, reconstruction and INT4 weights "
                              f"do): use {valid}, "
                              "or run it with trainer.devices=1")
    if settings.calibration.num_samples < n:
        raise ConfigError(f"data.calibration.num_samples={settings.calibration.num_samples} is fewer than the {n} "
                          f"ranks (each takes its share of the windows): use at least {n}")
    recon = settings.reconstruction
    if recon.enabled:  # DDP steps in lockstep: every rank the same number of rows and of rows per step
        rc = settings.recon_calibration
        key = "data.recon_calibration.num_samples" if rc is not None else "data.calibration.num_samples"
        windows = (rc or settings.calibration).num_samples
        if windows % n:
            raise ConfigError(f"{key}={windows}: reconstruction on {n} ranks needs a multiple of {n} windows "
                              f"(each rank trains on an equal share): use {windows - windows % n or n}")
        if recon.batch_size % n:
            raise ConfigError(f"model.reconstruction.batch_size={recon.batch_size}: on {n} ranks it must be a "
                              f"multiple of {n} (each rank draws batch_size / {n} windows per step)")
