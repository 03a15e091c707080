"""The model's identity: a fingerprint of its weights, not of its path.

Everything derived from the model and kept across runs (block checkpoints, generated-text caches,
the report) is keyed by it, so a model folder changed in place (more fine-tuning, a re-export) is
recognised as another model, and the same weights moved elsewhere as the same one.

The fingerprint hashes the loaded weights themselves (every parameter's name, dtype, shape and
bytes; tied parameters once), the architecture settings of the config (without paths and library
versions) and the tokenizer's vocabulary. Reading the weights in memory costs about a second per
GB per core; the tensors are hashed on several threads.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor

import torch

DIGEST_CHARS = 16
_CONFIG_IGNORED = ("transformers_version", "use_cache")


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 (first 16 hex digits) of a tensor's dtype, shape and bytes."""
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    data = t.detach().cpu().contiguous()
    if data.numel():
        h.update(data.view(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:DIGEST_CHARS]


def config_digest(config) -> str:
    """Digest of the config's settings, without paths (``_name_or_path``...) and library versions."""
    d = json.loads(config.to_json_string(use_diff=False))
    d = {k: v for k, v in d.items() if not k.startswith("_") and k not in _CONFIG_IGNORED}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:DIGEST_CHARS]


def tokenizer_digest(tokenizer) -> str | None:
    """Digest of the vocabulary and special tokens (None without a tokenizer)."""
    if tokenizer is None:
        return None
    blob = json.dumps([sorted(tokenizer.get_vocab().items()), tokenizer.all_special_tokens,
                       getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)],
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:DIGEST_CHARS]


def model_identity(model, tokenizer=None) -> dict:
    """``{"fingerprint", "config", "tokenizer", "dtype", "tensors": {name: digest}}`` of a loaded model.

    ``fingerprint`` (16 hex digits) changes with any weight, the architecture or the vocabulary."""
    params = dict(model.named_parameters())  # tied parameters appear once
    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:  # hashlib releases the GIL on large buffers
        digests = dict(zip(params, pool.map(tensor_digest, params.values())))
    parts = {"config": config_digest(model.config), "tokenizer": tokenizer_digest(tokenizer)}
    blob = json.dumps([parts, sorted(digests.items())])
    return {"fingerprint": hashlib.sha256(blob.encode()).hexdigest()[:DIGEST_CHARS], **parts,
            "dtype": str(next(iter(params.values())).dtype).removeprefix("torch.") if params else None,
            "tensors": digests}


def describe_change(old: dict, new: dict) -> str:
    """What differs between two identities, in words (``old`` as recorded by an earlier run)."""
    if not old or "tensors" not in old:
        return "the earlier run recorded no model fingerprint"
    changes = []
    a, b = old["tensors"], new["tensors"]
    differ = sorted(k for k in set(a) & set(b) if a[k] != b[k])
    if differ:
        shown = ", ".join(differ[:4]) + (", ..." if len(differ) > 4 else "")
        changes.append(f"{len(differ)} of {len(b)} weight tensors differ ({shown})")
    for label, keys in (("missing now", set(a) - set(b)), ("new", set(b) - set(a))):
        if keys:
            changes.append(f"{len(keys)} tensors {label} ({', '.join(sorted(keys)[:4])})")
    if old.get("dtype") != new.get("dtype"):
        changes.append(f"dtype {old.get('dtype')} -> {new.get('dtype')}")
    if old.get("config") != new.get("config"):
        changes.append("the model config differs")
    if old.get("tokenizer") != new.get("tokenizer"):
        changes.append("the tokenizer differs")
    return "; ".join(changes) or f"fingerprint {old.get('fingerprint')} -> {new.get('fingerprint')}"
