"""SparseGPT against a direct OBS computation (explicit inverses of the remaining-column Hessians)."""

import pytest
import torch

from compressor.pruning.masks import achieved_sparsity
from compressor.pruning.sparsegpt import inverse_hessian_factor, output_error, sparsegpt_prune


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
