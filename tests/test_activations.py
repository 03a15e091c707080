"""W8A8 fake quantization: hand-computed grids at every granularity, weights, SmoothQuant, the config."""

import pytest
import torch

from compressor.config import ConfigError
from compressor.quant.activations import (
    GRANULARITIES,
    ActivationQuantConfig,
    dequantize_weight,
    fake_quant,
    quant_error,
    quant_params,
    quantize_weight,
    smoothing_factors,
    weight_params,
)

# two tokens of three features; the whole tensor spans [-1, 4], the second token [0.5, 2]
X = torch.tensor([[-1.0, 0.3, 4.0], [0.5, 2.0, 1.1]])


def hand_asym(x, lo, hi):
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    s = (hi - lo) / 255
    z = round(-lo / s)
    return [[(min(max(round(v / s) + z, 0), 255) - z) * s for v in row] for row in x.tolist()]


def test_per_tensor_asymmetric_equals_a_hand_computation():
    for g in ("per_tensor_static", "per_tensor_dynamic"):
        s, z = quant_params(X, g)
        assert s.dim() == 0 and z.dim() == 0
        assert s.item() == pytest.approx(5 / 255) and z.item() == 51  # round(1 / (5/255)) = 51
        assert torch.allclose(fake_quant(X, s, z), torch.tensor(hand_asym(X, -1.0, 4.0)), atol=1e-6)


def test_per_token_asymmetric_equals_a_hand_computation():
    s, z = quant_params(X, "per_token_dynamic")
    assert s.shape == (2, 1) and z.shape == (2, 1)
    # the second token's range [0.5, 2] is widened to [0, 2]: zero point 0
    assert z[1].item() == 0 and s[1].item() == pytest.approx(2 / 255)
    want = [hand_asym(X[:1], -1.0, 4.0)[0], hand_asym(X[1:], 0.0, 2.0)[0]]
    assert torch.allclose(fake_quant(X, s, z), torch.tensor(want), atol=1e-6)


def test_symmetric_grid_and_error_sum():
    s, z = quant_params(X, "per_tensor_dynamic", symmetric=True)
    assert s.item() == pytest.approx(4 / 127) and z.item() == 0
    want = torch.tensor([[round(v / (4 / 127)) * (4 / 127) for v in row] for row in X.tolist()])
    got = fake_quant(X, s, z, symmetric=True)
    assert torch.allclose(got, want, atol=1e-6)
    err = quant_error(X, "per_tensor_dynamic", symmetric=True)
    assert err.dim() == 0 and err.item() == pytest.approx((X - want).square().sum().item(), rel=1e-5)


def test_error_is_zero_without_quantization_and_small_with_8_bits():
    x = torch.randn(4, 16, 32)
    assert quant_error(x, "none").item() == 0
    for g in GRANULARITIES[1:]:
        err = quant_error(x, g).item()
        s, _ = quant_params(x, g)
        assert 0 < err <= x.numel() * (0.5 * s.max().item()) ** 2  # at most half a step per element


def test_batched_per_tensor_ranges_are_independent():
    x = torch.randn(3, 8, 16)
    x[1] *= 100  # one candidate with a huge range must not touch the others
    s, z = quant_params(x, "per_tensor_dynamic", batch_dims=1)
    assert s.shape == (3,)
    errs = quant_error(x, "per_tensor_dynamic", batch_dims=1)
    assert errs.shape == (3,)
    for i in range(3):
        assert errs[i].item() == pytest.approx(quant_error(x[i], "per_tensor_dynamic").item(), rel=1e-5)


def test_error_gradient_pulls_toward_the_grid_and_ste_passes_through():
    x = torch.randn(8, 16, requires_grad=True)
    quant_error(x, "per_tensor_dynamic").backward()
    s, z = quant_params(x, "per_tensor_dynamic")
    assert torch.allclose(x.grad, 2 * (x - fake_quant(x, s, z)).detach(), atol=1e-6)
    y = torch.randn(8, 16, requires_grad=True)
    s, z = quant_params(y, "per_token_dynamic")
    fake_quant(y, s, z, ste=True).sum().backward()
    assert torch.all(y.grad == 1)  # inside the range: identity


def test_weights_symmetric_per_channel_and_grouped():
    w = torch.tensor([[0.5, -1.27, 0.01, 0.2], [2.54, 0.0, -0.3, 0.1]])
    s = weight_params(w, 8)
    assert torch.allclose(s.squeeze(1), torch.tensor([1.27 / 127, 2.54 / 127]))
    codes = quantize_weight(w, s)
    assert codes.dtype == torch.int8 and codes[0, 1] == -127 and codes[1, 0] == 127 and codes[0, 0] == 50
    assert (dequantize_weight(codes, s) - w).abs().max() <= 0.5 * s.max() + 1e-7
    sg = weight_params(w, 8, group_size=2)
    assert sg.shape == (2, 2) and sg[0, 1].item() == pytest.approx(0.2 / 127)
    with pytest.raises(ConfigError, match="weight_group_size=3"):
        weight_params(w, 8, group_size=3)


def test_smoothing_factors_balance_activation_and_weight_ranges():
    a, w = torch.tensor([100.0, 1.0, 0.0]), torch.tensor([0.1, 1.0, 0.5])
    s = smoothing_factors(a, w, alpha=0.5)
    assert torch.allclose(s, torch.tensor([(100 / 0.1) ** 0.5, 1.0, 1.0]))
    assert torch.allclose(a[:2] / s[:2], w[:2] * s[:2])  # alpha 0.5: equal ranges after migration


def test_config_rejects_bad_values_by_name():
    with pytest.raises(ConfigError, match="granularity='per_channel'"):
        ActivationQuantConfig(granularity="per_channel")
    with pytest.raises(ConfigError, match="smoothquant_alpha=1.5"):
        ActivationQuantConfig(smoothquant_alpha=1.5)
    assert not ActivationQuantConfig().enabled and ActivationQuantConfig("per_tensor_static").static
