"""Layer streaming: where decoder blocks live between their turns on the compute device.

The sequential driver asks a *home* for block ``i`` (``fetch``) when its turn comes and hands it
back (``release``) when it is done, so only the current block (or cross-block window) ever sits
on the GPU:

* :class:`HostHome` (the default): blocks stay where the model was loaded (host memory) and are
  moved to the device for their turn.
* :class:`DiskHome`: blocks live in one safetensors file each (read memory-mapped, written
  atomically); between turns their tensors are on the meta device, taking no memory at all.
* :class:`RandomHome`: random-weight blocks of a real shape for benchmarks at scale, created on
  the device at their turn (seeded per block) and written to a :class:`DiskHome` folder when done,
  so a model larger than both GPU and host memory never exists whole.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from compressor.io import atomic_write


def block_tensors(block: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``block`` (non-persistent buffers too: rotary tables and the like)."""
    return dict(block.named_parameters()) | dict(block.named_buffers())


def is_resident(block: nn.Module) -> bool:
    return all(not t.is_meta for t in block_tensors(block).values())


class HostHome:
    """Blocks stay where they were loaded; each is moved to the device for its turn and back after it."""

    def __init__(self):
        self._home: dict[int, torch.device] = {}

    def fetch(self, i: int, block: nn.Module, device: torch.device) -> None:
        self._home.setdefault(i, next(block.parameters()).device)
        block.to(device)

    def release(self, i: int, block: nn.Module) -> None:
        block.to(self._home.get(i, torch.device("cpu")))


class DiskHome:
    """Blocks on disk, ``block_XXX.safetensors`` in ``folder``; in memory only during their turn.

    ``offload(i, block)`` writes a block that is in memory and frees it; ``fetch`` reads it back (the
    file is memory-mapped, so only the tensors being copied to the device pass through host memory).
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.written: set[int] = set()

    def path(self, i: int) -> Path:
        return self.folder / f"block_{i:03d}.safetensors"

    def offload(self, i: int, block: nn.Module) -> None:
        from safetensors.torch import save_file

        tensors = {k: v.detach().to("cpu").contiguous() for k, v in block_tensors(block).items()}
        atomic_write(self.path(i), lambda tmp: save_file(tensors, tmp))
        self.written.add(i)
        del tensors
        block.to("meta")

    def fetch(self, i: int, block: nn.Module, device: torch.device) -> None:
        from safetensors import safe_open

        if is_resident(block):
            block.to(device)
            return
        if not self.path(i).is_file():
            raise FileNotFoundError(f"block {i} is on the meta device and {self.path(i)} does not exist")
        block.to_empty(device=device)
        tensors = block_tensors(block)
        with safe_open(self.path(i), framework="pt", device="cpu") as f, torch.no_grad():
            missing = set(tensors) - set(f.keys())
            if missing:
                raise KeyError(f"{self.path(i)} lacks {sorted(missing)}")
            for name, t in tensors.items():
                t.copy_(f.get_tensor(name), non_blocking=False)

    def release(self, i: int, block: nn.Module) -> None:
        self.offload(i, block)


class RandomHome(DiskHome):
    """Random blocks of a real shape, created on the device at their turn and written to ``folder`` after it.

    Weights of linear layers are normal(0, ``std``) (seeded by ``seed`` and the block index, so a rerun
    makes the same model), norm weights 1, biases 0. Blocks must hold no buffers (LLaMA, OPT, ...).
    ``keep_files=False`` frees the block without writing it (benchmarks whose disk cannot hold the model);
    such a block cannot be fetched again.
    """

    def __init__(self, folder: str | Path, std: float = 0.02, seed: int = 0, keep_files: bool = True):
        super().__init__(folder)
        self.std, self.seed, self.keep_files = std, seed, keep_files
        self.dropped: set[int] = set()

    def fetch(self, i: int, block: nn.Module, device: torch.device) -> None:
        if i in self.written or is_resident(block):
            return super().fetch(i, block, device)
        if i in self.dropped:
            raise RuntimeError(f"block {i} was released without being written (keep_files=False)")
        if any(True for _ in block.buffers()):
            raise ValueError("RandomHome materializes blocks without buffers only")
        block.to_empty(device=device)
        gen = torch.Generator(device=device).manual_seed(self.seed * 100_003 + i)
        with torch.no_grad():
            for name, p in block.named_parameters():
                if name.endswith("bias"):
                    p.zero_()
                elif p.dim() == 1:  # norm scales
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, self.std, generator=gen)

    def release(self, i: int, block: nn.Module) -> None:
        if self.keep_files:
            self.offload(i, block)
        else:
            self.dropped.add(i)
            block.to("meta")

