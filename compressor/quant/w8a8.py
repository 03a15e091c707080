"""W8A8 on a model: one activation quantizer per distinct linear input, 8-bit weights, calibration, file.

Every linear of the decoder blocks gets a forward pre-hook that fake-quantizes its input (perplexity,
``validate`` and generation all see it), and its weight is replaced by its 8-bit grid (symmetric, per
output channel or per group). Linears fed the very same tensor (q/k/v, gate/up) share one quantizer, found
as the pruning statistics find shared inputs (``BlockStatistics``); so do their SmoothQuant factors, from the
largest weight of any of them per input channel.

With SmoothQuant factors ``s`` (per input channel) the layer computes ``q(x / s) @ Q(W * s)^T``. The stored
weight is ``Q(W * s) / s`` and the hook makes ``q(x / s) * s``, which multiply to the same thing while the
saved model stays an ordinary model (without hooks it is the fp model with 8-bit weights). A real int8
kernel uses the saved codes, weight scales, factors and static activation scales directly (the factors of
norm-fed inputs fold into the norm's weight).

Calibration (static ranges, SmoothQuant statistics) walks the blocks with the sequential driver's engine
(``capture_block_inputs``, ``run_block``, ``advance``): each block's input ranges are measured on the
stream that the already-quantized blocks before it produce, then the block is quantized and advances it.
"""

from __future__ import annotations

import json
import logging
import weakref
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor, nn

from compressor.models.adapters import ModelAdapter, set_weight, weight_of
from compressor.pruning.statistics import BlockStatistics
from compressor.quant.activations import (
    ActivationQuantConfig,
    dequantize_weight,
    fake_quant,
    quant_params,
    quantize_weight,
    range_params,
    smoothing_factors,
    weight_params,
)
from compressor.sequential import advance, capture_block_inputs, run_block
from compressor.streaming import HostHome

log = logging.getLogger(__name__)

FILE = "activations.safetensors"
_ON_MODEL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> the W8A8 states hooked into it


class InputRange:
    """Per-channel min and max of one linear input over calibration tokens (``add`` takes ``[..., cols]``)."""

    def __init__(self, cols: int, device: torch.device):
        self.lo = torch.full((cols,), float("inf"), device=device)
        self.hi = torch.full((cols,), float("-inf"), device=device)
        self.tokens = 0

    @torch.no_grad()
    def add(self, x: Tensor) -> None:
        lo, hi = torch.aminmax(x.reshape(-1, x.shape[-1]).float(), dim=0)
        torch.minimum(self.lo, lo, out=self.lo)
        torch.maximum(self.hi, hi, out=self.hi)
        self.tokens += x.numel() // x.shape[-1]

    @property
    def absmax(self) -> Tensor:
        """max |x_j| per channel ``[cols]``."""
        return torch.maximum(self.lo.abs(), self.hi.abs())


class InputQuantizer:
    """Fake quantization of one linear input: ``q(x / smooth) * smooth`` at the config's granularity.

    ``scale``/``zero`` are the static per-tensor parameters (None for dynamic granularities); ``smooth``
    ``[in]`` the SmoothQuant factors (None without SmoothQuant)."""

    def __init__(self, cfg: ActivationQuantConfig, smooth: Tensor | None = None, scale: Tensor | None = None,
                 zero: Tensor | None = None):
        self.cfg = cfg
        self.smooth, self.scale, self.zero = smooth, scale, zero
        if cfg.static and scale is None:
            raise ValueError("per-tensor static quantization needs calibrated scale and zero")

    def _to(self, device: torch.device) -> None:
        for part in ("smooth", "scale", "zero"):
            t = getattr(self, part)
            if t is not None and t.device != device:
                setattr(self, part, t.to(device))

    def __call__(self, x: Tensor) -> Tensor:
        c = self.cfg
        self._to(x.device)
        smooth = self.smooth
        xs = x.float() / smooth if smooth is not None else x.float()
        if c.static:
            scale, zero = self.scale, self.zero
        else:
            scale, zero = quant_params(xs, c.granularity, c.bits, c.symmetric)
        y = fake_quant(xs, scale, zero, c.bits, c.symmetric)
        return (y * smooth if smooth is not None else y).to(x.dtype)


class W8A8:
    """The W8A8 state of a model: quantizers by input, weight codes by layer, and the hooks that apply them.

    ``owner[layer]`` names the layer whose input quantizer a layer uses (full module names);
    ``weights[layer] = (codes int8 [out, in], scale [out, groups])``."""

    def __init__(self, cfg: ActivationQuantConfig):
        self.cfg = cfg
        self.inputs: dict[str, InputQuantizer] = {}
        self.owner: dict[str, str] = {}
        self.weights: dict[str, tuple[Tensor, Tensor]] = {}
        self.absmax: dict[str, float] = {}  # largest calibration |x| per input (before smoothing), for the report
        self._handles: list = []

    def attach(self, model: nn.Module, names: list[str] | None = None) -> None:
        """Hook the linears ``names`` (default: every layer with a quantizer) of ``model``."""
        for name in names if names is not None else list(self.owner):
            quantizer = self.inputs[self.owner[name]]
            hook = (lambda q: lambda module, args: (q(args[0]), *args[1:]))(quantizer)
            self._handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
        states = _ON_MODEL.setdefault(model, [])
        if self not in states:
            states.append(self)

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def quantize_weights(self, model: nn.Module, names: list[str]) -> None:
        """Replace the weights of ``names`` by their 8-bit grid (through the input's SmoothQuant factors)."""
        if not self.cfg.weight_bits:
            return
        for name in names:
            module = model.get_submodule(name)
            smooth = self.inputs[self.owner[name]].smooth
            w = weight_of(module).detach().float()
            if smooth is not None:
                w = w * smooth.to(w.device)
            scale = weight_params(w, self.cfg.weight_bits, self.cfg.weight_group_size)
            codes = quantize_weight(w, scale, self.cfg.weight_bits)
            self.weights[name] = (codes.cpu(), scale.cpu())
            self._set(module, codes, scale, smooth)

    @staticmethod
    def _set(module: nn.Module, codes: Tensor, scale: Tensor, smooth: Tensor | None) -> None:
        w = dequantize_weight(codes.to(scale.device), scale)
        if smooth is not None:
            w = w / smooth.to(w.device)
        set_weight(module, w)

    # ---- file: activations.safetensors --------------------------------------------------------------------------
    def tensors(self) -> tuple[dict[str, Tensor], dict[str, str]]:
        """``(tensors, metadata)`` for safetensors: ``input.<owner>.{smooth,scale,zero}``,
        ``weight.<layer>.{codes,scale}``; metadata holds the config and the layer -> input map."""
        out: dict[str, Tensor] = {}
        for owner, q in self.inputs.items():
            for part in ("smooth", "scale", "zero"):
                t = getattr(q, part)
                if t is not None:
                    out[f"input.{owner}.{part}"] = t.detach().float().cpu().contiguous()
        for name, (codes, scale) in self.weights.items():
            out[f"weight.{name}.codes"] = codes.contiguous()
            out[f"weight.{name}.scale"] = scale.float().contiguous()
        meta = {"config": json.dumps(asdict(self.cfg)), "owner": json.dumps(self.owner),
                "absmax": json.dumps(self.absmax)}
        return out, meta

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], meta: dict[str, str]) -> W8A8:
        state = cls(ActivationQuantConfig(**json.loads(meta["config"])))
        state.owner = json.loads(meta["owner"])
        state.absmax = json.loads(meta.get("absmax", "{}"))
        for owner in dict.fromkeys(state.owner.values()):
            parts = {p: tensors.get(f"input.{owner}.{p}") for p in ("smooth", "scale", "zero")}
            state.inputs[owner] = InputQuantizer(state.cfg, **parts)
        for name in state.owner:
            if f"weight.{name}.codes" in tensors:
                state.weights[name] = (tensors[f"weight.{name}.codes"], tensors[f"weight.{name}.scale"])
        return state

    def save(self, path: Path) -> Path:
        from safetensors.torch import save_file

        from compressor.io import atomic_write

        tensors, meta = self.tensors()
        return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))

    @classmethod
    def load(cls, path: Path) -> W8A8:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return cls.from_tensors(tensors, meta)

    def apply(self, model: nn.Module, set_weights: bool = True) -> None:
        """Put this state on a model: weights from the codes (``set_weights``; a saved model already holds
        them), then the hooks."""
        if set_weights:
            for name, (codes, scale) in self.weights.items():
                self._set(model.get_submodule(name), codes, scale, self.inputs[self.owner[name]].smooth)
        self.attach(model)

    def summary(self) -> dict:
        c = self.cfg
        absmax = sorted(self.absmax.values())
        return {"granularity": c.granularity, "bits": c.bits, "symmetric": c.symmetric,
                "weight_bits": c.weight_bits, "weight_group_size": c.weight_group_size,
                "smoothquant": c.smoothquant, "smoothquant_alpha": c.smoothquant_alpha if c.smoothquant else None,
                "quantized_inputs": len(self.inputs), "quantized_layers": len(self.owner),
                "largest_input_absmax": absmax[-1] if absmax else None,
                "input_absmax": self.absmax}


def detach(model: nn.Module) -> None:
    """Remove every W8A8 input quantizer hooked into ``model`` (its weights stay as they are)."""
    for state in _ON_MODEL.pop(model, []):
        state.detach()


def attached(model: nn.Module) -> list[W8A8]:
    """The W8A8 states hooked into ``model``."""
    return list(_ON_MODEL.get(model, []))


def load_saved(model: nn.Module, folder: str | Path) -> W8A8 | None:
    """Apply ``folder/activations.safetensors`` (a compressed model folder) to ``model`` loaded from it; None when
    the folder has none. The saved weights already hold the 8-bit grid: only the input quantizers are hooked."""
    path = Path(folder).expanduser() / FILE
    if not path.is_file():
        return None
    state = W8A8.load(path)
    state.apply(model, set_weights=False)
    log.info("W8A8 %s input quantizers applied from %s", state.cfg.granularity, path)
    return state


@torch.no_grad()
def calibrate(model: nn.Module, calib: Tensor, cfg: ActivationQuantConfig, device: torch.device,
              batch_size: int = 1, store: torch.device | None = None, homes=None, progress: bool = False,
              prefix=None) -> W8A8:
    """Quantize ``model`` in place block by block and return its :class:`W8A8` state, hooks attached.

    ``calib`` ``[n, seqlen]`` (the first ``cfg.calibration_windows`` are used) gives every distinct input's
    per-channel range: static per-tensor ranges are its min and max (after smoothing), SmoothQuant factors
    come from its per-channel |max|. Dynamic granularities without SmoothQuant need no ranges, but the
    walk still finds the shared inputs and records each input's largest |x| for the report. With a cushion
    ``prefix`` the windows run after its keys/values: ranges and statistics see the text positions only.
    """
    from tqdm.auto import tqdm

    device = torch.device(device)
    adapter = ModelAdapter(model)
    homes = homes or HostHome()
    state = W8A8(cfg)
    windows = calib[: cfg.calibration_windows] if cfg.calibration_windows else calib
    stream = capture_block_inputs(model, adapter, windows, batch_size, device, store or device, prefix)
    for i in tqdm(range(len(adapter.blocks)), desc=f"W8A8 ({cfg.granularity})", unit="block",
                  disable=not progress):
        block = adapter.blocks[i]
        homes.fetch(i, block, device)
        linears = adapter.linears(block)
        prefix = f"{adapter.block_path}.{i}."
        with BlockStatistics(linears, make=InputRange) as ranges:
            run_block(block, stream, device, on_batch=ranges.end_batch, keep=False)
        for owner, names in ranges.groups().items():
            rng = ranges.accumulators[owner]
            smooth = None
            if cfg.smoothquant:
                w_absmax = torch.stack([weight_of(linears[n]).detach().float().abs().amax(0) for n in names]).amax(0)
                smooth = smoothing_factors(rng.absmax, w_absmax.to(rng.lo.device), cfg.smoothquant_alpha)
            scale = zero = None
            if cfg.static:
                lo, hi = (rng.lo, rng.hi) if smooth is None else (rng.lo / smooth, rng.hi / smooth)
                scale, zero = range_params(lo.min(), hi.max(), cfg.bits, cfg.symmetric)
            state.inputs[prefix + owner] = InputQuantizer(cfg, *(t.cpu() if t is not None else None
                                                                  for t in (smooth, scale, zero)))
            state.absmax[prefix + owner] = float(rng.absmax.max())
            for n in names:
                state.owner[prefix + n] = prefix + owner
        names = [prefix + n for n in linears]
        state.quantize_weights(model, names)
        state.attach(model, names)
        advance(block, stream, device)
        homes.release(i, block)
    return state
