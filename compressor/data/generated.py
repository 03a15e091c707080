"""Self-generated text: the dense model writes its own samples (algorithms.md section 2).

Each sample starts from one random vocabulary token (after BOS where the windows start with it),
is extended greedily for a few tokens, kept only if that prefix is in the wanted language, then
sampled to full length. Samples are cached on disk, keyed by the model's identity (a fingerprint
of its weights, ``compressor.models.identity``) and every setting that changes them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path

import torch

from compressor.config import GenerationConfig
from compressor.io import atomic_write
from compressor.models.identity import config_digest

log = logging.getLogger(__name__)

_ENGLISH = re.compile(r"^[A-Za-z0-9 \t\n.,;:!?'\"()\-]*[A-Za-z]{2}[A-Za-z0-9 \t\n.,;:!?'\"()\-]*$")


def in_language(text: str, language: str) -> bool:
    """Whether a generated prefix is acceptable: 'any', or 'en' = ASCII words and punctuation only."""
    return language == "any" or bool(_ENGLISH.match(text))


def _candidate_ids(tokenizer, vocab_size: int) -> torch.Tensor:
    special = set(tokenizer.all_special_ids)
    return torch.tensor([i for i in range(min(vocab_size, len(tokenizer))) if i not in special])


@torch.no_grad()
def generate_samples(
    model, tokenizer, num: int, length: int, cfg: GenerationConfig, seed: int, device: torch.device | str = "cpu",
    progress: bool = True, bos: int | None = None, purpose: str = "calibration",
) -> torch.Tensor:
    """``[num, length]`` token ids written by ``model`` (whole model on ``device``), each starting with ``bos``
    when given; ``purpose`` names the progress bar ('calibration' or 'held-out')."""
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(seed)
    candidates = _candidate_ids(tokenizer, model.config.vocab_size)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kept: list[torch.Tensor] = []
    bar = tqdm(total=num, desc=f"generating {purpose} text with the dense model", unit="sample",
               disable=not progress)
    rounds = 0
    while len(kept) < num:
        rounds += 1
        if rounds > 50 * (num // cfg.batch_size + 1):
            raise RuntimeError(f"generation kept {len(kept)} of {num} samples: language filter {cfg.language!r} too strict")
        b = min(cfg.batch_size, num - len(kept))
        first = candidates[torch.randint(0, len(candidates), (b,), generator=gen)].unsqueeze(1).to(device)
        if bos is not None:
            first = torch.cat([torch.full_like(first, bos), first], dim=1)
        # no padding anywhere: an all-ones attention mask, given so that transformers does not warn on every batch
        # that it cannot infer one when the pad token is the EOS token (SmolLM2)
        common = dict(pad_token_id=pad, use_cache=True)
        prefix = first
        if cfg.greedy_tokens:
            prefix = model.generate(first, do_sample=False, max_new_tokens=cfg.greedy_tokens,
                                    min_new_tokens=cfg.greedy_tokens, attention_mask=torch.ones_like(first), **common)
        texts = tokenizer.batch_decode(prefix, skip_special_tokens=True)
        ok = [i for i, t in enumerate(texts) if in_language(t, cfg.language)]
        if not ok:
            continue
        prefix = prefix[ok]
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        new = length - prefix.shape[1]
        out = model.generate(prefix, do_sample=True, max_new_tokens=new, min_new_tokens=new,
                             temperature=cfg.temperature, top_k=cfg.top_k or None, top_p=None,
                             attention_mask=torch.ones_like(prefix), **common)
        kept.extend(out[:, :length].cpu())
        bar.update(len(ok))
    bar.close()
    return torch.stack(kept[:num])


def cache_key(model_id: str, config_digest: str, num: int, length: int, cfg: GenerationConfig, seed: int,
              bos: int | None = None) -> str:
    settings = {k: v for k, v in vars(cfg).items() if k not in ("cache_dir", "batch_size")}
    blob = json.dumps([model_id, config_digest, num, length, settings, seed, bos], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def cached_generated(
    model, tokenizer, model_id: str, num: int, length: int, cfg: GenerationConfig, seed: int, device="cpu",
    bos: int | None = None, purpose: str = "calibration",
) -> torch.Tensor:
    """Generated samples from the cache, or generated now and cached. ``model_id``: the model's identity
    (``model_identity(...)["fingerprint"]``: its weights, not its path); ``bos``: the token each sample starts with."""
    key = cache_key(model_id, config_digest(model.config), num, length, cfg, seed, bos)
    path = Path(os.path.expanduser(cfg.cache_dir)) / f"{key}.pt"
    if path.is_file():
        try:
            ids = torch.load(path, weights_only=True)
            if ids.shape == (num, length):
                log.info("generated text: %d x %d tokens from cache %s", num, length, path)
                return ids
        except Exception as exc:  # a foreign or damaged file: regenerate, never trust it
            log.warning("ignoring unreadable cache %s (%s)", path, exc)
    log.info("generating %d samples of %d tokens with the dense model (seed %d)", num, length, seed)
    ids = generate_samples(model, tokenizer, num, length, cfg, seed, device, bos=bos, purpose=purpose)
    atomic_write(path, lambda tmp: torch.save(ids, tmp))
    return ids
