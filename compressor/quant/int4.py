"""Low-bit weights for pruned layers, pure tensor math: round-to-nearest and GPTQ-style.

Asymmetric per-row groups of ``group_size`` input columns: ``scale = (max - min) / (2^bits - 1)`` and an
integer zero point, both from the *kept* weights of the group (pruned weights are recorded by the
mask, so they need not be representable). Dequantized ``(q - zero) * scale`` times the mask:
pruned weights stay exactly zero.

GPTQ (Frantar et al. 2023) quantizes the columns left to right and spreads each column's rounding
error over the columns to its right through the upper Cholesky factor U of H^-1, the same factor
SparseGPT uses; a pruned position's "quantized" value is 0, so the OBS update also keeps the
pruned weights' removal compensated. A group's scale and zero are taken when the sweep reaches
its first column, from the already-updated weights.

With ``act_order`` the sweep visits the columns by decreasing diag(H) (the inputs with the most
energy first, while the most columns are left to absorb their error), and every group's grid is
fixed beforehand from the weights as they enter (static groups): the groups stay contiguous
column ranges in the stored layout, so nothing else (packing, loading) changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compressor.config import ConfigError
from compressor.pruning.sparsegpt import inverse_hessian_factor

METHODS = ("none", "rtn", "gptq")


@dataclass
class QuantizationConfig:
    """Quantization of the kept weights after pruning (and reconstruction)."""

    method: str = "none"
    """none, rtn (round to nearest) or gptq (error feedback through the inverse Hessian)."""
    bits: int = 4
    group_size: int = 128
    """Input columns sharing one scale and zero point, per output row."""
    percdamp: float = 0.01
    """GPTQ damping as a fraction of mean(diag H)."""
    blocksize: int = 128
    """GPTQ columns per lazy-update block."""
    clip: bool = True
    """Choose each group's range by a small search over shrink factors (least rounding error) instead of min-max."""
    act_order: bool = True
    """GPTQ: quantize columns by decreasing Hessian diagonal, with each group's grid fixed before the sweep."""

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"quantization.method={self.method!r} is unknown: choose one of {', '.join(METHODS)}")
        if not 2 <= self.bits <= 4:
            raise ConfigError(f"quantization.bits={self.bits} must be between 2 and 4 (codes are packed two per byte)")
        if self.group_size >= 1 and self.blocksize >= 1 and self.blocksize % self.group_size:
            raise ConfigError(f"quantization.blocksize={self.blocksize} must be a multiple of group_size="
                              f"{self.group_size} (a group's range is taken from weights that are fully updated)")
        if self.group_size < 1 or self.blocksize < 1 or not self.percdamp > 0:
            raise ConfigError(f"quantization: group_size ({self.group_size}) and blocksize ({self.blocksize}) must be "
                              f">= 1, percdamp ({self.percdamp}) > 0")

    @property
    def enabled(self) -> bool:
        return self.method != "none"


@dataclass
class Quantized:
    """One quantized layer: ``codes`` uint8 ``[rows, cols]`` (0 where pruned), ``scales``/``zeros``
    ``[rows, groups]``, and the dequantized fp32 weight."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    dequantized: torch.Tensor
    mask: torch.Tensor | None = None
    """The keep-mask after quantization when it changed (GPTQ zeroes inputs that never fired)."""


SHRINKS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)


def group_grid(w: torch.Tensor, mask: torch.Tensor, bits: int, clip: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point ``[rows]`` of one group ``w`` ``[rows, g]`` from its kept weights.

    ``clip``: also try the range shrunk by each factor of ``SHRINKS`` and keep, per row, the one with the least
    squared rounding error of the kept weights (clipping a few extremes buys a finer step for the rest)."""
    if clip:
        best = None
        for shrink in SHRINKS:
            scale, zero = _minmax_grid(w, mask, bits, shrink)
            q = quantize_column(w, scale.unsqueeze(1), zero.unsqueeze(1), bits)
            err = (((q - zero.unsqueeze(1)) * scale.unsqueeze(1) - w).square() * mask).sum(1)
            if best is None:
                best = (err, scale, zero)
            else:
                better = err < best[0]
                best = (torch.where(better, err, best[0]), torch.where(better, scale, best[1]),
                        torch.where(better, zero, best[2]))
        return best[1], best[2]
    return _minmax_grid(w, mask, bits, 1.0)


def _minmax_grid(w: torch.Tensor, mask: torch.Tensor, bits: int, shrink: float) -> tuple[torch.Tensor, torch.Tensor]:
    maxq = 2**bits - 1
    big = torch.finfo(w.dtype).max
    lo = torch.where(mask, w, torch.full_like(w, big)).amin(1)
    hi = torch.where(mask, w, torch.full_like(w, -big)).amax(1)
    empty = ~mask.any(1)
    # the range always holds 0, so the integer zero point lies in [0, maxq] (a group whose kept weights share
    # one sign would otherwise need a zero point outside the code range and be clipped)
    lo = torch.where(empty, 0.0, lo).clamp_max(0.0) * shrink
    hi = torch.where(empty, 0.0, hi).clamp_min(0.0) * shrink
    scale = torch.where(hi > lo, (hi - lo) / maxq, torch.ones_like(lo))
    scale = scale.to(torch.float16).float().clamp_min(2.0**-24)  # stored as fp16: compute with what is stored
    zero = torch.clamp(torch.round(-lo / scale), 0, maxq)
    return scale, zero


def quantize_column(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes of ``w`` (any shape broadcastable with ``scale``/``zero``)."""
    return torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)


def _grid_shapes(rows: int, cols: int, group: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    groups = (cols + group - 1) // group
    return (torch.zeros(rows, cols, dtype=torch.uint8, device=device),
            torch.zeros(rows, groups, dtype=torch.float32, device=device),
            torch.zeros(rows, groups, dtype=torch.float32, device=device))


def quantize_rtn(weight: torch.Tensor, mask: torch.Tensor, bits: int = 4, group_size: int = 128,
                 clip: bool = False) -> Quantized:
    """Round every kept weight of ``weight`` ``[rows, cols]`` to its group's grid."""
    w = weight.detach().float()
    rows, cols = w.shape
    codes, scales, zeros = _grid_shapes(rows, cols, group_size, w.device)
    deq = torch.zeros_like(w)
    for g, start in enumerate(range(0, cols, group_size)):
        sl = slice(start, min(start + group_size, cols))
        scale, zero = group_grid(w[:, sl], mask[:, sl], bits, clip)
        q = quantize_column(w[:, sl], scale.unsqueeze(1), zero.unsqueeze(1), bits) * mask[:, sl]
        codes[:, sl], scales[:, g], zeros[:, g] = q.to(torch.uint8), scale, zero
        deq[:, sl] = (q - zero.unsqueeze(1)) * scale.unsqueeze(1) * mask[:, sl]
    return Quantized(codes, scales, zeros, deq)


def quantize_gptq(weight: torch.Tensor, hessian: torch.Tensor, mask: torch.Tensor, bits: int = 4,
                  group_size: int = 128, percdamp: float = 0.01, blocksize: int = 128, clip: bool = False,
                  act_order: bool = False) -> Quantized:
    """GPTQ-style quantization of the kept weights; ``hessian`` ``[cols, cols]`` of the layer's inputs."""
    w = weight.detach().float().clone()
    rows, cols = w.shape
    h = hessian.to(w.device).float()
    dead = torch.diag(h) == 0
    mask = mask.to(w.device) & ~dead.unsqueeze(0)
    codes, scales, zeros = _grid_shapes(rows, cols, group_size, w.device)
    group_of = torch.arange(cols, device=w.device) // group_size
    if act_order:  # static groups from the weights as they enter, then the sweep in order of decreasing diag(H)
        for g, start in enumerate(range(0, cols, group_size)):
            sl = slice(start, min(start + group_size, cols))
            scales[:, g], zeros[:, g] = group_grid(w[:, sl], mask[:, sl], bits, clip)
        order = torch.argsort(torch.diag(h), descending=True, stable=True)
    else:
        order = torch.arange(cols, device=w.device)
    upper, _, _ = inverse_hessian_factor(h[order][:, order], percdamp)
    w, keep_p, groups_p = w[:, order], mask[:, order], group_of[order]
    keep = keep_p.float()
    q_all = torch.zeros_like(w)
    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        w_blk = w[:, start:end].clone()
        u_blk = upper[start:end, start:end]
        err_blk = torch.zeros_like(w_blk)
        for j in range(end - start):
            c = start + j
            g = int(groups_p[c])
            if not act_order and c % group_size == 0:  # a new group: its grid from the weights as updated so far
                g_end = min(c + group_size, cols)
                if g_end > end:
                    raise ValueError(f"blocksize {blocksize} must be a multiple of group_size {group_size}")
                scales[:, g], zeros[:, g] = group_grid(w_blk[:, j : j + g_end - c], keep_p[:, c:g_end], bits, clip)
            scale, zero = scales[:, g], zeros[:, g]
            q = quantize_column(w_blk[:, j], scale, zero, bits) * keep[:, c]
            q_all[:, c] = q
            deq = (q - zero) * scale * keep[:, c]
            err = (w_blk[:, j] - deq) / u_blk[j, j]
            w_blk[:, j:] -= err.unsqueeze(1) * u_blk[j, j:].unsqueeze(0)
            err_blk[:, j] = err
        w[:, end:] -= err_blk @ upper[start:end, end:]
    inverse = torch.argsort(order)
    q_all = q_all[:, inverse]
    codes.copy_(q_all.to(torch.uint8))
    deq = (q_all - zeros.repeat_interleave(group_size, 1)[:, :cols]) * scales.repeat_interleave(group_size, 1)[:, :cols]
    return Quantized(codes, scales, zeros, deq * mask, mask)


def bits_per_weight(numel: int, kept: int, groups: int, bits: int, scale_bits: int = 16) -> dict:
    """Storage of one layer, per weight, as ``quantized.safetensors`` holds it: kept values and zero points in
    4-bit nibbles (``bits`` <= 4), a 1-bit keep-mask and an fp16 scale per group; and the same without the mask
    (every position stored)."""
    bits = 4  # storage width of a code, whatever the grid uses
    values, mask, grid = bits * kept, numel, groups * (scale_bits + bits)
    return {"values": values / numel, "mask": mask / numel, "scales": grid / numel,
            "total": (values + mask + grid) / numel, "dense_codes_total": (bits * numel + grid) / numel}
