"""SparseGPT (Frantar & Alistarh, 2023) as pure tensor math: OBS pruning with lazy batch updates.

Implemented from the definitions in ``shared/guide/algorithms.md`` section 1:
H = (2/n) sum x x^T over calibration tokens, damping ``percdamp * mean(diag H)``, dead inputs
(diag H == 0) get diag 1 and their weight column zeroed, columns processed left to right in
blocks, the mask of a block chosen by the smallest w^2 / [U_qq]^2 (U the upper Cholesky factor
of H^-1), and each pruned column's error propagated to the columns on its right.
"""

from __future__ import annotations

import logging

import torch

from compressor.pruning.masks import nm_mask, smallest_mask

log = logging.getLogger(__name__)


def gram_update(gram: torch.Tensor, x: torch.Tensor) -> int:
    """Add ``x^T x`` (fp32 accumulation) of inputs ``x`` ``[..., cols]`` into ``gram``; returns the token count."""
    x = x.reshape(-1, x.shape[-1]).to(gram.dtype)
    gram.addmm_(x.t(), x)
    return x.shape[0]


def hessian_from_gram(gram: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """The layer Hessian H = (2/n) sum x x^T."""
    return gram * (2.0 / max(n_tokens, 1))


def inverse_hessian_factor(
    hessian: torch.Tensor, percdamp: float = 0.01, max_tries: int = 6
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Upper Cholesky factor U of the damped H^-1 (H^-1 = U^T U).

    Returns ``(U, dead, damp)``: ``dead`` marks inputs that never fired (their columns must be
    zeroed). If H + damp*I is not positive definite, damping grows tenfold, up to ``max_tries``.
    """
    h = hessian.detach().float().clone()
    if not torch.isfinite(h).all():
        raise FloatingPointError("Hessian has non-finite entries (NaN/Inf in the calibration activations)")
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    eye = torch.eye(h.shape[0], device=h.device, dtype=h.dtype)
    damp_frac = percdamp
    for attempt in range(max_tries):
        damp = damp_frac * torch.mean(torch.diag(h)).item()
        chol, info = torch.linalg.cholesky_ex(h + damp * eye)
        if info.item() == 0:
            hinv = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if info.item() == 0:
                if attempt:
                    log.warning("Hessian needed damping %.3g (x%d the configured one)", damp_frac, 10**attempt)
                return upper, dead, damp
        damp_frac *= 10
    raise FloatingPointError(f"Hessian is not positive definite even with damping {damp_frac / 10:g} * mean(diag)")


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``weight`` ``[rows, cols]`` with the OBS update; returns ``(new_weight fp32, keep_mask)``.

    Args:
        hessian: ``[cols, cols]`` layer Hessian of the inputs.
        sparsity: fraction pruned per column block (unstructured); ignored when ``nm`` is given.
        nm: ``(n, m)`` to keep ``n`` of every ``m`` consecutive inputs of each row.
        blocksize: columns per lazy-update block (a multiple of ``m`` for N:M).
    """
    rows, cols = weight.shape
    if nm and blocksize % nm[1]:
        raise ValueError(f"blocksize {blocksize} must be a multiple of M={nm[1]}")
    upper, dead, _ = inverse_hessian_factor(hessian.to(weight.device), percdamp)
    w = weight.detach().float().clone()
    w[:, dead] = 0.0
    mask = torch.ones(rows, cols, dtype=torch.bool, device=w.device)
    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        w_blk = w[:, start:end].clone()
        u_blk = upper[start:end, start:end]
        diag = torch.diag(u_blk)
        err_blk = torch.zeros_like(w_blk)
        if nm is None:
            mask[:, start:end] = smallest_mask(w_blk.square() / diag.square(), sparsity)
        for j in range(end - start):
            if nm is not None and j % nm[1] == 0:
                sl = slice(j, j + nm[1])
                mask[:, start + j : start + j + nm[1]] = nm_mask(w_blk[:, sl].square() / diag[sl].square(), *nm)
            col = w_blk[:, j]
            err = (col - col * mask[:, start + j]) / diag[j]
            w_blk[:, j:] -= err.unsqueeze(1) * u_blk[j, j:].unsqueeze(0)
            err_blk[:, j] = err
        w[:, start:end] = w_blk * mask[:, start:end]
        w[:, end:] -= err_blk @ upper[start:end, end:]
    return w, mask


def output_error(weight: torch.Tensor, new_weight: torch.Tensor, hessian: torch.Tensor) -> float:
    """Layer output error tr((W - W') H (W - W')^T) / 2, i.e. the mean squared output change."""
    delta = (weight.float() - new_weight.float())
    return 0.5 * torch.sum((delta @ hessian.float()) * delta).item()
