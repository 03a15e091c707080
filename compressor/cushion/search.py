"""Finding the prefix tokens: the greedy vocabulary search (Son et al., EMNLP 2024, section 3.1) and the
training-free outlier-token choice (PrefixQuant, arXiv 2410.05265, as a baseline).

Greedy: start from BOS (or a newline where there is no BOS). At each step draw one calibration text
of ``text_len`` tokens; run it after the current prefix followed by every vocabulary token
(``candidate_batch`` candidates per forward, the prefix's keys/values computed once per step and
expanded over the batch, never copied), score each by the quantization error of the text's linear
inputs (ranges over the text only: the candidate's own position is left out), and append the best
token if its error is below ``tau`` x the error of the text after the current prefix alone; stop
otherwise or at ``max_prefix_len``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass

import torch

from compressor.config import ConfigError
from compressor.cushion.config import CushionConfig
from compressor.cushion.error import LinearInputError, distinct_linear_inputs
from compressor.cushion.prefix import Prefix, compute_prefix, decoder, extend_prefix, prefixed_inputs

log = logging.getLogger(__name__)


@dataclass
class SearchStep:
    """One greedy step: the best candidate, its error against the error without it, and the time taken."""

    step: int
    token: int
    piece: str
    error_before: float
    error_best: float
    accepted: bool
    seconds: float
    candidates: int


def start_token(tokenizer) -> int:
    """BOS where the tokenizer has one, else the token of a newline."""
    if tokenizer.bos_token_id is not None:
        return int(tokenizer.bos_token_id)
    ids = tokenizer("\n", add_special_tokens=False)["input_ids"]
    return int(ids[-1])


def draw_texts(calib: torch.Tensor, text_len: int, count: int, seed: int) -> torch.Tensor:
    """``count`` texts ``[count, text_len]`` cut from random windows of ``calib`` ``[k, seqlen]`` at random offsets."""
    k, seqlen = calib.shape
    if text_len > seqlen:
        raise ConfigError(f"model.cushion.text_len={text_len} is longer than the calibration windows ({seqlen} tokens):"
                          f" set model.cushion.text_len to at most {seqlen} or data.calibration.seqlen to at least "
                          f"{text_len}")
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, k, (count,), generator=g)
    starts = torch.randint(0, seqlen - text_len + 1, (count,), generator=g)
    return torch.stack([calib[r, s : s + text_len] for r, s in zip(rows.tolist(), starts.tolist())])


def vocabulary_size(model, tokenizer) -> int:
    """Candidates: the tokenizer's ids that have an embedding row."""
    return min(len(tokenizer), model.get_input_embeddings().num_embeddings)


def autocast(device: torch.device, precision: str):
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@torch.no_grad()
def text_error(model, owners, prefix: Prefix | None, texts: torch.Tensor, cfg: CushionConfig) -> torch.Tensor:
    """L_q of each text ``[k, n]`` after ``prefix`` (no candidate): ``[k]``."""
    device = next(model.parameters()).device
    with LinearInputError(owners, cfg.granularity, cfg.bits, cfg.objective) as err, autocast(device, cfg.precision):
        decoder(model)(**prefixed_inputs(prefix, texts.to(device)))
    return err.total.cpu()


@torch.no_grad()
def candidate_errors(model, owners, prefix: Prefix, text: torch.Tensor, candidates: torch.Tensor,
                     cfg: CushionConfig) -> torch.Tensor:
    """L_q of ``text`` ``[n]`` after ``prefix`` + each candidate token: ``[len(candidates)]`` (fp32, on the CPU)."""
    device = next(model.parameters()).device
    text = text.to(device)
    out = torch.empty(candidates.numel())
    compile = cfg.compile and device.type == "cuda"
    with LinearInputError(owners, cfg.granularity, cfg.bits, cfg.objective, skip=1, compile=compile) as err:
        for start in range(0, candidates.numel(), cfg.candidate_batch):
            chunk = candidates[start : start + cfg.candidate_batch].to(device)
            ids = torch.cat([chunk[:, None], text.expand(chunk.numel(), -1)], dim=1)
            err.reset()
            with autocast(device, cfg.precision):
                decoder(model)(**prefixed_inputs(prefix, ids))
            out[start : start + chunk.numel()] = err.total.cpu()
    return out


def greedy_search(model, tokenizer, calib: torch.Tensor, cfg: CushionConfig, progress: bool = False,
                  start: list[int] | None = None, on_step=None) -> tuple[Prefix, list[SearchStep]]:
    """The greedy prefix for ``model`` (on its device) from calibration windows ``calib`` ``[k, seqlen]``.

    ``start``: token ids to continue from (resume), default ``[BOS]``. ``on_step(prefix, step)`` is called
    after every step. Returns the prefix (keys/values computed by the model) and the steps.
    """
    from tqdm.auto import tqdm

    owners = distinct_linear_inputs(model)
    prefix = compute_prefix(model, start or [start_token(tokenizer)], "greedy")
    vocab = torch.arange(min(vocabulary_size(model, tokenizer), cfg.candidates or 1 << 62))
    steps: list[SearchStep] = []
    texts = draw_texts(calib, cfg.text_len, cfg.max_prefix_len, cfg.seed)
    for step in tqdm(range(len(prefix), cfg.max_prefix_len), desc="cushion greedy search", disable=not progress):
        t = time.perf_counter()
        text = texts[step]
        before = float(text_error(model, owners, prefix, text[None], cfg)[0])
        errors = candidate_errors(model, owners, prefix, text, vocab, cfg)
        best = int(errors.argmin())
        accepted = bool(errors[best] < cfg.tau * before)
        if accepted:
            prefix = extend_prefix(model, prefix, best)
        if next(model.parameters()).device.type == "cuda":
            torch.cuda.synchronize()
        record = SearchStep(step, best, tokenizer.decode([best]), before, float(errors[best]), accepted,
                            time.perf_counter() - t, vocab.numel())
        steps.append(record)
        log.info("cushion step %d: best %d %r error %.4g -> %.4g (%s) in %.1fs", step, best, record.piece, before,
                 record.error_best, "kept" if accepted else "stop", record.seconds)
        if on_step is not None:
            on_step(prefix, record)
        if not accepted:
            break
    return prefix, steps


@torch.no_grad()
def outlier_token_prefix(model, tokenizer, calib: torch.Tensor, cfg: CushionConfig,
                         texts_count: int = 16) -> tuple[Prefix, dict]:
    """BOS plus the tokens that most often carry outliers (PrefixQuant's training-free choice).

    A position is an outlier where max |x| over features at a block's last distinct linear input (the
    down-projection input in Llama-like blocks) exceeds ``cfg.outlier_ratio`` x the median of that over the
    text's positions, in any block. Position 0 of each text is not counted: every window's first token
    is the attention sink that the prefix's BOS replaces. The prefix takes the round mean number of
    outlier positions per text (at most ``max_prefix_len - 1``) of the most frequent outlier token ids.
    Returns the prefix and ``{"outlier_positions_per_text", "counts", "seconds"}``.
    """
    t = time.perf_counter()
    device = next(model.parameters()).device
    owners = distinct_linear_inputs(model)
    last = {}
    for i, name, module in owners:
        last[i] = (i, name, module)
    texts = draw_texts(calib, cfg.text_len, texts_count, cfg.seed + 1)
    ratio = torch.zeros(texts.shape)

    def on_input(i, name, x):
        per_token = x.detach().float().abs().amax(-1).cpu()  # [k, n]
        med = per_token.median(dim=1, keepdim=True).values.clamp_min(1e-12)
        ratio.copy_(torch.maximum(ratio, per_token / med))

    with LinearInputError(list(last.values()), on_input=on_input):
        decoder(model)(input_ids=texts.to(device), use_cache=False)
    mask = ratio > cfg.outlier_ratio
    mask[:, 0] = False
    per_text = float(mask.sum(1).float().mean())
    counts = Counter(texts[mask].tolist())
    take = min(cfg.max_prefix_len - 1, math.floor(per_text + 0.5))
    chosen = [tok for tok, _ in counts.most_common(take)]
    prefix = compute_prefix(model, [start_token(tokenizer)] + chosen, "outlier_tokens")
    info = {"outlier_positions_per_text": per_text,
            "counts": {tokenizer.decode([tok]): n for tok, n in counts.most_common(10)},
            "seconds": time.perf_counter() - t}
    return prefix, info
