"""Checkpoints that inference engines load: the compressed-tensors format (vLLM's), written by its library.

``output.format: compressed-tensors`` writes ``model/`` as a compressed-tensors checkpoint:

- **W4A16** (INT4 runs): every quantized linear as ``pack-quantized`` int4, symmetric groups along the input
  (``weight_packed`` int32, ``weight_scale`` ``[out, in / group]``, ``weight_shape``), the layout of vLLM's
  W4A16 kernels; needs ``quantization.symmetric`` (codes -8..7 around a fixed zero point of 8) and 4 bits.
  A linear whose input width is not a multiple of the group size (the library and the kernels need whole
  groups) is written dense, its dequantized weights as they are, and named in the config's ``ignore`` list.
- **W8A8** (:func:`export_w8a8`): int8 weights with one scale per output channel and one static int8 scale per
  input tensor (``int-quantized``), from a plain documented input, for the activation-quantization stage.

The per-layer packing is the library's own (``BaseCompressor.compress`` of the format's compressor), and so is
``config.json``'s ``quantization_config`` (``ModelCompressor.update_config``). Every layer is decompressed by
the library right after packing and compared with our dequantized weights; a difference raises, so a
checkpoint that would load wrong is never written. Pruned weights are zeros inside the packed values: no
engine serves 2:4 (or other) sparsity from this format today, so sparsity saves nothing at inference.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from compressor.config import ConfigError

log = logging.getLogger(__name__)

W4A16_FORMAT = "pack-quantized"
W8A8_FORMAT = "int-quantized"
CONV1D_FAMILIES = ("gpt2",)


def check_export(output, quantization, model_type: str, activations=None) -> None:
    """ConfigError, before any work, when ``output.format`` cannot be written for this run: W4A16 for INT4
    weights (``quantization``), W8A8 ``int-quantized`` for the activations stage (``activations``, an
    ``ActivationQuantConfig``: per-tensor static, symmetric, 8-bit inputs and per-channel 8-bit weights, no
    SmoothQuant, whose factors the format has no place for)."""
    if output.format != "compressed-tensors":
        return
    if not output.save_model:
        raise ConfigError("output.format='compressed-tensors' writes model/: set output.save_model=true")
    try:
        import compressed_tensors  # noqa: F401
    except ImportError as exc:
        raise ConfigError("output.format='compressed-tensors' needs the compressed-tensors package "
                          "(pip install compressed-tensors==0.20.1, Python >= 3.11)") from exc
    if model_type in CONV1D_FAMILIES:
        raise ConfigError(f"output.format='compressed-tensors' packs nn.Linear layers; model family {model_type!r} "
                          f"uses Conv1D: use output.format=hf")
    if activations is not None and activations.enabled:
        check_w8a8_export(quantization, activations)
        return
    if not quantization.enabled:
        raise ConfigError("output.format='compressed-tensors' stores quantized weights and this run quantizes "
                          "none: set quantization.method to rtn or gptq (with symmetric=true), or output.format=hf")
    if quantization.bits != 4 or not quantization.symmetric:
        raise ConfigError(f"output.format='compressed-tensors' writes W4A16 (symmetric int4, as the GPU kernels "
                          f"need): set quantization.bits=4 and quantization.symmetric=true (got bits="
                          f"{quantization.bits}, symmetric={quantization.symmetric})")


def check_w8a8_export(quantization, activations) -> None:
    """ConfigError naming every W8A8 setting the ``int-quantized`` scheme we write cannot hold."""
    a = activations
    wrong = [f"{k}={v!r} (need {need})" for k, v, need, ok in (
        ("model.activations.granularity", a.granularity, "per_tensor_static", a.granularity == "per_tensor_static"),
        ("model.activations.symmetric", a.symmetric, "true", a.symmetric),
        ("model.activations.bits", a.bits, 8, a.bits == 8),
        ("model.activations.weight_bits", a.weight_bits, 8, a.weight_bits == 8),
        ("model.activations.weight_group_size", a.weight_group_size, "null", a.weight_group_size is None),
        ("model.activations.smoothquant", a.smoothquant, "false", not a.smoothquant),
        ("model.quantization.method", quantization.method, "none", not quantization.enabled)) if not ok]
    if wrong:
        raise ConfigError("output.format='compressed-tensors' writes W8A8 as int8 weights per output channel and "
                          "int8 inputs with one static symmetric scale per tensor (int-quantized); this run has "
                          f"{'; '.join(wrong)}: change those, or use output.format=hf")


def w8a8_state_layers(state) -> tuple[dict, dict, dict]:
    """``(codes, weight_scales, input_scales)`` for :func:`export_w8a8` from a ``compressor.quant.w8a8.W8A8``
    state: every quantized linear's int8 codes ``[out, in]``, its scales ``[out]`` and the static scale of
    the input it reads (shared inputs give their layers the same scale)."""
    codes, weight_scales, input_scales = {}, {}, {}
    for name, (q, scale) in state.weights.items():
        codes[name] = q.cpu()
        weight_scales[name] = scale.reshape(-1).float().cpu()
        input_scales[name] = state.inputs[state.owner[name]].scale.detach().float().cpu().clone()  # one tensor each
    return codes, weight_scales, input_scales


def load_kwargs(folder: str | Path) -> dict:
    """``from_pretrained`` arguments for a model folder: a compressed-tensors checkpoint loads decompressed (plain
    weights in every nn.Linear, as the pipeline and ``validate`` read them); anything else loads as it is."""
    path = Path(folder) / "config.json"
    try:
        quant = json.loads(path.read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
        return {}
    if quant.get("quant_method") != "compressed-tensors":
        return {}
    from transformers import CompressedTensorsConfig

    return {"quantization_config": CompressedTensorsConfig(dequantize=True)}


def w4a16_scheme(group_size: int):
    """compressed-tensors' W4A16 preset (int4, symmetric, static groups) with ``group_size``."""
    from compressed_tensors.quantization import QuantizationScheme, preset_name_to_scheme

    scheme = preset_name_to_scheme("W4A16", targets=["Linear"])
    args = scheme.weights.model_copy(update={"group_size": group_size})
    return QuantizationScheme(targets=["Linear"], weights=args)


def w8a8_static_scheme():
    """int8 weights per output channel and int8 inputs with one static scale per tensor, both symmetric."""
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationScheme,
        QuantizationStrategy,
        QuantizationType,
    )

    weights = QuantizationArgs(num_bits=8, type=QuantizationType.INT, strategy=QuantizationStrategy.CHANNEL,
                               symmetric=True, dynamic=False)
    inputs = QuantizationArgs(num_bits=8, type=QuantizationType.INT, strategy=QuantizationStrategy.TENSOR,
                              symmetric=True, dynamic=False)
    return QuantizationScheme(targets=["Linear"], weights=weights, input_activations=inputs)


@dataclass
class Export:
    """What :func:`write_checkpoint` wrote: the scheme's name, the packed layers and the linears left dense."""

    scheme: str
    format: str
    packed: list[str] = field(default_factory=list)
    dense: dict[str, str] = field(default_factory=dict)
    """Linear layer name -> why it is stored unquantized (and listed in ``ignore``)."""

    def summary(self) -> dict:
        return {"format": "compressed-tensors", "scheme": self.scheme, "compression_format": self.format,
                "packed_layers": len(self.packed), "dense_layers": self.dense}


def w4a16_layers(quantized: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], group_size: int,
                 bits: int = 4) -> dict[str, dict[str, torch.Tensor]]:
    """Per-layer inputs of the W4A16 compressor from our INT4 results.

    ``quantized`` holds ``<layer>.codes`` uint8 ``[out, in]`` (0..15), ``<layer>.scales`` / ``<layer>.zeros``
    ``[out, groups]``; ``masks[<layer>]`` the keep-mask. Returns ``{layer: {"weight": fp32 [out, in],
    "weight_scale": fp32 [out, groups]}}``, the weight dequantized exactly as the quantizers do,
    ``(codes - zero) * scale * mask`` (pruned weights 0). Raises ValueError for a grid that is not symmetric
    (a zero point other than 2^(bits-1))."""
    layers = {}
    for name in [k[: -len(".codes")] for k in quantized if k.endswith(".codes")]:
        codes, scales, zeros = (quantized[f"{name}.{p}"].float() for p in ("codes", "scales", "zeros"))
        if not bool((zeros == 2 ** (bits - 1)).all()):
            raise ValueError(f"{name}: zero points other than {2 ** (bits - 1)}: the grid is not symmetric "
                             "(quantize with quantization.symmetric=true to export W4A16)")
        group = torch.arange(codes.shape[1]) // group_size
        weight = (codes - zeros[:, group]) * scales[:, group] * masks[name].float()
        layers[name] = {"weight": weight, "weight_scale": scales}
    return layers


def w8a8_layers(codes: dict[str, torch.Tensor], weight_scales: dict[str, torch.Tensor],
                input_scales: dict[str, float | torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Per-layer inputs of the W8A8 compressor: ``codes[layer]`` int8 ``[out, in]`` (-127..127),
    ``weight_scales[layer]`` ``[out]`` (the weight is ``codes * scale``, per output channel),
    ``input_scales[layer]`` the static per-tensor input scale (``x ~ clamp(round(x / s), -128, 127) * s``).
    SmoothQuant factors, if any, must already be folded into the codes and the preceding op."""
    layers = {}
    for name, q in codes.items():
        if q.dtype != torch.int8:
            raise ValueError(f"{name}: W8A8 codes must be int8, got {q.dtype}")
        scale = weight_scales[name].float().reshape(-1, 1)
        if scale.shape[0] != q.shape[0]:
            raise ValueError(f"{name}: {scale.shape[0]} weight scales for {q.shape[0]} output channels")
        layers[name] = {"weight": q.float() * scale, "weight_scale": scale,
                        "input_scale": torch.as_tensor(input_scales[name], dtype=torch.float32).reshape(1)}
    return layers


def _compressor(fmt: str):
    from compressed_tensors.compressors import BaseCompressor

    return BaseCompressor.get_value_from_registry(fmt)


def pack_layer(name: str, local: dict[str, torch.Tensor], scheme, fmt: str) -> dict[str, torch.Tensor]:
    """The library's compressed tensors of one layer (local names: ``weight_packed``, ``weight_scale``, ...),
    checked: decompressed by the library they must give ``local["weight"]`` exactly, else RuntimeError."""
    comp = _compressor(fmt)
    packed = comp.compress(local, scheme)
    back = comp.decompress(packed, scheme)["weight"].to(local["weight"].dtype)
    if not torch.equal(back, local["weight"]):
        diff = (back - local["weight"]).abs().max().item()
        raise RuntimeError(f"{name}: the {fmt} packing does not give back our dequantized weights (max difference "
                           f"{diff:.3g}); nothing written")
    return packed


def write_checkpoint(model: nn.Module, tokenizer, folder: str | Path, layers: dict[str, dict[str, torch.Tensor]],
                     scheme, fmt: str, name: str, scale_dtype: torch.dtype = torch.float32) -> Export:
    """Write ``model`` to ``folder`` as a compressed-tensors checkpoint whose linears ``layers`` (see
    :func:`w4a16_layers`, :func:`w8a8_layers`) are packed in format ``fmt`` under ``scheme``; every other linear
    is stored dense and listed in ``ignore``. Scales are stored as ``scale_dtype``. The model is not changed."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

    folder = Path(folder)
    result = Export(scheme=name, format=fmt)
    group = scheme.weights.group_size
    state = {k: v for k, v in model.state_dict().items()}
    for mod_name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        local = layers.get(mod_name)
        if local is None:
            result.dense[mod_name] = "not quantized"
            continue
        if group and module.in_features % group:
            result.dense[mod_name] = f"input width {module.in_features} is not a multiple of the group size {group}"
            continue
        packed = pack_layer(mod_name, local, scheme, fmt)
        del state[f"{mod_name}.weight"]
        for key, value in packed.items():
            if key in ("weight_scale", "input_scale"):
                value = value.to(scale_dtype)
            state[f"{mod_name}.{key}"] = value.contiguous().cpu()
        result.packed.append(mod_name)
    if not result.packed:
        raise ConfigError(f"output.format='compressed-tensors': no linear could be packed ({result.dense})")
    if any(why != "not quantized" for why in result.dense.values()):
        log.warning("compressed-tensors: %d linears stored dense (dequantized, exact), their input width not a "
                    "multiple of group size %s", sum(why != "not quantized" for why in result.dense.values()), group)
    config = QuantizationConfig(config_groups={"group_0": scheme}, format=fmt, ignore=sorted(result.dense),
                                quantization_status=QuantizationStatus.COMPRESSED)
    model.save_pretrained(folder, state_dict=state, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    ModelCompressor(quantization_config=config).update_config(str(folder))
    return result


def export_w4a16(model: nn.Module, tokenizer, folder: str | Path, quantized: dict, masks: dict,
                 group_size: int) -> Export:
    """``model/`` as W4A16 (see the module docstring) from the run's INT4 results (``quantized``, ``masks``)."""
    scale_dtype = torch.float16 if next(model.parameters()).dtype == torch.float16 else torch.float32
    return write_checkpoint(model, tokenizer, folder, w4a16_layers(quantized, masks, group_size),
                            w4a16_scheme(group_size), W4A16_FORMAT, "W4A16", scale_dtype)


def export_w8a8(model: nn.Module, tokenizer, folder: str | Path, codes: dict[str, torch.Tensor],
                weight_scales: dict[str, torch.Tensor], input_scales: dict[str, float | torch.Tensor]) -> Export:
    """``model/`` as W8A8 int8 with static per-tensor input scales (``int-quantized``); inputs as
    :func:`w8a8_layers` documents."""
    return write_checkpoint(model, tokenizer, folder, w8a8_layers(codes, weight_scales, input_scales),
                            w8a8_static_scheme(), W8A8_FORMAT, "W8A8")
