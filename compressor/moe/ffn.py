"""Where a block keeps its FFN, and the FFN's neurons as tensors, for each supported family.

A neuron i of a SwiGLU FFN (LLaMA, Mistral, Qwen, Gemma, Phi-3) is row i of gate and up and column
i of down: ``a_i = act(gate_i . x) * (up_i . x)``; of a GELU MLP (GPT-2, Phi, Falcon, GPT-NeoX,
BLOOM) it is row i (and bias i) of the first matrix and column i of the second: ``a_i = act(W1_i . x
+ b1_i)``. Either way ``y = W_down a + b_down``: ``a`` is the activation entering the down
projection, the quantity G-MoEfication's statistics and targets are defined on.
OPT keeps fc1/fc2 in the decoder layer itself, not in an FFN module: not supported here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from compressor.config import ConfigError
from compressor.models.adapters import weight_of


@dataclass(frozen=True)
class FFNSpec:
    """Names inside a block's FFN module (``path`` in the block). ``gate`` is None for GELU MLPs; ``fused``: gate
    and up are one matrix, gate rows first (Phi-3). ``residual``: the FFN's forward adds a residual it is given
    (BLOOM)."""

    path: str
    up: str
    down: str
    act: str
    gate: str | None = None
    fused: bool = False
    residual: bool = False

    @property
    def gated(self) -> bool:
        return self.gate is not None or self.fused


_SWIGLU = FFNSpec("mlp", up="up_proj", down="down_proj", act="act_fn", gate="gate_proj")
_NEOX = FFNSpec("mlp", up="dense_h_to_4h", down="dense_4h_to_h", act="act")
FFN_SPECS: dict[str, FFNSpec] = {
    **{t: _SWIGLU for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")},
    "phi3": FFNSpec("mlp", up="gate_up_proj", down="down_proj", act="activation_fn", fused=True),
    "phi": FFNSpec("mlp", up="fc1", down="fc2", act="activation_fn"),
    "gpt2": FFNSpec("mlp", up="c_fc", down="c_proj", act="act"),
    "falcon": _NEOX,
    "gpt_neox": _NEOX,
    "bloom": FFNSpec("mlp", up="dense_h_to_4h", down="dense_4h_to_h", act="gelu_impl", residual=True),
}


def ffn_spec(model_type: str) -> FFNSpec:
    """The family's FFN layout; ConfigError naming the supported families otherwise."""
    if model_type not in FFN_SPECS:
        raise ConfigError(f"moe: model family {model_type!r} has no FFN adapter: supported are "
                          f"{', '.join(sorted(FFN_SPECS))} (OPT's fc1/fc2 sit in the decoder layer, not in an FFN "
                          "module)")
    return FFN_SPECS[model_type]


def config_ffn_width(config) -> int | None:
    """The FFN width a transformers config declares (None where it declares none we know)."""
    for attr in ("intermediate_size", "ffn_hidden_size", "n_inner"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    if config.model_type in ("gpt2", "bloom", "falcon"):  # 4 x hidden by construction
        hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
        return 4 * hidden if hidden else None
    return None


def ffn_module(block: nn.Module, spec: FFNSpec) -> nn.Module:
    return block.get_submodule(spec.path)


def ffn_width(ffn: nn.Module, spec: FFNSpec) -> int:
    """Neurons of the FFN (the down projection's input width)."""
    return weight_of(getattr(ffn, spec.down)).shape[1]


def activation(ffn: nn.Module, spec: FFNSpec, x: torch.Tensor) -> torch.Tensor:
    """``a`` ``[..., d_ff]`` entering the down projection for FFN inputs ``x`` ``[..., d]`` (by the FFN's layers)."""
    act = getattr(ffn, spec.act)
    if spec.fused:
        gate, up = getattr(ffn, spec.up)(x).chunk(2, dim=-1)
        return act(gate) * up
    if spec.gate is not None:
        return act(getattr(ffn, spec.gate)(x)) * getattr(ffn, spec.up)(x)
    return act(getattr(ffn, spec.up)(x))


@dataclass
class NeuronWeights:
    """An FFN's weights by neuron: ``w_in`` ``[d_ff, d]`` (gate rows for SwiGLU, the first matrix otherwise), ``w_up``
    ``[d_ff, d]`` or None, ``b_in`` ``[d_ff]`` or None (bias of the first matrix; SwiGLU families have none),
    ``w_out`` ``[d, d_ff]``, ``b_out`` ``[d]`` or None."""

    w_in: torch.Tensor
    w_up: torch.Tensor | None
    b_in: torch.Tensor | None
    w_out: torch.Tensor
    b_out: torch.Tensor | None


def neuron_weights(ffn: nn.Module, spec: FFNSpec) -> NeuronWeights:
    """Views of the FFN's weights in ``[out, in]`` layout (GPT-2's Conv1D transposed), no copies where avoidable."""
    first = getattr(ffn, spec.gate if spec.gate is not None else spec.up)
    down = getattr(ffn, spec.down)
    w_in, w_up = weight_of(first), None
    if spec.fused:
        w_in, w_up = weight_of(first).chunk(2, dim=0)
    elif spec.gate is not None:
        w_up = weight_of(getattr(ffn, spec.up))
    b_in = None if spec.gated else getattr(first, "bias", None)
    up_bias = getattr(getattr(ffn, spec.up), "bias", None)
    if spec.gated and (getattr(first, "bias", None) is not None or up_bias is not None):
        raise ConfigError("moe: gated FFNs with biased gate/up projections are not supported")
    return NeuronWeights(w_in, w_up, b_in, weight_of(down), getattr(down, "bias", None))
