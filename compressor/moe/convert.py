"""Converting a model's FFNs block by block, on the project's block engine (``compressor.engine``).

Per block: one forward of the calibration stream (``advance``) with hooks on the FFN that record its
inputs ``x`` and the activation ``a`` entering the down projection: ``mu`` from every token, ``x``
and ``a`` kept for ``router_tokens`` tokens drawn with the seed. The stream moves on through the
block *before* its FFN is converted, so every router learns from the unconverted model's activations
(as the reference's statistics come from the dense model). Then targets, the router's fit, and the
FFN replaced by a ``MoEFFN``. The experts (balanced k-means of weight rows) need only the weights:
they are found for all blocks first, in parallel processes on the CPU, or read from a file.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from compressor.config import ConfigError
from compressor.models.adapters import ModelAdapter
from compressor.moe.config import MoEConfig, check_width
from compressor.moe.ffn import FFNSpec, ffn_module, ffn_spec, ffn_width, neuron_weights
from compressor.moe.module import MoEFFN
from compressor.moe.split import balanced_split, check_assignment
from compressor.moe.stats import MeanAccumulator, expert_targets
from compressor.moe.train import fit_router
from compressor.engine import advance, capture_block_inputs, choose_store_device
from compressor.streaming import HostHome

log = logging.getLogger(__name__)


def check_model(model: nn.Module, cfg: MoEConfig) -> tuple[ModelAdapter, FFNSpec]:
    """ConfigError before any work when the family has no FFN adapter or ``cfg.experts`` does not divide a width."""
    adapter = ModelAdapter(model)
    spec = ffn_spec(adapter.model_type)
    for i, block in enumerate(adapter.blocks):
        ffn = ffn_module(block, spec)
        if isinstance(ffn, MoEFFN):
            raise ConfigError(f"moe: block {i} of the model is already converted")
        check_width(f"{adapter.block_path}.{i}.{spec.path}.{spec.down}", ffn_width(ffn, spec), cfg.experts)
    return adapter, spec


def split_rows(ffn: nn.Module, spec: FFNSpec) -> torch.Tensor:
    """The rows clustered into experts: the gate rows (SwiGLU) or the first matrix's rows, ``[d_ff, d]`` on the CPU."""
    return neuron_weights(ffn, spec).w_in.detach().float().cpu()


def centroids_of(rows: torch.Tensor, assignment: torch.Tensor, experts: int) -> torch.Tensor:
    """Means of each expert's normalised rows, ``[E, d]`` (a given assignment's router start)."""
    normed = torch.nn.functional.normalize(rows.float(), dim=1)
    sums = normed.new_zeros(experts, rows.shape[1]).index_add_(0, assignment, normed)
    return sums / torch.bincount(assignment, minlength=experts)[:, None]


def split_all(adapter: ModelAdapter, spec: FFNSpec, cfg: MoEConfig) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(assignment ``[d_ff]``, centroids ``[E, d]``) per block: clustered (``kmeans_jobs`` processes) or read from
    ``cfg.assignment``."""
    rows = [split_rows(ffn_module(b, spec), spec) for b in adapter.blocks]
    if cfg.assignment:
        from safetensors.torch import load_file

        saved = load_file(cfg.assignment)
        out = []
        for i, r in enumerate(rows):
            key = f"{adapter.block_path}.{i}.{spec.path}.assignment"
            if key not in saved:
                raise ConfigError(f"moe.assignment={cfg.assignment!r} has no {key}")
            a = saved[key].long()
            try:
                check_assignment(a, cfg.experts)
            except ValueError as exc:
                raise ConfigError(f"moe.assignment={cfg.assignment!r}, {key}: {exc}") from exc
            out.append((a, centroids_of(r, a, cfg.experts)))
        return out
    from joblib import Parallel, delayed

    return Parallel(n_jobs=cfg.kmeans_jobs)(
        delayed(balanced_split)(r, cfg.experts, cfg.seed + i, cfg.kmeans_max_iter) for i, r in enumerate(rows))


def token_sample(stream_shapes: list[tuple[int, int]], budget: int, seed: int) -> list[torch.Tensor]:
    """Per stream batch, the flat token rows (of ``batch * seqlen``) kept for router training: ``budget`` tokens
    (0: all) drawn without replacement from all of them with ``seed``."""
    sizes = [b * t for b, t in stream_shapes]
    total = sum(sizes)
    if budget == 0 or budget >= total:
        chosen = torch.arange(total)
    else:
        chosen = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:budget].sort().values
    out, start = [], 0
    for size in sizes:
        lo, hi = torch.searchsorted(chosen, torch.tensor([start, start + size]))
        out.append(chosen[lo:hi] - start)
        start += size
    return out


class FFNRecorder:
    """Hooks on an FFN for one pass over a stream: ``mu`` from every token, ``x`` and ``a`` at the sampled rows."""

    def __init__(self, ffn: nn.Module, spec: FFNSpec, rows: list[torch.Tensor]):
        self.ffn, self.down, self.rows = ffn, getattr(ffn, spec.down), rows
        self.mean = MeanAccumulator()
        self.xs: list[torch.Tensor] = []
        self.acts: list[torch.Tensor] = []
        self._batch = 0
        self._handles = []

    def _on_ffn(self, _module, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()))
        idx = self.rows[self._batch].to(x.device)
        self.xs.append(x.reshape(-1, x.shape[-1])[idx].detach())

    def _on_down(self, _module, args):
        a = args[0]
        self.mean.update(a)
        idx = self.rows[self._batch].to(a.device)
        self.acts.append(a.reshape(-1, a.shape[-1])[idx].detach())
        self._batch += 1

    def __enter__(self) -> FFNRecorder:
        self._handles = [self.ffn.register_forward_pre_hook(self._on_ffn, with_kwargs=True),
                         self.down.register_forward_pre_hook(self._on_down)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()


def replace_ffn(block: nn.Module, spec: FFNSpec, module: nn.Module) -> None:
    parent_path, _, name = spec.path.rpartition(".")
    setattr(block.get_submodule(parent_path) if parent_path else block, name, module)


@torch.no_grad()
def convert_model(model: nn.Module, calib: torch.Tensor, cfg: MoEConfig, device, batch_size: int = 1,
                  progress: bool = False, activations: str = "auto", homes=None) -> list[dict]:
    """Convert every block's FFN of ``model`` with calibration windows ``calib`` ``[n, seqlen]``; returns a report
    per block (``seconds``, ``kmeans_seconds``, ``router`` fit info, ``mu_tokens``). Raises ConfigError first."""
    from tqdm.auto import tqdm

    device = torch.device(device)
    adapter, spec = check_model(model, cfg)
    t = time.perf_counter()
    splits = split_all(adapter, spec, cfg)
    kmeans_seconds = time.perf_counter() - t
    log.info("moe: %d blocks split into %d experts in %.1fs", len(splits), cfg.experts, kmeans_seconds)
    hidden = getattr(model.config, "hidden_size", None) or model.config.n_embd
    store = choose_store_device(2 * calib.numel() * hidden * torch.finfo(model.dtype).bits // 8, device, activations)
    stream = capture_block_inputs(model, adapter, calib, batch_size, device, store)
    rows = token_sample([tuple(b.shape[:2]) for b in stream.batches], cfg.router_tokens, cfg.seed)
    accelerator = {"cuda": "gpu", "cpu": "cpu"}.get(device.type, "auto")
    homes = homes or HostHome()
    reports = []
    for i in tqdm(range(len(adapter.blocks)), desc="moe routers", unit="block", disable=not progress):
        t = time.perf_counter()
        block = adapter.blocks[i]
        homes.fetch(i, block, device)
        ffn = ffn_module(block, spec)
        with FFNRecorder(ffn, spec, rows) as rec:
            advance(block, stream, device)
        mu = rec.mean.mean.to(device)
        assignment, centroids = (t_.to(device) for t_ in splits[i])
        x = torch.cat(rec.xs)
        s = expert_targets(torch.cat(rec.acts), mu, assignment, cfg.experts)
        mu_tokens = rec.mean.count
        del rec
        router, info = fit_router(centroids, x, s, cfg, accelerator)
        del x, s
        moe = MoEFFN(ffn, spec, assignment, mu, router.proj.weight.detach(), router.mix.weight.detach(), cfg.k,
                     cfg.variant, cfg.seed + i)
        replace_ffn(block, spec, moe)
        homes.release(i, block)
        reports.append({"index": i, "seconds": time.perf_counter() - t, "mu_tokens": mu_tokens,
                        "router_tokens": sum(r.numel() for r in rows), "router": info})
        log.info("moe block %d: router recall %.3f (init %.3f), %.1fs training", i, info["recall"],
                 info["recall_init"], info["seconds"])
    for r in reports:
        r["kmeans_seconds"] = kmeans_seconds / len(reports)
    return reports
