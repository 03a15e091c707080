"""The quantization error a prefix is chosen to lower, and the outlier statistic it is judged by.

L_q(t | p) = sum over blocks and over the distinct inputs X of the block's linear layers of
||X - q(X)||^2, q the asymmetric 8-bit fake quantizer of ``compressor.quant.activations`` with
its scale and zero point taken over the text tokens only (Son et al., EMNLP 2024, eq. 2;
algorithms.md section 4). Which tensors X are is not spelled out in the paper: every linear
input, one per distinct input (q/k/v share one, gate/up share one), as the Hessians are shared.

Every function takes a batch whose rows are independent candidates and returns one value per row.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from compressor.models.adapters import ModelAdapter
from compressor.quant.activations import quant_error

log = logging.getLogger(__name__)


def row_error(x: torch.Tensor, granularity: str = "per_tensor_dynamic", bits: int = 8,
              objective: str = "error") -> torch.Tensor:
    """Per row of ``x`` ``[batch, tokens, features]``: the fake-quantization squared error summed over the row.

    ``per_tensor_*``: one scale and zero point per row (over all its tokens and features: within one text a
    static range is the text's range); ``per_token_dynamic``: one per token. ``objective="max"``: max |x| of
    the row instead (the abstract's "maximum activation"). Returns ``[batch]`` in fp32.
    """
    if objective == "max":
        return x.float().abs().flatten(1).amax(1)
    per_tensor = "per_tensor_dynamic"  # within one text a static range is the text's range
    return quant_error(x.float(), granularity if granularity == "per_token_dynamic" else per_tensor, bits,
                       batch_dims=1)


def ratio_to_median(x: torch.Tensor) -> tuple[float, float, float]:
    """``(max |x|, median |x|, max / median)`` over all entries of ``x`` (the paper's outlier statistic)."""
    a = x.detach().float().abs().flatten()
    if a.numel() > 1 << 24:  # torch.median's limit on some devices; a strided sample keeps the median's value
        a_med = a[:: a.numel() // (1 << 24) + 1]
    else:
        a_med = a
    top, med = float(a.max()), float(a_med.median())
    return top, med, top / max(med, 1e-12)


def distinct_linear_inputs(model: nn.Module) -> list[tuple[int, str, nn.Module]]:
    """``(block index, linear name, linear)`` for one linear per distinct input in every decoder block.

    Found by one two-token forward: linears whose input is the same tensor share it (q/k/v, gate/up).
    """
    adapter = ModelAdapter(model)
    seen: dict[int, list[tuple[str, torch.Tensor]]] = {}
    owners: list[tuple[int, str, nn.Module]] = []
    handles = []

    def hook_for(i: int, name: str, module: nn.Module):
        def hook(_, args):
            x = args[0]
            block_seen = seen.setdefault(i, [])
            if any(t is x or (t.data_ptr() == x.data_ptr() and t.shape == x.shape) for _, t in block_seen):
                return
            block_seen.append((name, x))
            owners.append((i, name, module))
        return hook

    for i, block in enumerate(adapter.blocks):
        for name, module in adapter.linears(block).items():
            handles.append(module.register_forward_pre_hook(hook_for(i, name, module)))
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return owners


class CompiledRowError:
    """``row_error`` through ``torch.compile`` (one fused kernel for the range and one for the error sum instead
    of about ten passes over every activation: the search is bound by them); eager after any compile failure."""

    def __init__(self):
        self.fn = torch.compile(row_error, dynamic=True)

    def __call__(self, *args):
        if self.fn is not row_error:
            try:
                return self.fn(*args)
            except Exception as exc:  # noqa: BLE001 - any backend failure: the eager function is exact
                log.warning("torch.compile of the cushion error failed (%s): running it eagerly", exc)
                self.fn = row_error
        return row_error(*args)


_COMPILED: list[CompiledRowError] = []


def error_function(compile: bool):
    """``row_error``, compiled once per process when ``compile``."""
    if not compile:
        return row_error
    if not _COMPILED:
        _COMPILED.append(CompiledRowError())
    return _COMPILED[0]


class LinearInputError:
    """Context manager: while active, every distinct linear input adds its per-row error to ``self.total``.

    ``skip`` leading positions of each input are not text (a candidate token) and are left out of the
    ranges and the error; ``total`` is ``[batch]`` after a forward (reset with ``reset()``).
    ``detached=False`` keeps the graph (prefix tuning computes its own loss through ``on_input``).
    """

    def __init__(self, owners: list[tuple[int, str, nn.Module]], granularity: str = "per_tensor_dynamic",
                 bits: int = 8, objective: str = "error", skip: int = 0, on_input=None, compile: bool = False):
        self.owners, self.granularity, self.bits, self.objective, self.skip = owners, granularity, bits, objective, skip
        self.on_input = on_input
        self.error = error_function(compile)
        self.total: torch.Tensor | None = None
        self._handles = []

    def reset(self) -> None:
        self.total = None

    def __enter__(self) -> LinearInputError:
        for i, name, module in self.owners:
            self._handles.append(module.register_forward_pre_hook(self._hook(i, name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, i: int, name: str):
        def hook(_, args):
            x = args[0][:, self.skip:]
            if self.on_input is not None:
                self.on_input(i, name, x)
                return
            with torch.no_grad():
                e = self.error(x, self.granularity, self.bits, self.objective)
            self.total = e if self.total is None else self.total + e
        return hook
