"""Text sources and token windows: local files, folders, JSONL, and the standard hub datasets."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from compressor.config import HUB_DATASETS

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".raw", ".tokens", ".md", ".jsonl", ".json")


class DataError(ValueError):
    """A data source cannot provide what was asked; the message says what it has."""


def hub_text(name: str, split: str) -> str:
    """The whole text of a standard dataset split from the Hugging Face hub, joined the way the
    pruning papers' reference code joins it (wikitext2: paragraphs with blank lines; ptb: sentences)."""
    try:
        from datasets import load_dataset

        if name == "wikitext2":
            ds = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
            return "\n\n".join(ds["text"])
        if name == "ptb":
            ds = load_dataset("ptb_text_only", "penn_treebank", split=split)
            return " ".join(ds["sentence"])
        if name == "c4":
            shard = "en/c4-train.00000-of-01024.json.gz" if split == "train" else "en/c4-validation.00000-of-00008.json.gz"
            ds = load_dataset("allenai/c4", data_files={split: shard}, split=split)
            return "\n\n".join(ds.select(range(min(len(ds), 3000)))["text"])
    except Exception as exc:  # hub unreachable, dataset renamed, ...
        raise DataError(
            f"could not load dataset {name!r} (split {split!r}) from the Hugging Face hub: {type(exc).__name__}: "
            f"{exc}. Offline? Point the source at a local text file or folder instead."
        ) from exc
    raise DataError(f"unknown hub dataset {name!r}: known are {', '.join(HUB_DATASETS)}")


def _file_text(path: Path, text_field: str) -> str:
    if path.suffix == ".jsonl":
        texts = []
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if line.strip():
                    record = json.loads(line)
                    if text_field not in record:
                        raise DataError(f"{path}:{lineno} has no field {text_field!r} (fields: {sorted(record)})")
                    texts.append(record[text_field])
        return "\n\n".join(texts)
    if path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        records = data if isinstance(data, list) else [data]
        return "\n\n".join(r[text_field] if isinstance(r, dict) else str(r) for r in records)
    return path.read_text(encoding="utf-8")


def local_text(source: str, text_field: str = "text") -> str:
    """Text of a file (as-is), a JSONL/JSON file (``text_field`` of each record) or a folder of them."""
    path = Path(os.path.expanduser(source))
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise DataError(f"folder {source!r} holds no text files ({', '.join(TEXT_SUFFIXES)})")
        return "\n\n".join(_file_text(p, text_field) for p in files)
    if not path.is_file():
        raise DataError(f"text source {source!r}: no such file or folder")
    return _file_text(path, text_field)


def source_text(source: str, split: str, text_field: str = "text") -> str:
    return hub_text(source, split) if source in HUB_DATASETS else local_text(source, text_field)


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer starts every encoded text with its BOS token by default (Gemma, Llama: yes)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a").input_ids
    return len(ids) > 0 and ids[0] == bos and tokenizer("a", add_special_tokens=False).input_ids[:1] != [bos]


def window_bos(tokenizer, mode: str, where: str = "bos") -> int | None:
    """The token id every window starts with under ``mode`` (auto, always, never), or None: windows are then cut
    from the text tokenized as the tokenizer does by default (the classic protocol)."""
    if mode == "never":
        return None
    if mode == "always":
        if tokenizer.bos_token_id is None:
            raise DataError(f"{where}='always' but the tokenizer has no BOS token: use 'auto' or 'never'")
        return tokenizer.bos_token_id
    return tokenizer.bos_token_id if adds_bos(tokenizer) else None


def tokenize(tokenizer, text: str, special_tokens: bool = True) -> torch.Tensor:
    """Token ids ``[n]`` of the whole text, with the tokenizer's default special tokens (``special_tokens``) or
    none (when each window gets its own BOS)."""
    saved = tokenizer.model_max_length
    tokenizer.model_max_length = int(1e12)  # whole-corpus tokenization: silence the length warning
    try:
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=special_tokens).input_ids[0]
    finally:
        tokenizer.model_max_length = saved
    return ids


def _with_bos(windows: torch.Tensor, bos: int | None) -> torch.Tensor:
    if bos is None:
        return windows
    return torch.cat([windows.new_full((windows.shape[0], 1), bos), windows], dim=1)


def random_windows(ids: torch.Tensor, num: int, seqlen: int, generator: torch.Generator, name: str,
                   bos: int | None = None) -> torch.Tensor:
    """``[num, seqlen]`` windows with starts ``torch.randint(0, n - seqlen - 1, (num,))``; with ``bos``, each is
    ``bos`` followed by ``seqlen - 1`` text tokens (starts drawn for that length)."""
    n, body = ids.numel(), seqlen - (bos is not None)
    if n - body - 1 < 1:
        raise DataError(
            f"source {name!r} has {n} tokens: windows of {seqlen} tokens need at least {body + 2}"
        )
    starts = torch.randint(0, n - body - 1, (num,), generator=generator)
    return _with_bos(torch.stack([ids[s : s + body] for s in starts.tolist()]), bos)


def consecutive_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None,
                        bos: int | None = None) -> torch.Tensor:
    """Non-overlapping ``[k, seqlen]`` windows from the start, partial tail dropped; with ``bos``, each is ``bos``
    followed by the next ``seqlen - 1`` text tokens (every text token is still predicted once)."""
    body = seqlen - (bos is not None)
    k = ids.numel() // body
    if k == 0:
        raise DataError(f"text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    if max_windows is not None:
        k = min(k, max_windows)
    return _with_bos(ids[: k * body].view(k, body), bos)


def split_counts(total: int, weights: list[float]) -> list[int]:
    """Integer counts summing to ``total`` in proportion to ``weights`` (largest remainder)."""
    s = sum(weights)
    if s <= 0:
        raise DataError(f"mixture weights {weights} sum to zero")
    raw = [total * w / s for w in weights]
    counts = [int(r) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: raw[i] - counts[i], reverse=True)
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts
