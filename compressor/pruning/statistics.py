"""Per-block input statistics gathered with forward hooks: one accumulator per distinct input.

Linear layers fed the very same tensor (q/k/v, gate/up, Phi's parallel q/k/v/fc1) share one
accumulator, found on the first batch by tensor identity while every input is kept alive
(so a freed buffer's address can never be mistaken for a shared input).
"""

from __future__ import annotations

import torch
from torch import nn

from compressor.pruning.sparsegpt import gram_update, hessian_from_gram


class InputStatistics:
    """Running statistics of one linear input: the Gram matrix (for SparseGPT) or column sums of squares (Wanda)."""

    def __init__(self, cols: int, device: torch.device, gram: bool):
        self.gram = torch.zeros(cols, cols, device=device, dtype=torch.float32) if gram else None
        self.sq_norm = torch.zeros(cols, device=device, dtype=torch.float32)
        self.tokens = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        if self.gram is not None:
            self.tokens += gram_update(self.gram, x)  # half-precision inputs multiply into fp32 on GPUs
            return
        x = x.float()
        self.sq_norm += x.square().sum(0)
        self.tokens += x.shape[0]

    @property
    def hessian(self) -> torch.Tensor:
        """H = (2/n) sum x x^T ``[cols, cols]``, a new tensor (see :meth:`take_hessian`)."""
        if self.gram is None:
            raise RuntimeError("this accumulator only holds column norms")
        return hessian_from_gram(self.gram, self.tokens)

    def take_hessian(self) -> torch.Tensor:
        """H, made from the Gram matrix in place (no second ``[cols, cols]`` tensor: 5.4 GB at OPT-66B's
        MLP width); the accumulator is spent afterwards and cannot take more inputs."""
        if self.gram is None:
            raise RuntimeError("this accumulator only holds column norms (or its Hessian was taken)")
        h = self.gram.mul_(2.0 / max(self.tokens, 1))
        self.gram = self.sq_norm = None  # spent: any later use fails loudly
        return h

    @property
    def column_sq_norm(self) -> torch.Tensor:
        """sum over tokens of x_j^2, ``[cols]``."""
        return torch.diagonal(self.gram).clone() if self.gram is not None else self.sq_norm


class BlockStatistics:
    """Context manager hooking a block's linear layers; ``of(name)`` is the layer's shared accumulator.

    ``make(cols, device)`` builds another kind of accumulator (anything with ``add(x)``), e.g. the per-channel
    ranges of W8A8 calibration; the default is :class:`InputStatistics` (Gram matrix or column norms)."""

    def __init__(self, linears: dict[str, nn.Module], gram: bool = False, make=None):
        self.linears = linears
        self.gram = gram
        self.make = make or (lambda cols, device: InputStatistics(cols, device, gram))
        self.owner: dict[str, str] = {}  # linear name -> name of the linear whose accumulator it shares
        self.accumulators: dict = {}
        self._alive: list[tuple[str, torch.Tensor]] = []  # first-batch inputs, kept alive during discovery
        self._handles = []

    def __enter__(self) -> BlockStatistics:
        for name, module in self.linears.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._alive.clear()

    def end_batch(self) -> None:
        """Call after each forward: the first one fixes which layers share an input."""
        self._alive.clear()

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0]
            if name not in self.owner:
                for other, seen in self._alive:
                    if seen is x or (seen.data_ptr() == x.data_ptr() and seen.shape == x.shape
                                     and seen.stride() == x.stride()):
                        self.owner[name] = self.owner[other]
                        return
                self.owner[name] = name
                self._alive.append((name, x))
                self.accumulators[name] = self.make(x.shape[-1], x.device)
            if self.owner[name] == name:
                self.accumulators[name].add(x)

        return hook

    def of(self, name: str) -> InputStatistics:
        return self.accumulators[self.owner[name]]

    def groups(self) -> dict[str, list[str]]:
        """Owner -> the linears sharing its input (for the report)."""
        out: dict[str, list[str]] = {}
        for name, owner in self.owner.items():
            out.setdefault(owner, []).append(name)
        return out
