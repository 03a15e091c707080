"""Assemble calibration and evaluation token windows from configured sources."""

from __future__ import annotations

import logging

import torch

from compressor.config import GENERATED, CalibrationConfig, GenerationConfig
from compressor.data.generated import cached_generated
from compressor.data.text import (
    consecutive_windows,
    random_windows,
    source_text,
    split_counts,
    tokenize,
    window_bos,
)

log = logging.getLogger(__name__)

# a fixed offset so held-out generated text never equals the calibration samples
HELDOUT_SEED_OFFSET = 1_000_003


def calibration_windows(cfg: CalibrationConfig, model, tokenizer, model_id: str, device="cpu") -> torch.Tensor:
    """``[num_samples, seqlen]`` token windows: a mixture of the configured sources, in source order.

    With a single text source and no BOS per window (``cfg.bos``: never, or auto with a tokenizer that adds none,
    as SmolLM2's) this is exactly the shared protocol's draw: ``torch.randint(0, n - seqlen - 1, (num,))`` from
    ``torch.Generator().manual_seed(seed)``. With BOS, each window is BOS and ``seqlen - 1`` text tokens.
    """
    weights = cfg.weights or [1.0] * len(cfg.sources)
    counts = split_counts(cfg.num_samples, weights)
    gen = torch.Generator().manual_seed(cfg.seed)
    bos = window_bos(tokenizer, cfg.bos, "calibration.bos")
    parts = []
    for source, count in zip(cfg.sources, counts):
        if count == 0:
            continue
        if source == GENERATED:
            parts.append(cached_generated(model, tokenizer, model_id, count, cfg.seqlen, cfg.generation, cfg.seed,
                                          device, bos))
        else:
            ids = tokenize(tokenizer, source_text(source, "train", cfg.text_field), special_tokens=bos is None)
            parts.append(random_windows(ids, count, cfg.seqlen, gen, source, bos))
        log.info("calibration: %d windows of %d tokens from %s%s", count, cfg.seqlen, source,
                 f", each starting with BOS {bos}" if bos is not None else "")
    return torch.cat(parts)


def evaluation_windows(
    source: str, seqlen: int, tokenizer, model=None, model_id: str = "", max_windows: int | None = None,
    generated_samples: int = 16, generation: GenerationConfig | None = None, seed: int = 0, device="cpu",
    text_field: str = "text", bos: str = "auto",
) -> torch.Tensor:
    """Non-overlapping ``[k, seqlen]`` windows of an evaluation corpus (tail dropped), or held-out generated text;
    ``bos`` (auto, always, never) as ``evaluation.bos``."""
    first = window_bos(tokenizer, bos, "evaluation.bos")
    if source == GENERATED:
        n = generated_samples if max_windows is None else min(generated_samples, max_windows)
        return cached_generated(model, tokenizer, model_id, n, seqlen, generation or GenerationConfig(),
                                seed + HELDOUT_SEED_OFFSET, device, first, purpose="held-out")
    ids = tokenize(tokenizer, source_text(source, "test", text_field), special_tokens=first is None)
    return consecutive_windows(ids, seqlen, max_windows, first)
