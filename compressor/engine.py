"""The block engine: each decoder block's inputs as the model builds them, activation streams, running a block.

Families whose layers differ (Gemma-2/3 sliding vs full attention and local vs global rotary tables,
Qwen2/3 and Mistral sliding windows, anything with ``config.layer_types``) call each block with its
own keyword arguments. They are captured by running the model's own forward once per input shape
with every block replaced by a :class:`_Recorder`: a weightless stand-in that records the arguments
its block is called with and hands the hidden state on unchanged, so no block weights need to be on
the device (blocks may live on the host or on disk, ``compressor.streaming``). The forward stops
after the last stand-in. Tensors the model shares between blocks (one mask per layer type, one
rotary table per theta) stay shared, so the captured arguments do not grow with depth.

Nothing here imports the pruner or the reconstruction: this module is the leaf that both use.
"""

from __future__ import annotations

import inspect
import logging

import torch
from torch import nn

from compressor.models.adapters import ModelAdapter

log = logging.getLogger(__name__)

_DROP_KWARGS = ("past_key_value", "past_key_values", "layer_past", "use_cache", "output_attentions")

Shape = tuple[int, int]  # (batch, seqlen)


class _StopForward(Exception):
    pass


class _Retry(Exception):
    pass


def _cut(value, batch: int, size: int):
    """``value`` with per-sample tensors (leading dimension ``batch`` > 1) cut to ``size`` samples, tuples too."""
    if torch.is_tensor(value):
        return value[:size] if value.dim() > 0 and value.shape[0] == batch and batch > 1 else value
    if isinstance(value, (tuple, list)):
        return type(value)(_cut(v, batch, size) for v in value)
    return value


def kwargs_for(kwargs_by_shape: dict[Shape, dict], shape: Shape) -> dict:
    """One block's kwargs for a ``(batch, seqlen)`` input; a smaller batch of a known seqlen reuses a larger
    batch's kwargs with per-sample tensors (masks) cut to size (the cut is cached)."""
    if shape in kwargs_by_shape:
        return kwargs_by_shape[shape]
    for (b, t), kw in list(kwargs_by_shape.items()):
        if t == shape[1] and b >= shape[0]:
            cut = {k: _cut(v, b, shape[0]) for k, v in kw.items()}
            kwargs_by_shape[shape] = cut
            return cut
    raise KeyError(f"no block inputs captured for batch {shape[0]} x seqlen {shape[1]}")


class BlockKwargs:
    """The keyword arguments every decoder block is called with, per input shape, as the model's forward built them.

    Args:
        blocks: the model's decoder blocks, in order; a block is found by identity, so the same module objects
            must be passed to ``of`` (their weights may move between devices or to disk meanwhile).
        by_block: ``[{(batch, seqlen): {name: value}}]``, one dict per block (default: empty, filled by
            ``capture_block_inputs``).
    """

    def __init__(self, blocks, by_block: list[dict[Shape, dict]] | None = None):
        self.blocks = list(blocks)  # held so that their ids stay theirs
        self._index = {id(b): i for i, b in enumerate(self.blocks)}
        self.by_block = by_block if by_block is not None else [{} for _ in self.blocks]
        if len(self.by_block) != len(self.blocks):
            raise ValueError(f"{len(self.by_block)} kwargs dicts for {len(self.blocks)} blocks")

    def index(self, block: nn.Module) -> int:
        """Position of ``block`` among the blocks; KeyError for a module that is not one of them (e.g. a copy)."""
        try:
            return self._index[id(block)]
        except KeyError:
            raise KeyError(f"{type(block).__name__} is not one of the decoder blocks whose inputs were captured "
                           "(a copy of a block has no captured inputs)") from None

    def of(self, block: nn.Module, shape: Shape) -> dict:
        """The kwargs ``block`` is called with on an input of ``(batch, seqlen)`` ``shape``."""
        return kwargs_for(self.by_block[self.index(block)], tuple(shape))


class _Recorder(nn.Module):
    """Stands in for decoder block ``index`` during capture (see the module docstring). Attributes it lacks are read
    from the real block (``attention_type``, ``layer_idx``, ...), which is held unregistered: its weights stay where
    they are."""

    def __init__(self, block: nn.Module, index: int, capture: _Capture):
        super().__init__()
        object.__setattr__(self, "_block", block)
        object.__setattr__(self, "_index", index)
        object.__setattr__(self, "_capture", capture)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_block"), name)

    def forward(self, *args, **kwargs):
        return self._capture.record(self._index, args, kwargs)


class _Capture:
    """What the stand-ins of one capture share: the recorded inputs and the hand-over between blocks."""

    def __init__(self, blocks: nn.ModuleList, kwargs: BlockKwargs, store_device, as_tuple: bool,
                 drop: tuple[str, ...] = _DROP_KWARGS):
        self.params = [list(inspect.signature(b.forward).parameters) for b in blocks]
        self.drop = drop
        self.kwargs = kwargs
        self.store_device = store_device
        self.as_tuple = as_tuple  # hand the hidden state on as (hidden,): families whose loop takes outputs[0]
        self.batches: list[torch.Tensor] = []
        self._last = len(blocks) - 1
        self._handed: tuple[torch.Tensor, object] | None = None  # (hidden, what the stand-in returned)
        self._shared: dict[int, torch.Tensor] = {}  # id -> tensor, for sharing equal tensors between blocks

    def _share(self, value):
        if torch.is_tensor(value):
            if id(value) in self._shared:
                return value
            for t in self._shared.values():
                if (t.shape == value.shape and t.dtype == value.dtype and t.device == value.device
                        and torch.equal(t, value)):
                    return t
            self._shared[id(value)] = value
            return value
        if isinstance(value, (tuple, list)):
            return type(value)(self._share(v) for v in value)
        return value

    def record(self, i: int, args: tuple, kwargs: dict):
        # name the positional arguments too (GPT-2 passes its mask positionally)
        named = dict(zip(self.params[i], args)) | kwargs
        hidden = named.pop(self.params[i][0])
        if i == 0:
            self.batches.append(hidden.to(self.store_device))
        else:
            sent, returned = self._handed
            if hidden is returned and isinstance(returned, tuple):
                hidden = returned[0]
            if hidden is not sent:  # the loop changed what block i - 1 returned before block i
                if not self.as_tuple:
                    raise _Retry
                raise RuntimeError(f"the model changes the hidden state between blocks {i - 1} and {i}: "
                                   "its blocks cannot be run one at a time")
        shape = tuple(hidden.shape[:2])
        by_shape = self.kwargs.by_block[i]
        if shape not in by_shape:
            by_shape[shape] = {k: self._share(v) for k, v in named.items() if k not in self.drop}
        if i == self._last:
            raise _StopForward
        out = (hidden,) if self.as_tuple else hidden
        self._handed = (hidden, out)
        return out


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, adapter: ModelAdapter, ids: torch.Tensor, batch_size: int, device, store_device, prefix=None
) -> Stream:
    """Run ``ids`` ``[n, seqlen]`` through the model's own forward; return block 0's inputs, batch by batch, and
    every block's kwargs (``Stream.kwargs``). Block weights are not touched (see the module docstring).

    ``prefix`` (``compressor.cushion.prefix.Prefix``): the windows run after the prefix's keys/values; the
    kwargs keep its cache (each block's attention reads its own layer of it, and a forward never extends it)
    and the shifted positions and masks."""
    from compressor.cushion.prefix import prefixed_inputs

    blocks = adapter.blocks
    adapter.move_outside(device)
    behind = prefix is not None and len(prefix) > 0
    drop = tuple(k for k in _DROP_KWARGS if k not in ("past_key_value", "past_key_values")) if behind else _DROP_KWARGS
    if behind:
        prefix = prefix.to(device, next(model.get_input_embeddings().parameters()).dtype)
    for as_tuple in (False, True):
        kwargs = BlockKwargs(blocks)
        capture = _Capture(blocks, kwargs, store_device, as_tuple, drop)
        adapter._set_blocks(nn.ModuleList([_Recorder(b, i, capture) for i, b in enumerate(blocks)]))
        try:
            for start in range(0, ids.shape[0], batch_size):
                try:
                    inputs = prefixed_inputs(prefix, ids[start : start + batch_size].to(device))
                    model(**{"use_cache": False, **inputs})
                except _StopForward:
                    pass
            return Stream(capture.batches, kwargs)
        except _Retry:  # the family's loop indexes its blocks' outputs (outputs[0]): hand on tuples
            continue
        finally:
            adapter._set_blocks(blocks)
    raise AssertionError("unreachable")


class Stream:
    """Hidden states entering a block, one tensor ``[batch, seqlen, hidden]`` per batch, with every block's kwargs."""

    def __init__(self, batches: list[torch.Tensor], kwargs: BlockKwargs):
        self.batches = batches
        self.kwargs = kwargs

    def clone(self) -> Stream:
        return Stream([b.clone() for b in self.batches], self.kwargs)

    @property
    def numel(self) -> int:
        return sum(b.numel() for b in self.batches)


def block_output(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def run_block(block: nn.Module, stream: Stream, device, on_batch=None, keep: bool = True) -> list[torch.Tensor]:
    """Outputs of ``block`` (one of the captured blocks, called with its own kwargs) for every batch of ``stream``
    (kept where the inputs live; dropped with ``keep=False``, for passes run only for their hooks)."""
    outs = []
    for hidden in stream.batches:
        y = block_output(block, hidden.to(device), stream.kwargs.of(block, hidden.shape[:2]))
        if on_batch is not None:
            on_batch()
        if keep:
            outs.append(y.to(hidden.device))
        del y
    return outs


@torch.no_grad()
def advance(block: nn.Module, stream: Stream, device) -> None:
    """Replace every batch of ``stream`` by the block's output, batch by batch, so each input is freed as its
    output is made (the stream's memory does not double). The stream must not share its list."""
    for k, hidden in enumerate(stream.batches):
        kw = stream.kwargs.of(block, hidden.shape[:2])
        stream.batches[k] = block_output(block, hidden.to(device), kw).to(hidden.device)
        del hidden


def check_finite(index: int, batches: list[torch.Tensor]) -> None:
    """Stop before anything is checkpointed when a block's outputs hold NaN/Inf."""
    for b in batches:
        if not torch.isfinite(b).all():
            raise FloatingPointError(
                f"block {index} produced NaN/Inf activations after pruning/reconstruction; nothing of it was "
                "checkpointed. Try float32 (model.source.dtype), more damping (pruning.percdamp) or a lower "
                "reconstruction lr.")


def stream_error(dense: list[torch.Tensor], sparse: list[torch.Tensor], device, reduce=None) -> tuple[float, float]:
    """(normalized error (1/(N*T*H)) ||dense - sparse||^2, relative error ||dense - sparse||^2 / ||dense||^2).

    ``reduce`` (``ProcessGroup.all_reduce_sum``): the sums are over every rank's share of the windows."""
    sq, ref, n = 0.0, 0.0, 0
    for d, s in zip(dense, sparse):
        d, s = d.to(device).float(), s.to(device).float()
        sq += (d - s).square().sum().item()
        ref += d.square().sum().item()
        n += d.numel()
    if reduce is not None:
        sq, ref, n = reduce([sq, ref, n])
    return sq / max(n, 1), sq / max(ref, 1e-30)


def choose_store_device(bytes_needed: int, device: torch.device, mode: str) -> torch.device:
    """Where activations live: the compute device when they fit (with headroom), else host memory."""
    if mode == "cpu" or device.type == "cpu":
        return torch.device("cpu")
    if mode == "device":
        return device
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if bytes_needed * 1.5 < free * 0.8:
            return device
        log.info("activations need %.1f GB: kept in host memory (GPU has %.1f GB free)", bytes_needed / 1e9, free / 1e9)
        return torch.device("cpu")
    return device
