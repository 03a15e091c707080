"""Model adapters: where a causal LM keeps its decoder blocks and each block's linear layers.

The sequential driver only needs the block list: block-0 inputs and every block's own arguments
are captured by running the model itself (``compressor.engine``), so embeddings, rotary tables
and masks are built by the family's own code. Everything that is not a block (embeddings, final norm, head) is "outside".
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from compressor.config import ConfigError

# model_type -> dotted path of the decoder blocks' ModuleList
BLOCK_PATHS: dict[str, str] = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "qwen3": "model.layers",
    "gemma": "model.layers",
    "gemma2": "model.layers",
    "gemma3_text": "model.layers",
    "phi": "model.layers",
    "phi3": "model.layers",
    "opt": "model.decoder.layers",
    "bloom": "transformer.h",
    "falcon": "transformer.h",
    "gpt_neox": "gpt_neox.layers",
    "gpt2": "transformer.h",
}

# config attribute holding the longest context, per family where it differs from max_position_embeddings
_CONTEXT_ATTRS = ("max_position_embeddings", "n_positions", "seq_length")


def check_supported(model_type: str) -> None:
    """Raise a ConfigError naming the family and the supported ones."""
    if model_type not in BLOCK_PATHS:
        raise ConfigError(
            f"model family {model_type!r} is not supported: supported families are {', '.join(sorted(BLOCK_PATHS))}"
        )


def max_context(config) -> int | None:
    """Longest sequence the model accepts, or None where positions are unbounded (ALiBi: BLOOM)."""
    if config.model_type == "bloom":
        return None
    for attr in _CONTEXT_ATTRS:
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def weight_of(module: nn.Module) -> torch.Tensor:
    """The weight as ``[out_features, in_features]`` (GPT-2's Conv1D stores it transposed)."""
    return module.weight.t() if isinstance(module, Conv1D) else module.weight


def set_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Write an ``[out, in]`` weight back in the module's own layout and dtype."""
    target = module.weight
    new = weight.t() if isinstance(module, Conv1D) else weight
    with torch.no_grad():
        target.copy_(new.to(dtype=target.dtype, device=target.device))


class ModelAdapter:
    """Finds the decoder blocks of a supported causal LM and the linear layers inside each block."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.model_type = model.config.model_type
        check_supported(self.model_type)
        self.block_path = BLOCK_PATHS[self.model_type]

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.get_submodule(self.block_path)

    def _set_blocks(self, blocks: nn.ModuleList) -> None:
        parent_path, _, name = self.block_path.rpartition(".")
        setattr(self.model.get_submodule(parent_path), name, blocks)

    def linears(self, block: nn.Module) -> dict[str, nn.Module]:
        """The prunable linear layers of a block, by name relative to the block, in forward order."""
        return {name: m for name, m in block.named_modules() if name and is_linear(m)}

    def iter_linears(self) -> Iterator[tuple[str, nn.Module]]:
        """All prunable linear layers as (full name, module)."""
        for i, block in enumerate(self.blocks):
            for name, module in self.linears(block).items():
                yield f"{self.block_path}.{i}.{name}", module

    def move_outside(self, device: torch.device | str) -> None:
        """Move everything except the blocks (embeddings, norms, head, rotary tables) to ``device``."""
        blocks = self.blocks
        self._set_blocks(nn.ModuleList())
        try:
            self.model.to(device)
        finally:
            self._set_blocks(blocks)
