"""Shape checks of the chosen settings against every prunable layer, before any weight is loaded.

The model is built from its config on the meta device (no memory, no weights), so a constraint a
layer breaks is reported up front, naming every offending layer, instead of at that layer's turn
after the model, the data and the earlier blocks were processed.

Constraints (the rest of the settings is shape-free: INT4 groups may end ragged at a layer's last
columns, the SparseGPT and GPTQ blocksizes are checked against M and the group size at parse time):

* an N:M pattern groups M consecutive inputs: every pruned layer's in_features must be divisible by M;
* every ``pruning.skip`` suffix must name at least one linear layer (a typo would silently prune it).
"""

from __future__ import annotations

import torch

from compressor.config import ConfigError, PruningConfig
from compressor.models.adapters import ModelAdapter, weight_of


def skipped(name: str, skip: list[str]) -> bool:
    """Whether the linear ``name`` (within a block) is left dense by ``pruning.skip`` (suffix match)."""
    return any(name.endswith(s) for s in skip)


def meta_model(config, trust_remote_code: bool = False):
    """The model built from ``config`` on the meta device: every module and shape, no storage."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def _blocks(indices: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``'0-2, 5'``."""
    runs, start = [], indices[0]
    for prev, cur in zip(indices, indices[1:] + [None]):
        if cur != prev + 1:
            runs.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = cur
    return ", ".join(runs)


def check_layer_shapes(config, pruning: PruningConfig, trust_remote_code: bool = False) -> None:
    """Raise a ConfigError listing every layer the settings cannot be applied to, with the remedy."""
    adapter = ModelAdapter(meta_model(config, trust_remote_code))
    names = list(adapter.linears(adapter.blocks[0])) if len(adapter.blocks) else []
    for suffix in pruning.skip:
        if not any(n.endswith(suffix) for b in adapter.blocks for n in adapter.linears(b)):
            raise ConfigError(f"pruning.skip entry {suffix!r} names no linear layer of this model; the layers of a "
                              f"block are {', '.join(names)}")
    nm = pruning.nm
    if nm is None:
        return
    offending: dict[tuple[str, int], list[int]] = {}
    for i, block in enumerate(adapter.blocks):
        for name, module in adapter.linears(block).items():
            cols = weight_of(module).shape[1]
            if not skipped(name, pruning.skip) and cols % nm[1]:
                offending.setdefault((name, cols), []).append(i)
    if offending:
        layers = "; ".join(f"{name} (in_features={cols}) in blocks {_blocks(idx)}"
                           for (name, cols), idx in offending.items())
        skip = sorted({name for name, _ in offending} | set(pruning.skip))
        raise ConfigError(f"pruning.pattern={pruning.pattern!r} needs every pruned layer's in_features divisible by "
                          f"{nm[1]}; these are not: {layers}. Leave them dense with "
                          f"--model.pruning.skip '[{', '.join(skip)}]' or use an unstructured pattern")
