"""The cushion prefix: its tokens, its per-layer keys and values, and how a forward pass uses it.

A prefix of ``m`` tokens is applied as a key/value cache in front of every input (Son et al., EMNLP
2024, section 3): the text's queries attend to the prefix's keys, the text's positions start at
``m`` (rotary phases continue after the prefix), and the prefix's own activations never pass
through the decoder blocks again, so activation ranges measured during such a forward see text
tokens only. The keys and values are those the model computes for the prefix tokens (greedy
search), or tuned tensors of the same shapes (prefix tuning).

Saved as ``cushion.safetensors`` beside the model: ``token_ids`` ``[m]`` (int64), ``keys.<layer>``
and ``values.<layer>`` ``[1, kv_heads, m, head_dim]``, metadata ``method``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

FILE_NAME = "cushion.safetensors"


@dataclass
class Prefix:
    """``token_ids`` ``[m]`` and, per decoder layer, ``keys``/``values`` ``[1, kv_heads, m, head_dim]``."""

    token_ids: torch.Tensor
    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    method: str = "greedy"

    def __len__(self) -> int:
        return int(self.token_ids.numel())

    def to(self, device=None, dtype=None) -> Prefix:
        move = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
        ids = self.token_ids if device is None else self.token_ids.to(device)
        return Prefix(ids, [move(k) for k in self.keys], [move(v) for v in self.values],
                      self.method)

    def detach(self) -> Prefix:
        return Prefix(self.token_ids, [k.detach() for k in self.keys], [v.detach() for v in self.values], self.method)


class FixedPrefixLayer(DynamicLayer):
    """One layer's prefix keys/values seen by every forward, never extended (a forward cannot grow it).

    ``update`` returns prefix + new states along the sequence axis but keeps only the prefix, so
    one cache object serves many forwards of any batch size (candidate batches, perplexity windows,
    calibration batches, training steps; the ``[1, ...]`` prefix is expanded, not copied, to the
    batch), and gradients reach the prefix tensors when they are parameters.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.keys, self.values = keys, values
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        batch = key_states.shape[0]
        keys = torch.cat([self.keys.to(key_states.dtype).expand(batch, -1, -1, -1), key_states], dim=-2)
        values = torch.cat([self.values.to(value_states.dtype).expand(batch, -1, -1, -1), value_states], dim=-2)
        return keys, values


def prefix_cache(prefix: Prefix, batch: int = 1, growing: bool = False) -> Cache | None:
    """A cache holding ``prefix``; None for an empty prefix.

    ``growing=False``: the cache is not extended by a forward, so one object serves every forward and batch
    size (search, perplexity, calibration, tuning). ``growing=True``: a plain ``DynamicCache`` holding a copy
    of the prefix for ``batch`` sequences, as ``generate`` extends it.
    """
    if len(prefix) == 0:
        return None
    if growing:
        return DynamicCache(ddp_cache_data=[(k.expand(batch, -1, -1, -1).contiguous(),
                                             v.expand(batch, -1, -1, -1).contiguous())
                                            for k, v in zip(prefix.keys, prefix.values)])
    return Cache(layers=[FixedPrefixLayer(k, v) for k, v in zip(prefix.keys, prefix.values)])


def prefixed_inputs(prefix: Prefix | None, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    growing: bool = False) -> dict:
    """Forward keyword arguments that run ``input_ids`` ``[batch, n]`` after ``prefix``.

    Positions of the text are ``m .. m + n - 1``; an attention mask ``[batch, n]`` is extended by ``m``
    ones in front (the prefix is always attended). An empty or absent prefix gives plain inputs.
    """
    kwargs = {"input_ids": input_ids}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    if prefix is None or len(prefix) == 0:
        return kwargs
    batch, n = input_ids.shape
    m = len(prefix)
    kwargs["past_key_values"] = prefix_cache(prefix, batch, growing)
    kwargs["use_cache"] = True
    # one row for the batch: block kwargs captured for a batch then serve a smaller last batch too
    kwargs["position_ids"] = torch.arange(m, m + n, device=input_ids.device)[None]
    if attention_mask is not None:
        ones = attention_mask.new_ones(batch, m)
        kwargs["attention_mask"] = torch.cat([ones, attention_mask], dim=1)
    return kwargs


@contextlib.contextmanager
def behind(model, prefix: Prefix | None) -> Iterator[None]:
    """Within the block, every call of ``model`` without its own cache runs after ``prefix`` (as
    :func:`prefixed_inputs`): for callers that only pass ``input_ids`` (and perhaps ``attention_mask``), such as
    lm-evaluation-harness's model wrapper. Nothing changes for an empty or absent prefix."""
    if prefix is None or len(prefix) == 0:
        yield
        return
    param = next(model.parameters())
    moved = prefix.to(param.device, param.dtype)

    def hook(module, args, kwargs):
        if kwargs.get("past_key_values") is not None:
            return None
        ids = args[0] if args else kwargs.pop("input_ids")
        mask = args[1] if len(args) > 1 else kwargs.pop("attention_mask", None)
        p = moved if ids.device == moved.token_ids.device else moved.to(ids.device)
        return (), {**kwargs, **prefixed_inputs(p, ids, mask)}

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def decoder(model):
    """The model without its language-model head (activations only: no ``[batch, n, vocab]`` logits)."""
    return getattr(model, model.base_model_prefix, model)


@torch.no_grad()
def compute_prefix(model, token_ids: torch.Tensor | list[int], method: str = "greedy") -> Prefix:
    """Run ``token_ids`` ``[m]`` through ``model`` once and keep every layer's keys and values."""
    device = next(model.parameters()).device
    ids = torch.as_tensor(token_ids, dtype=torch.long, device=device).reshape(-1)
    if ids.numel() == 0:
        return Prefix(ids.cpu(), [], [], method)
    out = decoder(model)(input_ids=ids[None], use_cache=True, past_key_values=DynamicCache())
    cache = out.past_key_values
    return Prefix(ids.cpu(), [layer.keys.detach() for layer in cache.layers],
                  [layer.values.detach() for layer in cache.layers], method)


def extend_prefix(model, prefix: Prefix, token: int) -> Prefix:
    """``prefix`` with one more token, its keys/values computed with the prefix's cache (one-token forward)."""
    device = next(model.parameters()).device
    ids = torch.tensor([[token]], device=device)
    with torch.no_grad():
        out = decoder(model)(**prefixed_inputs(prefix.to(device), ids, growing=True))
    cache = out.past_key_values
    return Prefix(torch.cat([prefix.token_ids, torch.tensor([token])]), [layer.keys for layer in cache.layers],
                  [layer.values for layer in cache.layers], prefix.method)


def prefix_tensors(prefix: Prefix) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` for safetensors (the file layout in the module docstring), on the CPU."""
    tensors = {"token_ids": prefix.token_ids.cpu().to(torch.int64).contiguous()}
    for i, (k, v) in enumerate(zip(prefix.keys, prefix.values)):
        tensors[f"keys.{i}"] = k.detach().cpu().contiguous()
        tensors[f"values.{i}"] = v.detach().cpu().contiguous()
    return tensors, {"method": prefix.method, "layers": str(len(prefix.keys))}


def prefix_from_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> Prefix:
    layers = int(meta.get("layers", 0))
    return Prefix(tensors["token_ids"], [tensors[f"keys.{i}"] for i in range(layers)],
                  [tensors[f"values.{i}"] for i in range(layers)], meta.get("method", "greedy"))


def save_prefix(prefix: Prefix, path: str | Path) -> Path:
    """Write ``prefix`` to ``path`` atomically (safetensors, tensors on the CPU)."""
    from safetensors.torch import save_file

    from compressor.io import atomic_write

    tensors, meta = prefix_tensors(prefix)
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_prefix(path: str | Path) -> Prefix:
    """Read a prefix written by ``save_prefix``; raises FileNotFoundError when ``path`` is absent."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return prefix_from_tensors({k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {})


def find_prefix(folder: str | Path) -> Prefix | None:
    """The prefix saved in a model folder, or None when it has none."""
    path = Path(folder) / FILE_NAME
    return load_prefix(path) if path.is_file() else None


@torch.no_grad()
def generate(model, tokenizer, text: str | list[str], prefix: Prefix | None = None, **generate_kwargs):
    """Generate after the cushion prefix with ``model.generate`` (the prefix as ``past_key_values``).

    The prompt is tokenized without special tokens (the prefix starts with BOS); returns the decoded
    continuations (prompt excluded). Any ``generate`` keyword (``max_new_tokens``, ``do_sample``...) passes on.
    """
    device = next(model.parameters()).device
    texts = [text] if isinstance(text, str) else list(text)
    if len(texts) > 1 and tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # new tokens follow every prompt directly
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=len(texts) > 1, add_special_tokens=prefix is None)
    finally:
        tokenizer.padding_side = side
    enc = enc.to(device)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    kwargs = {"input_ids": ids, "attention_mask": mask}
    if prefix is not None and len(prefix):
        p = prefix.to(device, next(model.parameters()).dtype)
        kwargs = prefixed_inputs(p, ids, mask, growing=True)
        kwargs.pop("position_ids")  # generate derives positions from the extended mask
        # generate expects the ids of every cached token in front of the new ones
        kwargs["input_ids"] = torch.cat([p.token_ids.to(device).expand(ids.shape[0], -1), ids], dim=1)
    out = model.generate(**kwargs, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id, **generate_kwargs)
    return tokenizer.batch_decode(out[:, kwargs["input_ids"].shape[1]:], skip_special_tokens=True)
