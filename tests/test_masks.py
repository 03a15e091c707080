import pytest
import torch

from compressor.pruning.masks import achieved_sparsity, magnitude_mask, nm_mask, row_mask, wanda_mask


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_mask_keeps_exactly_n_largest_of_every_m(n, m):
    torch.manual_seed(0)
    scores = torch.rand(16, 64)
    mask = nm_mask(scores, n, m)
    groups = mask.reshape(16, -1, m)
    assert (groups.sum(-1) == n).all()
    kept_min = torch.where(groups, scores.reshape(16, -1, m), torch.inf).amin(-1)
    pruned_max = torch.where(~groups, scores.reshape(16, -1, m), -torch.inf).amax(-1)
    assert (kept_min > pruned_max).all()


def test_nm_mask_rejects_indivisible_width():
    with pytest.raises(ValueError, match="divisible by 4"):
        nm_mask(torch.rand(2, 6), 2, 4)


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.75])
def test_wanda_prunes_the_same_fraction_of_every_row(sparsity):
    torch.manual_seed(1)
    w, norms = torch.randn(32, 100), torch.rand(100) * 10
    mask = wanda_mask(w, norms, sparsity)
    assert (mask.sum(1) == 100 - round(100 * sparsity)).all()
    scores = w.abs() * norms.sqrt()
    for r in range(32):  # every pruned score of a row is below every kept score of that row
        if sparsity:
            assert scores[r][~mask[r]].max() <= scores[r][mask[r]].min()


def test_wanda_score_uses_input_norms():
    w = torch.ones(1, 4)
    mask = wanda_mask(w, torch.tensor([4.0, 1.0, 9.0, 0.25]), 0.5)
    assert mask.tolist() == [[True, False, True, False]]


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.9])
def test_magnitude_achieved_sparsity_equals_request(sparsity):
    torch.manual_seed(2)
    w = torch.randn(64, 48)
    mask = magnitude_mask(w, sparsity)
    assert achieved_sparsity(mask) == pytest.approx(sparsity, abs=0.5 / w.numel())
    assert w.abs()[~mask].max() <= w.abs()[mask].min()


def test_row_mask_zero_sparsity_keeps_all():
    assert row_mask(torch.rand(3, 5), 0.0).all()


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_mask_equals_top_k_selection_and_keeps_n_under_ties(n, m):
    scores = torch.randn(32, 8 * m, generator=torch.Generator().manual_seed(n + m))
    groups = scores.reshape(32, -1, m)
    ref = torch.ones_like(groups, dtype=torch.bool)
    ref.scatter_(2, torch.topk(groups, m - n, dim=2, largest=False).indices, False)
    assert torch.equal(nm_mask(scores, n, m), ref.reshape(scores.shape))
    tied = torch.zeros(4, 2 * m)  # every score equal: still exactly n kept per group, the later ones
    kept = nm_mask(tied, n, m).reshape(4, 2, m)
    assert torch.all(kept.sum(-1) == n) and torch.all(kept[..., m - n:])
