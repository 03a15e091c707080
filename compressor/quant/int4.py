"""Low-bit weights for pruned layers, pure tensor math: round-to-nearest and GPTQ-style.

Asymmetric per-row groups of ``group_size`` input columns: ``scale = (max - min) / (2^bits - 1)`` and an
integer zero point, both from the *kept* weights of the group (pruned weights are recorded by the
mask, so they need not be representable). Dequantized ``(q - zero) * scale`` times the mask:
pruned weights stay exactly zero. Symmetric groups (``symmetric``) fix the zero point at 2^(bits-1) and take
``scale = 2 max|w| / (2^bits - 1)``: codes -8..7 around zero for 4 bits, GPTQ's symmetric grid and the layout
GPU W4A16 kernels read (compressed-tensors, vLLM); one parameter per group instead of two, a coarser fit.

GPTQ (Frantar et al. 2023) quantizes the columns left to right and spreads each column's rounding
error over the columns to its right through the upper Cholesky factor U of H^-1, the same factor
SparseGPT uses; a pruned position's "quantized" value is 0, so the OBS update also keeps the
pruned weights' removal compensated. A group's scale and zero are taken when the sweep reaches
its first column, from the already-updated weights.

With ``act_order`` the sweep visits the columns by decreasing diag(H) (the inputs with the most
energy first, while the most columns are left to absorb their error), and every group's grid is
fixed beforehand from the weights as they enter (static groups): the groups stay contiguous
column ranges in the stored layout, so nothing else (packing, loading) changes.

Joint mode (``sparsegpt_gptq_shared``, unstructured) prunes and quantizes in the same sweep, as the
SparseGPT paper proposes for combining the two: a block's mask is chosen on values that already carry
the rounding errors of the columns before it, and each column's pruning and rounding errors are
compensated together, once. Its grids are fixed first from a SparseGPT pass (the values pruning leaves).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from compressor.config import ConfigError
from compressor.pruning.sparsegpt import inverse_hessian_factor, row_segments, segment_mask, sparsegpt_prune_shared

log = logging.getLogger(__name__)

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
    symmetric: bool = False
    """Symmetric groups: zero point fixed at 2^(bits-1), scale 2*max|w|/(2^bits-1) (the layout vLLM's W4A16
    kernels take; needed by output.format=compressed-tensors). False: each group's own min-max range and zero
    point (a closer fit)."""
    joint: bool = True
    """GPTQ with unstructured SparseGPT and no reconstruction: prune and quantize in one sweep, with this section's
    blocksize, percdamp and act_order (pruning's are not used then; a differing one is logged). False, or N:M, or
    reconstruction: quantize the pruned (reconstructed) weights afterwards with the masks fixed. In one sweep the
    per-layer error (pruning and rounding together) is reported as the layer's error, with no rounding share."""

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


def group_grid(w: torch.Tensor, mask: torch.Tensor, bits: int, clip: bool = False,
               symmetric: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point ``[rows]`` of one group ``w`` ``[rows, g]`` from its kept weights (``symmetric``: the
    zero point is 2^(bits-1) and the range +-max|w|).

    ``clip``: also try the range shrunk by each factor of ``SHRINKS`` and keep, per row, the one with the least
    squared rounding error of the kept weights (clipping a few extremes buys a finer step for the rest)."""
    if clip:
        best = None
        for shrink in SHRINKS:
            scale, zero = _minmax_grid(w, mask, bits, shrink, symmetric)
            q = quantize_column(w, scale.unsqueeze(1), zero.unsqueeze(1), bits)
            err = (((q - zero.unsqueeze(1)) * scale.unsqueeze(1) - w).square() * mask).sum(1)
            if best is None:
                best = (err, scale, zero)
            else:
                better = err < best[0]
                best = (torch.where(better, err, best[0]), torch.where(better, scale, best[1]),
                        torch.where(better, zero, best[2]))
        return best[1], best[2]
    return _minmax_grid(w, mask, bits, 1.0, symmetric)


def _minmax_grid(w: torch.Tensor, mask: torch.Tensor, bits: int, shrink: float,
                 symmetric: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    maxq = 2**bits - 1
    big = torch.finfo(w.dtype).max
    lo = torch.where(mask, w, torch.full_like(w, big)).amin(1)
    hi = torch.where(mask, w, torch.full_like(w, -big)).amax(1)
    empty = ~mask.any(1)
    if symmetric:  # codes -2^(bits-1) .. 2^(bits-1)-1 around a fixed zero; +max|w| rounds to the top code
        amax = torch.where(empty, 0.0, torch.maximum(lo.abs(), hi.abs())) * shrink
        scale = torch.where(amax > 0, 2 * amax / maxq, torch.ones_like(amax))
        scale = scale.to(torch.float16).float().clamp_min(2.0**-24)
        return scale, torch.full_like(scale, float(2 ** (bits - 1)))
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
                 clip: bool = False, symmetric: bool = False) -> Quantized:
    """Round every kept weight of ``weight`` ``[rows, cols]`` to its group's grid."""
    w = weight.detach().float()
    scales, zeros = static_grids(w, mask, bits, group_size, clip, symmetric)
    cols = torch.arange(w.shape[1], device=w.device) // group_size
    scale, zero = scales[:, cols], zeros[:, cols]
    codes = quantize_column(w, scale, zero, bits) * mask
    return Quantized(codes.to(torch.uint8), scales, zeros, (codes - zero) * scale * mask)


def static_grids(w: torch.Tensor, mask: torch.Tensor, bits: int, group_size: int,
                 clip: bool, symmetric: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zero points ``[rows, groups]`` of every group of ``w`` from its kept weights."""
    _, scales, zeros = _grid_shapes(*w.shape, group_size, w.device)
    for g, start in enumerate(range(0, w.shape[1], group_size)):
        sl = slice(start, min(start + group_size, w.shape[1]))
        scales[:, g], zeros[:, g] = group_grid(w[:, sl], mask[:, sl], bits, clip, symmetric)
    return scales, zeros


def quantize_gptq(weight: torch.Tensor, hessian: torch.Tensor, mask: torch.Tensor, bits: int = 4,
                  group_size: int = 128, percdamp: float = 0.01, blocksize: int = 128, clip: bool = False,
                  act_order: bool = False, symmetric: bool = False) -> Quantized:
    """GPTQ-style quantization of the kept weights; ``hessian`` ``[cols, cols]`` of the layer's inputs."""
    w = weight.detach().float()
    mask = mask.to(w.device) & (torch.diag(hessian) != 0).to(w.device).unsqueeze(0)
    order, grids = None, None
    if act_order:  # static groups from the weights as they enter, then the sweep in order of decreasing diag(H)
        order = torch.argsort(torch.diag(hessian), descending=True, stable=True).to(w.device)
        grids = static_grids(w, mask, bits, group_size, clip, symmetric)
    return _gptq(w, hessian, mask, bits, group_size, percdamp, blocksize, clip, order, grids, symmetric=symmetric)


def sparsegpt_gptq_shared(weights: Sequence[torch.Tensor], hessian: torch.Tensor, sparsity: float | Sequence[float],
                          cfg: QuantizationConfig) -> list[Quantized]:
    """Prune and quantize weights ``[rows_i, cols]`` reading one input in a single GPTQ sweep (joint mode).

    The grids are fixed first, from the kept weights of a SparseGPT pass in the sweep's column order (the
    values pruning leaves, which the sweep's own pruning updates move the weights towards; grids from the
    weights as they enter clip those values). Then each block of ``cfg.blocksize`` columns gets its keep-mask
    when the sweep reaches it, by SparseGPT's criterion w^2 / U_qq^2 on the values as updated so far (per
    weight, ``sparsity`` each); every column is rounded to its grid (0 where pruned) and its whole error,
    pruning and rounding together, goes to the columns to its right. With ``cfg.act_order`` the columns go by
    decreasing diag(H). Unstructured only: an N:M group is a run of contiguous inputs, which an act-order sweep
    does not visit together, and left to right it measured worse than GPTQ after pruning (bench/results/
    protocol_schedule.json). Returns one ``Quantized`` per weight (``mask``: the chosen keep-mask).
    """
    segments = row_segments(weights, sparsity)
    sizes = [r1 - r0 for r0, r1, _ in segments]
    w = torch.cat([x.detach().float() for x in weights])
    h = hessian.to(w.device)
    order = torch.argsort(torch.diag(h), descending=True, stable=True) if cfg.act_order else None
    pruned = sparsegpt_prune_shared(list(w.split(sizes)), h, [s for _, _, s in segments], None, cfg.blocksize,
                                    cfg.percdamp, act_order=cfg.act_order)
    grid_w, grid_mask = torch.cat([x for x, _ in pruned]), torch.cat([m for _, m in pruned])
    del pruned
    grids = static_grids(grid_w, grid_mask, cfg.bits, cfg.group_size, cfg.clip, cfg.symmetric)
    del grid_w, grid_mask
    keep = (torch.diag(h) != 0).unsqueeze(0).expand_as(w).clone()
    res = _gptq(w, h, keep, cfg.bits, cfg.group_size, cfg.percdamp, cfg.blocksize, cfg.clip, order, grids,
                lambda scores: segment_mask(scores, segments))
    parts = zip(res.codes.split(sizes), res.scales.split(sizes), res.zeros.split(sizes), res.dequantized.split(sizes),
                res.mask.split(sizes))
    return [Quantized(*p) for p in parts]


def _gptq(w: torch.Tensor, hessian: torch.Tensor, mask: torch.Tensor, bits: int, group_size: int, percdamp: float,
          blocksize: int, clip: bool, order: torch.Tensor | None = None, grids=None, choose=None,
          symmetric: bool = False) -> Quantized:
    """The GPTQ sweep over the columns of ``w`` (fp32) in ``order`` (default: left to right).

    ``grids``: ``(scales, zeros)`` fixed beforehand; without, a group's grid is taken when the sweep reaches its
    first column (left to right only), from the weights as updated so far. ``choose``: None (``mask`` fixed) or
    a function of SparseGPT's scores ``[rows, block]``: the block's keep-mask becomes ``mask & choose(scores)``
    when the sweep reaches it."""
    rows, cols = w.shape
    if blocksize % group_size:
        raise ValueError(f"blocksize {blocksize} must be a multiple of group_size {group_size}")
    order = torch.arange(cols, device=w.device) if order is None else order
    h = hessian.to(w.device).float()[order][:, order]
    upper, dead, _ = inverse_hessian_factor(h, percdamp)
    del h
    codes, scales, zeros = _grid_shapes(rows, cols, group_size, w.device)
    if grids is not None:
        scales[:], zeros[:] = grids
    w, keep_p = w[:, order], mask[:, order] & ~dead.unsqueeze(0)  # fresh tensors in sweep order
    w.masked_fill_(dead, 0.0)
    group_of = (torch.arange(cols, device=w.device) // group_size)[order]
    diag_sq = torch.diag(upper).square()
    maxq = 2**bits - 1
    graphs = _GraphedSweep() if grids is not None and w.is_cuda else None
    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        w_blk = w[:, start:end].clone()
        u_blk = upper[start:end, start:end]
        if choose is not None:
            keep_p[:, start:end] &= choose(w_blk.square() / diag_sq[start:end])
        kept_blk = keep_p[:, start:end].float()
        err_t = torch.empty(end - start, rows, device=w.device)  # errors by column, each row contiguous
        if grids is not None:  # every grid known: the block's columns in one go (one CUDA graph replay on a GPU)
            g_blk = group_of[start:end]
            args = (w_blk, u_blk, scales[:, g_blk], zeros[:, g_blk], kept_blk, maxq)
            deq_blk, err_t = graphs(*args) if graphs is not None else _sweep(*args)
            w[:, start:end] = deq_blk
        else:  # each group's grid from the weights as updated when the sweep reaches it
            deq_blk = torch.empty_like(w_blk)
            for j0 in range(0, end - start, group_size):
                g, j1 = (start + j0) // group_size, min(j0 + group_size, end - start)
                scales[:, g], zeros[:, g] = group_grid(w_blk[:, j0:j1], keep_p[:, start + j0 : start + j1], bits, clip,
                                                       symmetric)
                _sweep(w_blk, u_blk, scales[:, g : g + 1].expand(-1, end - start),
                       zeros[:, g : g + 1].expand(-1, end - start), kept_blk, maxq, (j0, j1), deq_blk, err_t)
            w[:, start:end] = deq_blk
        w[:, end:].addmm_(err_t.t(), upper[start:end, end:], alpha=-1)
    back = torch.argsort(order)
    deq, mask = w[:, back], keep_p[:, back]
    cols_group = torch.arange(cols, device=w.device) // group_size
    scale, zero = scales[:, cols_group], zeros[:, cols_group]
    codes.copy_((torch.round(deq / scale) + zero).clamp_(0, maxq).mul_(mask))  # exact: deq lies on the grid
    return Quantized(codes, scales, zeros, deq * mask, mask)


def _sweep(w_blk: torch.Tensor, u_blk: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, kept: torch.Tensor,
           maxq: int, span: tuple[int, int] | None = None, deq: torch.Tensor | None = None,
           err_t: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's column loop over columns ``span`` of one block (default: all): each column rounded to its grid
    (``scale``/``zero``/``kept`` ``[rows, block]``, 0 where pruned), its error divided by U_jj and spread over the
    block's columns to its right (``w_blk`` is updated in place). Returns ``(deq [rows, block], err_t [block, rows])``."""
    rows, width = w_blk.shape
    j0, j1 = span or (0, width)
    deq = torch.empty_like(w_blk) if deq is None else deq
    err_t = torch.empty(width, rows, device=w_blk.device) if err_t is None else err_t
    for j in range(j0, j1):
        col = w_blk[:, j]
        q = torch.round(col / scale[:, j]).add_(zero[:, j]).clamp_(0, maxq)
        torch.mul((q - zero[:, j]).mul_(scale[:, j]), kept[:, j], out=deq[:, j])
        torch.div(col - deq[:, j], u_blk[j, j], out=err_t[j])
        w_blk[:, j:].addr_(err_t[j], u_blk[j, j:], alpha=-1)
    return deq, err_t


class _GraphedSweep:
    """``_sweep`` over whole blocks as CUDA graphs, one per block shape: the loop launches about ten small kernels
    per column, so on a GPU it is bound by the host; a graph replays a block's ~1,300 kernels with one launch.
    Falls back to ``_sweep`` for good if capturing fails."""

    def __init__(self):
        self.graphs: dict[tuple, tuple] = {}
        self.failed = False

    def __call__(self, w_blk, u_blk, scale, zero, kept, maxq):
        if self.failed:
            return _sweep(w_blk, u_blk, scale, zero, kept, maxq)
        key = (tuple(w_blk.shape), maxq, w_blk.device)
        if key not in self.graphs:
            try:
                with torch.cuda.device(w_blk.device):  # streams and the graph on the weights' GPU
                    self.graphs[key] = self._capture(w_blk, u_blk, scale, zero, kept, maxq)
            except RuntimeError as e:  # e.g. an allocator setting that graphs do not support
                log.info("GPTQ column loop runs without CUDA graphs (%s)", e)
                self.failed = True
                return _sweep(w_blk, u_blk, scale, zero, kept, maxq)
        graph, inputs, outputs = self.graphs[key]
        for static, value in zip(inputs, (w_blk, u_blk, scale, zero, kept)):
            static.copy_(value)
        graph.replay()
        return outputs[0].clone(), outputs[1].clone()

    @staticmethod
    def _capture(w_blk, u_blk, scale, zero, kept, maxq):
        inputs = [t.clone() for t in (w_blk, u_blk, scale, zero, kept)]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph, as capture requires
            _sweep(*[t.clone() for t in inputs], maxq)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = _sweep(*inputs, maxq)
        return graph, inputs, outputs


def bits_per_weight(numel: int, kept: int, groups: int, bits: int, scale_bits: int = 16) -> dict:
    """Storage of one layer, per weight, as ``quantized.safetensors`` holds it: kept values and zero points in
    4-bit nibbles (``bits`` <= 4), a 1-bit keep-mask and an fp16 scale per group; and the same without the mask
    (every position stored)."""
    bits = 4  # storage width of a code, whatever the grid uses
    values, mask, grid = bits * kept, numel, groups * (scale_bits + bits)
    return {"values": values / numel, "mask": mask / numel, "scales": grid / numel,
            "total": (values + mask + grid) / numel, "dense_codes_total": (bits * numel + grid) / numel}
