"""SparseGPT (Frantar & Alistarh, 2023) as pure tensor math: OBS pruning with lazy batch updates.

Implemented from the definitions in ``shared/guide/algorithms.md`` section 1:
H = (2/n) sum x x^T over calibration tokens, damping ``percdamp * mean(diag H)``, dead inputs
(diag H == 0) get diag 1 and their weight column zeroed, columns processed left to right in
blocks, the mask of a block chosen by the smallest w^2 / [U_qq]^2 (U the upper Cholesky factor
of H^-1), and each pruned column's error propagated to the columns on its right.

How it is made fast (the results are those of the column-by-column algorithm up to round-off).
Processing column j of a block turns its current value u_j into the error e_j = c_j u_j, with
c_j = (1 - keep_j) / U_jj per row, and subtracts e_j U[j, j':] from every column j' > j. So the
value column j holds when its turn comes is

    u_j = w0_j - sum_{i<j} c_i u_i U_ij,   i.e. per row r:   u_r (I + diag(c_r) U_strict) = w0_r,

a unit upper-triangular system whose matrix differs per row only through c_r. Once the keep-mask
of some columns is known, their u for all rows comes from one batched triangular solve instead
of a loop of small kernels per column:

* unstructured: the mask of a block is fixed before any of its columns is processed, so the
  block is solved in sub-blocks of ``LEAF_COLUMNS`` columns (one batched solve each, the per-row
  matrices ``[rows, leaf, leaf]`` staying small), each sub-block first receiving the errors of
  the sub-blocks to its left with one matmul;
* N:M: the mask of an M-column group is chosen from the group's values after the updates of all
  columns to its left, so the sub-block is the group: one matmul, the top-k choice, one solve.

After a block, its kept columns are ``w0 - E U_strict`` (E the block's errors) and the columns
to its right receive ``E U[block, right]``, as in the lazy batch update of the paper.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from itertools import accumulate

import torch

from compressor.pruning.masks import smallest_mask

log = logging.getLogger(__name__)

LEAF_COLUMNS = 32
"""Columns per batched solve in the unstructured path: larger means fewer kernels but per-row
matrices of ``rows * LEAF_COLUMNS**2`` elements to build and read."""

_SOLVE_ELEMENTS = 2**24
"""Rows are solved in chunks whose per-row matrices hold at most this many elements (64 MiB fp32)."""


_HALF_INTO_FP32: dict[str, bool] = {}


def _half_into_fp32(x: torch.Tensor) -> bool:
    """Whether ``torch.mm`` here multiplies bf16/fp16 ``x`` into an fp32 output (CUDA, recent PyTorch)."""
    key = f"{x.device.type}:{x.dtype}"
    if key not in _HALF_INTO_FP32:
        try:
            probe = torch.ones(2, 2, dtype=x.dtype, device=x.device)
            _HALF_INTO_FP32[key] = torch.mm(probe, probe, out_dtype=torch.float32).dtype == torch.float32
        except (TypeError, RuntimeError, NotImplementedError):
            _HALF_INTO_FP32[key] = False
    return _HALF_INTO_FP32[key]


def gram_update(gram: torch.Tensor, x: torch.Tensor) -> int:
    """Add ``x^T x`` of inputs ``x`` ``[..., cols]`` into the fp32 ``gram``; returns the token count.

    bf16/fp16 inputs on a GPU are multiplied as they are, into an fp32 output (tensor cores, no fp32
    copy of the activations; products of half-precision numbers are exact in fp32, so only the
    accumulation order differs: bench/results/perf_sparsegpt_block.json measures 2.8e-5 relative
    error on a LLaMA-7B-shaped block). Elsewhere the inputs are converted to fp32 first.
    """
    x = x.reshape(-1, x.shape[-1])
    if x.dtype in (torch.bfloat16, torch.float16) and x.device.type == "cuda" and _half_into_fp32(x):
        gram.add_(torch.mm(x.t(), x, out_dtype=torch.float32))
    else:
        x = x.to(gram.dtype)
        gram.addmm_(x.t(), x)
    return x.shape[0]


def hessian_from_gram(gram: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """The layer Hessian H = (2/n) sum x x^T."""
    return gram * (2.0 / max(n_tokens, 1))


def inverse_hessian_factor(
    hessian: torch.Tensor, percdamp: float = 0.01, max_tries: int = 6, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Upper Cholesky factor U ``[cols, cols]`` of the damped H^-1 (H^-1 = U^T U), computed in ``dtype``.

    Returns ``(U, dead, damp)``: ``dead`` ``[cols]`` marks inputs that never fired (their columns
    must be zeroed). If H + damp*I is not positive definite, damping grows tenfold, up to ``max_tries``.
    """
    h = hessian.detach().to(dtype, copy=True)  # damped in place below; the caller's Hessian is left as it is
    if not torch.isfinite(h).all():
        raise FloatingPointError("Hessian has non-finite entries (NaN/Inf in the calibration activations)")
    diag = h.diagonal()
    dead = diag == 0
    diag[dead] = 1.0
    undamped = diag.clone()
    damp_frac = percdamp
    for attempt in range(max_tries):
        # at most three [cols, cols] tensors alive at once (5.4 GB each at OPT-66B's MLP width)
        damp = damp_frac * torch.mean(undamped).item()
        diag.copy_(undamped + damp)
        chol, info = torch.linalg.cholesky_ex(h)
        if info.item() == 0:
            del h
            hinv = torch.cholesky_inverse(chol)
            del chol
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if info.item() == 0:
                if attempt:
                    log.warning("Hessian needed damping %.3g (x%d the configured one)", damp_frac, 10**attempt)
                return upper, dead, damp
            h = hessian.detach().to(dtype, copy=True)  # start over from the caller's Hessian
            diag = h.diagonal()
            diag[dead] = 1.0
        damp_frac *= 10
    raise FloatingPointError(f"Hessian is not positive definite even with damping {damp_frac / 10:g} * mean(diag)")


def _solve_rows(rhs: torch.Tensor, c: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """Solve ``u_r (I + diag(c_r) triu(upper, 1)) = rhs_r`` for every row r.

    Args:
        rhs, c: ``[rows, k]``.
        upper: ``[k, k]``, upper triangular; its diagonal is not used.
    Returns ``u`` ``[rows, k]``.
    """
    rows, k = rhs.shape
    step = max(1, _SOLVE_ELEMENTS // (k * k))
    parts = []
    for r0 in range(0, rows, step):
        # Row j of row r's matrix is c_rj * upper[j, :]; unitriangular=True reads 1 on the diagonal.
        a = c[r0 : r0 + step, :, None] * upper
        b = rhs[r0 : r0 + step, None, :]
        parts.append(torch.linalg.solve_triangular(a, b, upper=True, left=False, unitriangular=True).squeeze(1))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def row_segments(weights: Sequence[torch.Tensor], sparsity: float | Sequence[float]) -> list[tuple[int, int, float]]:
    """``(first_row, end_row, sparsity)`` of each weight once ``weights`` are stacked row-wise; ``sparsity``: one
    for all, or one per weight."""
    sizes = [x.shape[0] for x in weights]
    ends = list(accumulate(sizes))
    sparsities = [float(sparsity)] * len(weights) if isinstance(sparsity, (int, float)) else list(sparsity)
    if len(sparsities) != len(weights):
        raise ValueError(f"{len(sparsities)} sparsities given for {len(weights)} weights")
    return list(zip([0, *ends[:-1]], ends, sparsities))


def segment_mask(scores: torch.Tensor, segments: Sequence[tuple[int, int, float]]) -> torch.Tensor:
    """SparseGPT's keep-mask of one block of stacked weights: the lowest ``scores`` of each weight pruned."""
    return torch.cat([smallest_mask(scores[r0:r1], s) for r0, r1, s in segments])


def _prune_in_place(
    w: torch.Tensor,
    upper: torch.Tensor,
    nm: tuple[int, int] | None,
    blocksize: int,
    segments: Sequence[tuple[int, int, float]],
) -> torch.Tensor:
    """Prune ``w`` ``[rows, cols]`` in place given U ``[cols, cols]``; returns the keep-mask.

    ``segments``: ``(first_row, end_row, sparsity)`` of each weight stacked in ``w``; an unstructured
    mask is chosen per block within each segment, as if each weight were pruned on its own.
    """
    rows, cols = w.shape
    mask = torch.ones(rows, cols, dtype=torch.bool, device=w.device)
    step = nm[1] if nm else LEAF_COLUMNS
    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        blk = w[:, start:end]  # a view: the block's original values until the end of the block
        keep = mask[:, start:end]
        u_blk = upper[start:end, start:end]
        diag = torch.diag(u_blk)
        diag_sq = diag.square()
        inv_d = diag.reciprocal()
        err = torch.empty_like(blk)  # e_j = c_j u_j, every column written below
        if nm is None:
            keep.copy_(segment_mask(blk.square() / diag_sq, segments))
            c = torch.where(keep, 0.0, inv_d)
        for j0 in range(0, end - start, step):
            j1 = min(j0 + step, end - start)
            # current values of columns j0:j1: original minus the errors of this block's columns to the left
            cur = blk[:, j0:j1] if j0 == 0 else torch.addmm(blk[:, j0:j1], err[:, :j0], u_blk[:j0, j0:j1], alpha=-1)
            if nm is None:
                c_sub = c[:, j0:j1]
            else:
                pruned = torch.topk(cur.square() / diag_sq[j0:j1], nm[1] - nm[0], dim=1, largest=False).indices
                keep[:, j0:j1].scatter_(1, pruned, False)
                c_sub = torch.where(keep[:, j0:j1], 0.0, inv_d[j0:j1])
            u = _solve_rows(cur, c_sub, u_blk[j0:j1, j0:j1])
            torch.mul(u, c_sub, out=err[:, j0:j1])
        # kept columns end at their u = w0 - E U_strict (= w0 - E U, as e_j = 0 where kept); pruned ones at 0
        blk.addmm_(err, u_blk, alpha=-1)
        blk.mul_(keep)
        w[:, end:].addmm_(err, upper[start:end, end:], alpha=-1)
    return mask


def sparsegpt_prune_shared(
    weights: Sequence[torch.Tensor],
    hessian: torch.Tensor,
    sparsity: float | Sequence[float],
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Prune weights ``[rows_i, cols]`` that read the same inputs (q/k/v, gate/up) with one factorization.

    The weights are stacked row-wise and pruned in one pass (fewer, larger kernels); masks are
    chosen per weight, so each result equals ``sparsegpt_prune(weights[i], hessian, ...)`` up to
    round-off. ``sparsity``: one for all, or one per weight. ``act_order`` (unstructured only): the
    sweep takes the columns by decreasing diag(H), so the inputs with the most energy are decided
    first, while the most columns are left to absorb their error. Returns ``[(new_weight, keep_mask)]``
    in the order of ``weights``; other arguments as in :func:`sparsegpt_prune`.
    """
    cols = hessian.shape[0]
    if any(x.dim() != 2 or x.shape[1] != cols for x in weights):
        shapes = [tuple(x.shape) for x in weights]
        raise ValueError(f"weights must be [rows, {cols}] to match the Hessian, got {shapes}")
    if act_order:
        if nm:
            raise ValueError("act_order needs unstructured pruning: N:M groups are contiguous inputs")
        order = torch.argsort(torch.diag(hessian), descending=True, stable=True).to(weights[0].device)
        back = torch.argsort(order)
        h = hessian.to(order.device)[order][:, order]
        done = sparsegpt_prune_shared([x[:, order] for x in weights], h, sparsity, None, blocksize, percdamp)
        return [(w[:, back], m[:, back]) for w, m in done]
    if nm and blocksize % nm[1]:
        raise ValueError(f"blocksize {blocksize} must be a multiple of M={nm[1]}")
    if nm and cols % nm[1]:
        raise ValueError(f"N:M pattern {nm[0]}:{nm[1]} needs in_features divisible by {nm[1]}, got {cols}")
    # fp32 math (fp64 when given fp64 weights, e.g. for tests against a reference)
    dtype = torch.float64 if any(x.dtype == torch.float64 for x in weights) else torch.float32
    device = weights[0].device
    upper, dead, _ = inverse_hessian_factor(hessian.to(device), percdamp, dtype=dtype)
    w = torch.cat([x.detach().to(dtype) for x in weights])  # a fresh copy, pruned in place
    w.masked_fill_(dead, 0.0)
    segments = row_segments(weights, sparsity)
    mask = _prune_in_place(w, upper, nm, blocksize, segments)
    sizes = [r1 - r0 for r0, r1, _ in segments]
    return list(zip(w.split(sizes), mask.split(sizes)))


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``weight`` ``[rows, cols]`` with the OBS update; returns ``(new_weight fp32, keep_mask)``.

    The math runs in fp32 (fp64 for an fp64 ``weight``, whose result is then fp64).

    Args:
        hessian: ``[cols, cols]`` layer Hessian of the inputs.
        sparsity: fraction pruned per column block (unstructured); ignored when ``nm`` is given.
        nm: ``(n, m)`` to keep ``n`` of every ``m`` consecutive inputs of each row.
        blocksize: columns per lazy-update block (a multiple of ``m`` for N:M).
    """
    return sparsegpt_prune_shared([weight], hessian, sparsity, nm, blocksize, percdamp)[0]


def output_error(weight: torch.Tensor, new_weight: torch.Tensor, hessian: torch.Tensor) -> float:
    """Layer output error tr((W - W') H (W - W')^T) / 2, i.e. the mean squared output change."""
    delta = (weight.float() - new_weight.float())
    return 0.5 * torch.sum((delta @ hessian.float()) * delta).item()
