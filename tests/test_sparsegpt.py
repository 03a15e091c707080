"""SparseGPT against a direct OBS computation (explicit inverses of the remaining-column Hessians)."""

import pytest
import torch

import compressor.pruning.sparsegpt as sparsegpt
from compressor.pruning.masks import achieved_sparsity, nm_mask, smallest_mask
from compressor.pruning.sparsegpt import (
    inverse_hessian_factor,
    output_error,
    sparsegpt_prune,
    sparsegpt_prune_shared,
)


def _random_problem(rows=12, cols=16, tokens=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, cols, generator=g, dtype=torch.float64) * torch.linspace(0.2, 2.0, cols, dtype=torch.float64)
    w = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    return w, 2 * x.T @ x / tokens


def direct_obs(w: torch.Tensor, h: torch.Tensor, keep: torch.Tensor, damp: float) -> torch.Tensor:
    """Prune columns left to right; after each column, compensate the columns on its right with
    the OBS update from the inverse of the Hessian restricted to the not-yet-processed columns."""
    w = w.clone().double()
    h = h.double() + damp * torch.eye(h.shape[0], dtype=torch.float64)
    cols = w.shape[1]
    for q in range(cols):
        hinv = torch.linalg.inv(h[q:, q:])  # inverse over remaining columns q..end
        pruned = w[:, q] * (~keep[:, q])
        # OBS: delta_F = -(w_q / [H_F^-1]_qq) * [H_F^-1]_{q,:}, applied to the pruned part only
        w[:, q:] -= (pruned / hinv[0, 0]).unsqueeze(1) * hinv[0].unsqueeze(0)
    return w


@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_sparsegpt_matches_direct_obs(pattern):
    w, h = _random_problem()
    new_w, mask = sparsegpt_prune(w.float(), h.float(), 0.5, pattern, blocksize=8, percdamp=0.01)
    damp = 0.01 * torch.diag(h).mean().item()
    expected = direct_obs(w, h, mask, damp)
    assert torch.allclose(new_w.double(), expected * mask, atol=1e-4, rtol=1e-4)
    assert (new_w[~mask] == 0).all()


def test_sparsegpt_mask_follows_obs_saliency_in_first_block():
    # in the first column block the mask is the smallest w^2 / [U_qq]^2 over the whole block
    w, h = _random_problem(cols=8)
    _, mask = sparsegpt_prune(w.float(), h.float(), 0.5, None, blocksize=8)
    upper, _, _ = inverse_hessian_factor(h.float())
    scores = w.float().square() / torch.diag(upper).square()
    assert scores[~mask].max() <= scores[mask].min()


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.7])
def test_sparsegpt_achieved_sparsity_equals_request(sparsity):
    w, h = _random_problem(rows=32, cols=64, seed=3)
    _, mask = sparsegpt_prune(w.float(), h.float(), sparsity, blocksize=32)
    assert achieved_sparsity(mask) == pytest.approx(sparsity, abs=1 / 32)
    assert (mask.reshape(32, 2, 32).sum((0, 2)) == 32 * 32 - round(32 * 32 * sparsity)).all()


def test_sparsegpt_beats_magnitude_on_output_error():
    w, h = _random_problem(rows=32, cols=64, seed=4)
    new_w, mask = sparsegpt_prune(w.float(), h.float(), 0.5)
    from compressor.pruning.masks import magnitude_mask

    mag = w.float() * magnitude_mask(w.float(), 0.5)
    assert output_error(w, new_w, h) < 0.5 * output_error(w, mag, h)


def test_dead_inputs_are_zeroed_and_damping_grows_when_needed():
    w, h = _random_problem()
    h[3, :] = 0
    h[:, 3] = 0
    new_w, _ = sparsegpt_prune(w.float(), h.float(), 0.5, blocksize=8)
    assert (new_w[:, 3] == 0).all()
    v = torch.tensor([1.0, 0.5, -0.5, 0.2])
    indefinite = torch.outer(v, v) - 1e-3 * torch.eye(4)  # rank one, pushed slightly below zero
    upper, _, damp = inverse_hessian_factor(indefinite, percdamp=1e-6)
    assert damp > 1e-3 and torch.isfinite(upper).all()


def test_non_finite_hessian_is_refused():
    h = torch.eye(4)
    h[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        inverse_hessian_factor(h)


def _sparsegpt_prune_loop(weight, hessian, sparsity, nm=None, blocksize=128, percdamp=0.01):
    """The textbook algorithm: one column at a time, its error subtracted from the rest of its block."""
    rows, cols = weight.shape
    upper, dead, _ = inverse_hessian_factor(hessian, percdamp, dtype=weight.dtype)
    w = weight.clone()
    w[:, dead] = 0.0
    mask = torch.ones(rows, cols, dtype=torch.bool)
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


def _problem_with_dead_inputs(rows=24, cols=96, seed=5, dead=(5, 6, 50)):
    w, h = _random_problem(rows=rows, cols=cols, tokens=300, seed=seed)
    h[list(dead), :] = 0
    h[:, list(dead)] = 0
    return w, h


PATTERNS = [(0.3, None), (0.5, None), (0.8, None), (0.0, (2, 4)), (0.0, (4, 8))]


@pytest.mark.parametrize("sparsity,nm", PATTERNS)
@pytest.mark.parametrize("leaf,solve_elements", [(32, 2**24), (8, 1000)])
def test_batched_solve_equals_column_loop(monkeypatch, sparsity, nm, leaf, solve_elements):
    # blocksize 40: leaves of 32 + 8 columns, a short last block (96 = 40 + 40 + 16); a small
    # solve budget makes _solve_rows work in chunks of rows
    monkeypatch.setattr(sparsegpt, "LEAF_COLUMNS", leaf)
    monkeypatch.setattr(sparsegpt, "_SOLVE_ELEMENTS", solve_elements)
    w, h = _problem_with_dead_inputs()
    expected, expected_mask = _sparsegpt_prune_loop(w, h, sparsity, nm, blocksize=40)
    new_w, mask = sparsegpt_prune(w, h, sparsity, nm, blocksize=40)
    assert new_w.dtype == torch.float64
    assert torch.equal(mask, expected_mask)
    torch.testing.assert_close(new_w, expected, rtol=0, atol=1e-12)
    assert (new_w[:, [5, 6, 50]] == 0).all()


@pytest.mark.parametrize("sparsity,nm", [(0.5, None), (0.0, (2, 4))])
def test_float32_fast_path_is_close_to_float64_loop(sparsity, nm):
    w, h = _problem_with_dead_inputs(rows=16, cols=64)
    expected, expected_mask = _sparsegpt_prune_loop(w, h, sparsity, nm, blocksize=32)
    new_w, mask = sparsegpt_prune(w.float(), h.float(), sparsity, nm, blocksize=32)
    assert new_w.dtype == torch.float32
    assert torch.equal(mask, expected_mask)
    torch.testing.assert_close(new_w.double(), expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("sparsity,nm", [(0.5, None), (0.0, (2, 4))])
def test_shared_hessian_equals_separate_calls(sparsity, nm):
    # rows 12 + 20 + 12: each weight keeps its own unstructured mask quota per block
    w, h = _problem_with_dead_inputs(rows=44, cols=64)
    parts = list(w.split([12, 20, 12]))
    shared = sparsegpt_prune_shared(parts, h, sparsity, nm, blocksize=32)
    for part, (new_w, mask) in zip(parts, shared):
        alone_w, alone_mask = sparsegpt_prune(part, h, sparsity, nm, blocksize=32)
        assert torch.equal(mask, alone_mask)
        torch.testing.assert_close(new_w, alone_w, rtol=0, atol=1e-12)


def test_shapes_are_checked():
    w, h = _random_problem(rows=4, cols=16)
    with pytest.raises(ValueError, match="match the Hessian"):
        sparsegpt_prune_shared([w, w[:, :8]], h, 0.5)
    with pytest.raises(ValueError, match="multiple of M"):
        sparsegpt_prune(w, h, 0.5, (2, 4), blocksize=6)
    with pytest.raises(ValueError, match="divisible by 8"):
        sparsegpt_prune(w[:, :12], h[:12, :12], 0.5, (4, 8), blocksize=8)
