"""8-bit activations and weights (W8A8), simulated: pure tensor math and the ``model.activations`` config.

Activations are quantized asymmetrically by default (an integer zero point, as CushionCache, Son et al.
EMNLP 2024, section 4): ``scale = (max - min) / (2^bits - 1)``, ``zero = round(-min / scale)``, codes
``clamp(round(x / scale) + zero, 0, 2^bits - 1)``, dequantized ``(code - zero) * scale``. The paper prints
``(max - min) / (2^(N-1) - 1)`` for the scale, which does not use the full 8-bit grid; we use ``2^N - 1``.
The range always includes 0 (``min <= 0 <= max``), so zero (padding, ReLU zeros) is exact and the zero
point is a valid code. Symmetric: ``scale = max|x| / (2^(bits-1) - 1)``, zero 0, codes in
``[-(2^(bits-1) - 1), 2^(bits-1) - 1]`` (the restricted range an int8 GEMM uses).

Granularities: per-tensor static (one range calibrated beforehand, then fixed), per-tensor dynamic (the
range of the tensor at hand), per-token dynamic (one range per row of the last dimension). Here ``quant_params``
takes the range of the tensor it is given; "static" differs from "dynamic" only in *when* it is called
(on calibration data, once), which the caller decides.

Scales and zero points are computed without gradient (stop-gradient, as CushionCache's prefix tuning asks).
``torch.round`` has zero gradient, so by default ``fake_quant`` passes no gradient through rounding and
``x - fake_quant(x)`` has gradient identity: minimizing the quantization error moves ``x`` toward the grid.
``ste=True`` passes the gradient straight through instead (identity inside the range, 0 where clamped).

Weights: symmetric, per output channel (or per group of input columns), ``scale = max|w| / (2^(bits-1) - 1)``.
SmoothQuant (Xiao et al., ICML 2023, section 4): per input channel ``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)``,
activations divided by ``s``, weights multiplied by it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from compressor.config import ConfigError

GRANULARITIES = ("none", "per_tensor_static", "per_tensor_dynamic", "per_token_dynamic")
_EPS = 1e-8  # smallest scale: an all-zero tensor quantizes to zeros, not NaN


@dataclass
class ActivationQuantConfig:
    """W8A8: 8-bit inputs for every linear in the decoder blocks and 8-bit weights, simulated (fake quant)."""

    granularity: str = "none"
    """none (off), per_tensor_static (ranges calibrated on calibration windows), per_tensor_dynamic, or
    per_token_dynamic."""
    bits: int = 8
    """Activation bits."""
    symmetric: bool = False
    """Symmetric activations (no zero point); the default is asymmetric with a zero point, as CushionCache."""
    weight_bits: int = 8
    """Weight bits (symmetric; 0 leaves the weights unquantized)."""
    weight_group_size: int | None = None
    """Input columns sharing one weight scale; None: one scale per output channel."""
    smoothquant: bool = False
    """Migrate activation outliers into the weights before quantizing (SmoothQuant)."""
    smoothquant_alpha: float = 0.8
    """SmoothQuant migration strength: s_j = max|X_j|^alpha / max|W_j|^(1-alpha)."""
    calibration_windows: int | None = None
    """Calibration windows used for static ranges and SmoothQuant statistics (default: all of them)."""

    def __post_init__(self):
        if self.granularity not in GRANULARITIES:
            raise ConfigError(f"model.activations.granularity={self.granularity!r} is unknown: choose one of "
                              f"{', '.join(GRANULARITIES)}")
        if not 2 <= self.bits <= 8:
            raise ConfigError(f"model.activations.bits={self.bits} must be between 2 and 8")
        if self.weight_bits != 0 and not 2 <= self.weight_bits <= 8:
            raise ConfigError(f"model.activations.weight_bits={self.weight_bits} must be 0 (off) or between 2 and 8")
        if self.weight_group_size is not None and self.weight_group_size < 1:
            raise ConfigError(f"model.activations.weight_group_size={self.weight_group_size} must be >= 1 or None "
                              "(per output channel)")
        if not 0.0 <= self.smoothquant_alpha <= 1.0:
            raise ConfigError(f"model.activations.smoothquant_alpha={self.smoothquant_alpha} must be in [0, 1]")
        if self.calibration_windows is not None and self.calibration_windows < 1:
            raise ConfigError(f"model.activations.calibration_windows={self.calibration_windows} must be >= 1")

    @property
    def enabled(self) -> bool:
        return self.granularity != "none"

    @property
    def static(self) -> bool:
        return self.granularity == "per_tensor_static"


def _check(granularity: str) -> None:
    if granularity not in GRANULARITIES:
        raise ConfigError(f"granularity={granularity!r} is unknown: choose one of {', '.join(GRANULARITIES)}")


def range_params(lo: Tensor, hi: Tensor, bits: int = 8, symmetric: bool = False) -> tuple[Tensor, Tensor]:
    """(scale, zero) from a range ``lo <= hi`` (any shape, broadcast together), widened to include 0.

    Asymmetric: ``scale = (hi - lo) / (2^bits - 1)``, ``zero = round(-lo / scale)`` in ``[0, 2^bits - 1]``.
    Symmetric: ``scale = max(|lo|, |hi|) / (2^(bits-1) - 1)``, zero 0. Both float32, detached.
    """
    lo = torch.clamp(lo.detach().float(), max=0.0)
    hi = torch.clamp(hi.detach().float(), min=0.0)
    if symmetric:
        scale = torch.clamp(torch.maximum(-lo, hi) / (2 ** (bits - 1) - 1), min=_EPS)
        return scale, torch.zeros_like(scale)
    scale = torch.clamp((hi - lo) / (2**bits - 1), min=_EPS)
    zero = torch.clamp(torch.round(-lo / scale), 0, 2**bits - 1) + 0.0  # no -0.0
    return scale, zero


def quant_params(
    x: Tensor, granularity: str, bits: int = 8, symmetric: bool = False, batch_dims: int = 0
) -> tuple[Tensor, Tensor]:
    """(scale, zero_point) from the range of ``x`` ``[..., features]``, float32 and detached.

    Per tensor (static or dynamic): 0-dim tensors (or ``x.shape[:batch_dims]`` with ``batch_dims`` leading
    dimensions that are independent tensors, e.g. candidates of a batched search). Per token: ``[..., 1]``.
    ``granularity="none"`` has no quantizer: ConfigError.
    """
    _check(granularity)
    if granularity == "none":
        raise ConfigError("granularity='none' has no quantization parameters")
    x = x.detach()
    if granularity == "per_token_dynamic":
        lo, hi = torch.aminmax(x, dim=-1, keepdim=True)
    else:
        flat = x.reshape(*x.shape[:batch_dims], -1)
        lo, hi = torch.aminmax(flat, dim=-1)
    return range_params(lo, hi, bits, symmetric)


def _round(v: Tensor, ste: bool) -> Tensor:
    return v + (torch.round(v) - v).detach() if ste else torch.round(v)


def fake_quant(
    x: Tensor, scale: Tensor, zero: Tensor, bits: int = 8, symmetric: bool = False, ste: bool = False
) -> Tensor:
    """Quantize and dequantize ``x``: ``(clamp(round(x / scale) + zero, qmin, qmax) - zero) * scale``.

    ``scale`` and ``zero`` broadcast against ``x`` (0-dim, ``[..., 1]`` per token, or with batch dims:
    reshape them to broadcast). Computed in float32, returned in ``x``'s dtype. Gradient: see the module
    docstring (``ste``).
    """
    if symmetric:
        qmin, qmax = -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    else:
        qmin, qmax = 0, 2**bits - 1
    codes = torch.clamp(_round(x.float() / scale, ste) + zero, qmin, qmax)
    return ((codes - zero) * scale).to(x.dtype)


def _broadcast(p: Tensor, x: Tensor, batch_dims: int) -> Tensor:
    return p.reshape(*p.shape, *([1] * (x.dim() - p.dim()))) if p.dim() == batch_dims and batch_dims else p


def quant_error(
    x: Tensor, granularity: str, bits: int = 8, symmetric: bool = False, batch_dims: int = 0
) -> Tensor:
    """Sum of squared fake-quant error ``sum (x - q(x))^2``, a float32 scalar (``[*x.shape[:batch_dims]]``
    with batch dims), ranges taken over all of ``x`` (the caller passes only the positions that count).
    ``granularity="none"``: zero. Gradient flows to ``x`` (scales detached, round without gradient).
    """
    _check(granularity)
    if granularity == "none":
        return x.new_zeros(x.shape[:batch_dims], dtype=torch.float32)
    scale, zero = quant_params(x, granularity, bits, symmetric, batch_dims)
    if granularity != "per_token_dynamic":
        scale, zero = _broadcast(scale, x, batch_dims), _broadcast(zero, x, batch_dims)
    err = (x.float() - fake_quant(x.float(), scale, zero, bits, symmetric)).square()
    return err.reshape(*x.shape[:batch_dims], -1).sum(-1)


def weight_params(w: Tensor, bits: int = 8, group_size: int | None = None) -> Tensor:
    """Symmetric weight scales for ``w`` ``[out, in]``: ``[out, 1]`` per output channel, or ``[out, in / group_size]``
    per group of input columns (``in`` must be a multiple of ``group_size``: ConfigError otherwise)."""
    out, cols = w.shape
    qmax = 2 ** (bits - 1) - 1
    if group_size is None or group_size >= cols:
        return torch.clamp(w.detach().float().abs().amax(1, keepdim=True) / qmax, min=_EPS)
    if cols % group_size:
        raise ConfigError(f"weight_group_size={group_size} does not divide the layer's {cols} input columns")
    g = w.detach().float().reshape(out, cols // group_size, group_size)
    return torch.clamp(g.abs().amax(-1) / qmax, min=_EPS)


def quantize_weight(w: Tensor, scale: Tensor, bits: int = 8) -> Tensor:
    """Integer codes (int8) of ``w`` ``[out, in]`` with scales from :func:`weight_params`."""
    qmax = 2 ** (bits - 1) - 1
    s = scale.repeat_interleave(w.shape[1] // scale.shape[1], dim=1)
    return torch.clamp(torch.round(w.float() / s), -qmax, qmax).to(torch.int8)


def dequantize_weight(codes: Tensor, scale: Tensor) -> Tensor:
    """``codes * scale`` in float32, ``[out, in]``."""
    return codes.float() * scale.repeat_interleave(codes.shape[1] // scale.shape[1], dim=1)


def smoothing_factors(act_absmax: Tensor, weight_absmax: Tensor, alpha: float = 0.8) -> Tensor:
    """SmoothQuant factors ``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)`` per input channel ``[in]``.

    ``act_absmax`` ``[in]``: max |x_j| over calibration tokens; ``weight_absmax`` ``[in]``: max |W_ij| over the
    output rows of every linear fed this input. Channels that are zero on either side get 1 (left alone).
    """
    a, w = act_absmax.float(), weight_absmax.float()
    s = a.pow(alpha) / w.pow(1.0 - alpha)
    ok = (a > 0) & (w > 0) & torch.isfinite(s)
    return torch.where(ok, s, torch.ones_like(s)).clamp(min=1e-5)
