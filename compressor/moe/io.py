"""Saving, loading and using a converted model: ``moe.safetensors`` beside a loadable ``model/`` folder.

``model/`` is the model as ``save_pretrained`` writes it (the converted FFNs keep their layers' names,
so it loads with transformers as the plain dense, or pruned, model). ``moe.safetensors`` holds per
converted FFN (``<block_path>.<i>.<ffn path>.``): ``assignment`` (int64 ``[d_ff]``), ``mu`` ``[d_ff]``,
``router.proj`` ``[E, d]``, ``router.mix`` ``[E, E]``, ``expert_bias`` ``[E, d]`` (recomputed on load from
the weights and ``mu``; stored for inspection), and metadata ``experts``, ``k``, ``variant``, ``seed``, ``family``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from compressor.config import ConfigError
from compressor.io import atomic_write
from compressor.models.adapters import ModelAdapter
from compressor.moe.config import VARIANTS
from compressor.moe.convert import replace_ffn
from compressor.moe.ffn import ffn_module, ffn_spec
from compressor.moe.module import MoEFFN

FILE = "moe.safetensors"
FORMAT = "compressor-moe/1"


def moe_modules(model: nn.Module) -> dict[str, MoEFFN]:
    """The converted FFNs by full module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MoEFFN)}


def save_moe(model: nn.Module, path: str | Path) -> Path:
    """Write the converted FFNs' tables to ``path`` (safetensors, atomically)."""
    from safetensors.torch import save_file

    modules = moe_modules(model)
    if not modules:
        raise ValueError("the model has no converted FFN to save")
    tensors = {}
    for name, m in modules.items():
        tensors.update({f"{name}.assignment": m.assignment, f"{name}.mu": m.mu, f"{name}.router.proj": m.router_proj,
                        f"{name}.router.mix": m.router_mix, f"{name}.expert_bias": m.expert_bias})
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    first = next(iter(modules.values()))
    meta = {"format": FORMAT, "experts": str(first.experts), "k": str(first.k), "variant": first.variant,
            "seed": str(first.seed), "family": model.config.model_type}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def attach_moe(model: nn.Module, path: str | Path, k: int | None = None, variant: str | None = None) -> dict:
    """Convert ``model``'s FFNs with the tables in ``path`` (as ``save_moe`` wrote them for this model); ``k`` and
    ``variant`` override the saved ones. Returns the file's metadata (with the values in force)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata() or {})
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    if meta.get("format") != FORMAT:
        raise ConfigError(f"{path}: not a compressor MoE file (format {meta.get('format')!r}, expected {FORMAT!r})")
    adapter = ModelAdapter(model)
    spec = ffn_spec(adapter.model_type)
    experts = int(meta["experts"])
    k = int(meta["k"]) if k is None else k
    variant = variant or meta["variant"]
    if variant not in VARIANTS or not 1 <= k <= experts:
        raise ConfigError(f"moe: k={k} must be in [1, {experts}] and variant={variant!r} one of {', '.join(VARIANTS)}")
    for i, block in enumerate(adapter.blocks):
        name = f"{adapter.block_path}.{i}.{spec.path}"
        if f"{name}.assignment" not in tensors:
            raise ConfigError(f"{path} has no tables for {name}: it belongs to another model")
        moe = MoEFFN(ffn_module(block, spec), spec, tensors[f"{name}.assignment"], tensors[f"{name}.mu"],
                     tensors[f"{name}.router.proj"], tensors[f"{name}.router.mix"], k, variant, int(meta["seed"]) + i)
        replace_ffn(block, spec, moe)
    return {**meta, "k": k, "variant": variant, "experts": experts}


def detach_moe(model: nn.Module) -> None:
    """Put dense FFNs back (modules of the family's own FFN class holding the same layers)."""
    adapter = ModelAdapter(model)
    spec = ffn_spec(adapter.model_type)
    for block in adapter.blocks:
        moe = ffn_module(block, spec)
        if isinstance(moe, MoEFFN):
            replace_ffn(block, spec, moe.dense)


def set_moe(model: nn.Module, k: int | None = None, variant: str | None = None,
            expert_compute: bool | None = None) -> None:
    """Change k, variant or forward of every converted FFN in place (no retraining)."""
    for m in moe_modules(model).values():
        if k is not None:
            if not 1 <= k <= m.experts:
                raise ConfigError(f"moe: k={k} must be in [1, {m.experts}]")
            m.k = k
        if variant is not None:
            if variant not in VARIANTS:
                raise ConfigError(f"moe.variant={variant!r}: choose one of {', '.join(VARIANTS)}")
            m.variant = variant
        if expert_compute is not None:
            m.expert_compute = expert_compute
        m.reset_random()


def saved_moe_file(model_path: str | Path) -> Path | None:
    """The ``moe.safetensors`` of an output folder, given the folder or its ``model/``; None when there is none."""
    p = Path(model_path).expanduser()
    for candidate in (p / FILE, p.parent / FILE):
        if candidate.is_file():
            return candidate
    return None


def load_moe(folder: str | Path, device: str | torch.device = "cpu", dtype: str = "float32", k: int | None = None,
             variant: str | None = None, expert_compute: bool = False):
    """``(model, tokenizer, meta)`` of a converted output folder (the folder holding ``model/`` and ``moe.safetensors``,
    or its ``model/``), on ``device``; ``k``/``variant`` override the saved ones."""
    from compressor.config import ModelConfig
    from compressor.models.loading import load_model

    folder = Path(folder).expanduser()
    model_dir = folder / "model" if (folder / "model").is_dir() else folder
    moe_file = saved_moe_file(model_dir)
    if moe_file is None:
        raise ConfigError(f"{folder}: no {FILE} in it or beside it: not a converted output folder")
    model, tokenizer = load_model(ModelConfig(name_or_path=str(model_dir), dtype=dtype))
    meta = attach_moe(model, moe_file, k, variant)
    model.to(device)
    if expert_compute:
        set_moe(model, expert_compute=True)
    return model, tokenizer, meta


@torch.no_grad()
def generate(folder: str | Path, prompt: str, max_new_tokens: int = 32, device: str = "cpu", k: int | None = None,
             expert_compute: bool = False) -> str:
    """Greedy continuation of ``prompt`` by a converted output folder: ``python -m compressor.moe.generate``."""
    model, tokenizer, _ = load_moe(folder, device, k=k, expert_compute=expert_compute)
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
