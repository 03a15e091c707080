"""The sequential driver: walk the decoder blocks, gather statistics, prune, feed the next block.

Each block runs with its own inputs (mask, rotary tables) as the model's own forward builds them
(``compressor.engine``: capture, streams, ``run_block``, ``advance``). Only the block being
processed sits on the compute device; activations stay there too when they fit, otherwise in
host memory. A dense stream can be carried beside the sparse one to
measure each block's normalized reconstruction error against the original model.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from compressor.config import PruningConfig, RuntimeConfig
from compressor.distributed import ProcessGroup, assign_owners, current, sparsegpt_cost
from compressor.engine import (  # noqa: F401 (the engine's names, re-exported for callers of this module)
    BlockKwargs,
    Stream,
    advance,
    block_output,
    capture_block_inputs,
    check_finite,
    choose_store_device,
    kwargs_for,
    run_block,
    stream_error,
)
from compressor.models.adapters import ModelAdapter, set_weight, weight_of
from compressor.pruning.masks import achieved_sparsity
from compressor.pruning.prune import needs_statistics, prune_shared
from compressor.pruning.sparsegpt import output_error
from compressor.pruning.statistics import BlockStatistics
from compressor.quant.int4 import QuantizationConfig, quantize_gptq, quantize_rtn, sparsegpt_gptq_shared
from compressor.reconstruction.fit import fit_window
from compressor.reconstruction.module import ReconstructionConfig, window_masks
from compressor.streaming import HostHome

log = logging.getLogger(__name__)


@dataclass
class BlockReport:
    """What happened to one block."""

    index: int
    seconds: float
    sparsity: dict[str, float] = field(default_factory=dict)
    layer_error: dict[str, float] = field(default_factory=dict)
    calib_error: float | None = None
    calib_rel_error: float | None = None
    heldout_error: float | None = None
    heldout_rel_error: float | None = None
    calib_error_pruned: float | None = None
    calib_rel_error_pruned: float | None = None
    training: list[dict] = field(default_factory=list)
    quant_error: dict[str, float] = field(default_factory=dict)
    shared_inputs: dict[str, list[str]] = field(default_factory=dict)
    phases: dict[str, float] = field(default_factory=dict)
    """Seconds of the block's work by phase (:meth:`SequentialPruner.timed`): statistics (forward passes
    gathering inputs' statistics), reduce, prune, share (several ranks: sums into owners, owners' work, broadcasts),
    train, quantize, forward (moving the streams on), measure (errors against the dense stream), check (ranks'
    identity check), checkpoint; what is left of ``seconds`` is bookkeeping."""


class SequentialPruner:
    """Prunes a model block by block (optionally reconstructing each block or window after pruning);
    ``run`` returns per-block reports, and ``masks`` holds the keep-masks by full layer name."""

    def __init__(self, model: nn.Module, pruning: PruningConfig, runtime: RuntimeConfig, device: torch.device,
                 sparsity_map: dict[str, float] | None = None, reconstruction: ReconstructionConfig | None = None,
                 log_dir: Path | None = None, accelerator: str = "auto",
                 quantization: QuantizationConfig | None = None, homes=None, keep_masks: bool = True,
                 group: ProcessGroup | None = None):
        self.model = model
        self.group = group or current()
        """The ranks walking the blocks together (``compressor.distributed``): each takes its share of the windows,
        statistics are reduced, each layer is pruned and quantized on its owner rank and broadcast."""
        self._layer_rank: dict[str, int] = {}  # full layer name -> the rank that pruned it (and holds its Hessian)
        self._group_seconds: dict[str, float] = {}
        """Seconds each group of layers sharing an input (by its first layer's name in the block) took on its owner
        in the last block: the owners of the next block are balanced by these (every rank learns them with the
        group's results), as the decoder's blocks have one shape; the first block goes by
        :func:`compressor.distributed.sparsegpt_cost`."""
        self.adapter = ModelAdapter(model)
        self.pruning = pruning
        self.runtime = runtime
        self.device = torch.device(device)
        self.sparsity_map = sparsity_map or {}
        self.recon = reconstruction or ReconstructionConfig()
        self.log_dir = log_dir
        self.accelerator = accelerator
        self.quant = quantization or QuantizationConfig()
        self.homes = homes or HostHome()
        """Where blocks live between their turns (compressor.streaming): host memory unless told otherwise."""
        self.keep_masks = keep_masks
        """False: a finished block's masks and quantized codes are dropped from ``masks`` and ``quantized`` (its
        zeros and its home's copy record them), so host memory does not grow with the model; cross-block
        windows need the masks, so they keep them."""
        if not keep_masks and self.recon.cross_block:
            raise ValueError("keep_masks=False is for runs without cross-block windows")
        if self.joint:
            q, p = self.quant, pruning
            if (p.blocksize, p.percdamp, p.act_order) != (q.blocksize, q.percdamp, q.act_order):
                log.warning("quantization.joint: pruning and quantization run as one sweep with quantization's "
                            "blocksize=%d, percdamp=%g, act_order=%s (pruning's %d, %g, %s are not used)",
                            q.blocksize, q.percdamp, q.act_order, p.blocksize, p.percdamp, p.act_order)
        self.masks: dict[str, torch.Tensor] = {}
        self.quantized: dict[str, torch.Tensor] = {}  # "<layer>.codes|scales|zeros" -> tensor (CPU)
        self._hessians: dict[int, dict[str, torch.Tensor]] = {}  # per block, kept until it is quantized

    def _stream_bytes(self, n_windows: int, seqlen: int) -> int:
        hidden = self.model.config.hidden_size if hasattr(self.model.config, "hidden_size") else self.model.config.n_embd
        elem = torch.finfo(self.model.dtype).bits // 8
        streams = 2 if (self.runtime.track_error or self.recon.enabled) else 1
        if self.recon.cross_block:
            streams *= 2  # the previous block's inputs are kept for the window
        return 2 * streams * n_windows * seqlen * hidden * elem  # inputs + outputs of one block

    def _block_masks(self, i: int, block: nn.Module, source: dict | None = None) -> dict[str, torch.Tensor]:
        prefix = f"{self.adapter.block_path}.{i}."
        source = self.masks if source is None else source
        return {k[len(prefix):]: v for k, v in source.items() if k.startswith(prefix)}

    def _quantize_block(self, i: int, block: nn.Module, report: BlockReport) -> None:
        """Quantize the kept weights of block ``i`` once they are final (after pruning and reconstruction)."""
        if not self.quant.enabled:
            return
        with self.timed(report, "quantize"):
            self._quantize_layers(i, block, report)

    def _quantize_layers(self, i: int, block: nn.Module, report: BlockReport) -> None:
        hessians = self._hessians.pop(i, {})
        q = self.quant
        for name, module in self.adapter.linears(block).items():
            full = f"{self.adapter.block_path}.{i}.{name}"
            if full not in self.masks or f"{full}.codes" in self.quantized:  # unpruned, or quantized when pruned
                continue
            src = self._layer_rank.get(full, 0)  # the rank holding its Hessian
            if src == self.group.rank:
                w, mask = weight_of(module).detach().float(), self.masks[full].to(self.device)
                if q.method == "gptq":
                    res = quantize_gptq(w, hessians[name], mask, q.bits, q.group_size, q.percdamp, q.blocksize,
                                        q.clip, q.act_order, symmetric=q.symmetric)
                else:
                    res = quantize_rtn(w, mask, q.bits, q.group_size, q.clip, symmetric=q.symmetric)
                if name in hessians:
                    report.quant_error[name] = output_error(w, res.dequantized, hessians[name])
                self._store_quantized(full, module, res)
            self._share_layers(i, {name: module}, src, report)

    def _fit(self, first: int, blocks: list[nn.Module], inputs: Stream, targets: list[torch.Tensor],
             report: BlockReport, progress: bool) -> None:
        masks = [self._block_masks(first + k, b) for k, b in enumerate(blocks)]
        masked = window_masks(blocks, masks, weight_of)
        name = "block_" + "-".join(f"{first + k:03d}" for k in range(len(blocks)))
        with self.timed(report, "train"):
            stats = fit_window(blocks, masked, inputs.kwargs, inputs.batches, targets, self.recon, name, self.log_dir,
                               self.accelerator, progress and self.group.is_main, self.runtime.deterministic,
                               self.group)
        report.training.append({"window": [first + k for k in range(len(blocks))], **stats})

    @torch.no_grad()
    def run(self, calib: torch.Tensor, heldout: torch.Tensor | None = None, progress: bool = True,
            on_block=None, recon_calib: torch.Tensor | None = None, checkpoints=None,
            finished: list[dict] | None = None) -> list[BlockReport]:
        """Prune every block. ``calib`` ``[n, seqlen]`` feeds the pruning statistics; ``recon_calib`` (default:
        ``calib``) is what reconstruction trains on and what calibration error is measured on; ``heldout``
        windows measure held-out error. ``finished`` (manifest entries of ``checkpoints``) are blocks done
        by an interrupted run: their weights are loaded and the streams replayed through them, not redone."""
        from tqdm.auto import tqdm

        recon = self.recon
        g = self.group
        calib, heldout, recon_calib = g.shard(calib), g.shard(heldout), g.shard(recon_calib)
        n_held = 0 if heldout is None else heldout.shape[0]
        n_rec = 0 if recon_calib is None else recon_calib.shape[0]
        store = choose_store_device(self._stream_bytes(calib.shape[0] + n_held + n_rec, calib.shape[1]),
                                    self.device, self.runtime.activations)
        log.info("activations on %s", store)
        bs = self.runtime.batch_size
        rbs = recon.batch_size if recon.enabled else bs
        prune_stream = capture_block_inputs(self.model, self.adapter, calib, bs, self.device, store)
        if recon_calib is None:
            rec = prune_stream if rbs == bs else capture_block_inputs(self.model, self.adapter, calib, rbs,
                                                                      self.device, store)
        else:
            rec = capture_block_inputs(self.model, self.adapter, recon_calib, rbs, self.device, store)
        held = (capture_block_inputs(self.model, self.adapter, heldout, bs, self.device, store)
                if heldout is not None else None)
        streams = [s for s in (prune_stream, rec, held) if s is not None]
        streams = list({id(s): s for s in streams}.values())
        need_dense = self.runtime.track_error or recon.global_target
        dense_rec = rec.clone() if need_dense else None
        dense_held = held.clone() if need_dense and held else None
        kind = needs_statistics(self.pruning.method)
        if self.quant.method == "gptq":
            kind = "gram"  # GPTQ needs the full Hessian whatever the pruning criterion
        reports: list[BlockReport] = []
        blocks = self.adapter.blocks
        prev: dict | None = None  # cross-block: the previous block's inputs and report
        label = f"{self.pruning.method} {self.pruning.label}" + (f" + {recon.mode}" if recon.enabled else "")
        bar = tqdm(range(len(blocks)), desc=f"compressing ({label})", unit="block", disable=not progress or not g.is_main)
        for i in bar:
            t0 = time.perf_counter()
            block = blocks[i]
            self.homes.fetch(i, block, self.device)
            report = BlockReport(index=i, seconds=0.0)
            if need_dense:
                with self.timed(report, "forward"):
                    dense_rec.batches = run_block(block, dense_rec, self.device)
                    if dense_held:
                        dense_held.batches = run_block(block, dense_held, self.device)
            restored = None
            if finished and recon.cross_block and i == len(finished) and "pending_report" in finished[-1]:
                restored = self._restore_pending(i, block, checkpoints, finished[-1])
                report = restored
            if finished and i < len(finished):  # done by an interrupted run: load, replay, move on
                masks, quantized = checkpoints.load(finished[i], block)
                for name, mask in masks.items():
                    self.masks[f"{self.adapter.block_path}.{i}.{name}"] = mask
                for name, t in quantized.items():
                    self.quantized[f"{self.adapter.block_path}.{i}.{name}"] = t
                for s in streams:
                    s.batches = run_block(block, s, self.device)
                self._release(i, block)
                reports.append(BlockReport(**finished[i]["report"]))
                continue
            br_target = None
            if recon.enabled and not recon.global_target:
                with self.timed(report, "forward"):
                    br_target = run_block(block, rec, self.device)
            if restored is None:
                self._prune_block(i, block, prune_stream, kind, report)
            if need_dense and restored is None:
                report.calib_error_pruned, report.calib_rel_error_pruned = stream_error(
                    dense_rec.batches, run_block(block, rec, self.device), self.device, g.all_reduce_sum)
            if recon.cross_block:
                prev = self._cross_block_step(i, block, streams, rec, dense_rec, held, dense_held,
                                              {"restored": True} if restored else prev, report, progress, on_block,
                                              checkpoints)
            else:
                if recon.enabled:
                    self._fit(i, [block], rec, br_target if br_target is not None else dense_rec.batches, report,
                              progress)
                self._quantize_block(i, block, report)
                with self.timed(report, "forward"):
                    for s in streams:
                        advance(block, s, self.device)
                check_finite(i, rec.batches)
                self._measure(report, rec, dense_rec, held, dense_held)
                self._check_ranks(i, block, report)
            if checkpoints is not None and not recon.cross_block:
                with self.timed(report, "checkpoint"):
                    if g.is_main:
                        checkpoints.save(i, block, self._block_masks(i, block), asdict(report),
                                         self._block_masks(i, block, self.quantized))
                    g.barrier()  # the block is marked done (manifest written) before any rank moves on
            self._release(i, block)
            self._synchronize()
            report.seconds = time.perf_counter() - t0
            reports.append(report)
            if report.calib_rel_error is not None:
                bar.set_postfix(rel_err=f"{report.calib_rel_error:.4f}")
            if on_block is not None and not recon.cross_block:
                on_block(report)
        bar.close()
        return reports

    def _check_ranks(self, i: int, block: nn.Module, report: BlockReport) -> None:
        """Several ranks: stop the run unless every rank holds block ``i``'s weights and masks bit for bit."""
        with self.timed(report, "check"):
            self.group.check_identical({**{f"weight {k}": v for k, v in block.state_dict().items()},
                                        **{f"mask {k}": v for k, v in self._block_masks(i, block).items()}},
                                       f"block {i}")

    @contextlib.contextmanager
    def timed(self, report: BlockReport, phase: str):
        """Add the body's seconds to ``report.phases[phase]`` (the GPU synchronized at both ends, so queued work is
        counted where it was queued)."""
        self._synchronize()
        t = time.perf_counter()
        try:
            yield
        finally:
            self._synchronize()
            report.phases[phase] = report.phases.get(phase, 0.0) + time.perf_counter() - t

    def _synchronize(self) -> None:
        """Wait for the GPU's queued work (nothing to wait for elsewhere), so that a clock reading counts it."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _release(self, i: int, block: nn.Module) -> None:
        """Block ``i``'s turn is over (it is final, or with cross-block windows waits for the next window): back to
        its home, its masks into host memory (they stay on the device while the block is worked on: shared, checked
        and checkpointed from there), and without ``keep_masks`` out of memory."""
        self.homes.release(i, block)
        if not self.keep_masks:
            for source in (self.masks, self.quantized):
                for name in self._block_masks(i, block, source):
                    del source[f"{self.adapter.block_path}.{i}.{name}"]
        self._masks_to_host(i, block)

    def _masks_to_host(self, i: int, block: nn.Module) -> None:
        """Block ``i``'s masks into host memory (a no-op for those already there)."""
        for name, mask in self._block_masks(i, block).items():
            self.masks[f"{self.adapter.block_path}.{i}.{name}"] = mask.cpu()

    def _measure(self, report: BlockReport, rec, dense_rec, held, dense_held) -> None:
        if dense_rec is None:
            return
        with self.timed(report, "measure"):
            self._measure_errors(report, rec, dense_rec, held, dense_held)

    def _measure_errors(self, report: BlockReport, rec, dense_rec, held, dense_held) -> None:
        reduce = self.group.all_reduce_sum
        report.calib_error, report.calib_rel_error = stream_error(dense_rec.batches, rec.batches, self.device, reduce)
        if dense_held:
            report.heldout_error, report.heldout_rel_error = stream_error(dense_held.batches, held.batches,
                                                                          self.device, reduce)

    def _restore_pending(self, i: int, block: nn.Module, checkpoints, entry: dict) -> BlockReport:
        """Cross-block resume: block ``i`` as it was after the window it shared with block ``i - 1``."""
        state, masks, hessians, report = checkpoints.load_pending(entry)
        block.load_state_dict(state, strict=True)
        for name, mask in masks.items():
            self.masks[f"{self.adapter.block_path}.{i}.{name}"] = mask
        if hessians:
            moved = {}  # layers sharing one input share one Hessian: move each tensor once
            self._hessians[i] = {n: moved.setdefault(id(h), h.to(self.device)) for n, h in hessians.items()}
        return BlockReport(**report)

    def _cross_block_step(self, i, block, streams, rec, dense_rec, held, dense_held, prev, report, progress, on_block,
                          checkpoints=None):
        """CR: windows (0), (0,1), (1,2), ..., (L-2,L-1), (L-1); only the first block's output moves on.

        Block ``i - 1`` is final once window (i-1, i) is trained: it is checkpointed then, together with block
        ``i`` as trained so far (``pending``). ``prev == {"restored": True}``: block ``i`` was restored from such a
        checkpoint, so window (i-1, i) is already done."""
        blocks = self.adapter.blocks
        last = i == len(blocks) - 1
        if prev is None:  # block 0 alone
            inputs = {id(s): list(s.batches) for s in streams}
            self._fit(i, [block], rec, dense_rec.batches, report, progress)
        elif not prev.get("restored"):
            prev_block = blocks[i - 1]
            self.homes.fetch(i - 1, prev_block, self.device)
            inputs = prev["inputs"]
            window_in = Stream(inputs[id(rec)], rec.kwargs)
            self._fit(i - 1, [prev_block, block], window_in, dense_rec.batches, report, progress)
            self._quantize_block(i - 1, prev_block, prev["report"])
            # carry the first block's output forward, and finalize its error
            for s in streams:
                s.batches = run_block(prev_block, Stream(inputs[id(s)], s.kwargs), self.device)
            self._measure(prev["report"], rec, prev["dense_rec"], held, prev["dense_held"])
            self._check_ranks(i - 1, prev_block, prev["report"])
            if on_block is not None:
                on_block(prev["report"])
            if checkpoints is not None:
                check_finite(i - 1, rec.batches)
                pending = {"block": block, "masks": self._block_masks(i, block), "report": asdict(report),
                           "hessians": self._hessians.get(i, {})}
                if self.group.is_main:
                    checkpoints.save(i - 1, prev_block, self._block_masks(i - 1, prev_block),
                                     asdict(prev["report"]), self._block_masks(i - 1, prev_block, self.quantized),
                                     pending)
                self.group.barrier()
            self.homes.release(i - 1, prev_block)
            # its masks went to the host when it was released after its own turn; quantizing it above put them back
            # on the device (the quantizer's, or another rank's broadcast)
            self._masks_to_host(i - 1, prev_block)
        if prev is not None:
            inputs = {id(s): list(s.batches) for s in streams}
            if last:  # the last block alone
                self._fit(i, [block], rec, dense_rec.batches, report, progress)
        if last:
            self._quantize_block(i, block, report)
        for s in streams:
            s.batches = run_block(block, s, self.device)
        if last:
            self._measure(report, rec, dense_rec, held, dense_held)
            self._check_ranks(i, block, report)
            check_finite(i, rec.batches)
            if on_block is not None:
                on_block(report)
            if checkpoints is not None:
                if self.group.is_main:
                    checkpoints.save(i, block, self._block_masks(i, block), asdict(report),
                                     self._block_masks(i, block, self.quantized))
                self.group.barrier()
        return {"inputs": inputs, "report": report,
                "dense_rec": Stream(list(dense_rec.batches), dense_rec.kwargs),
                "dense_held": Stream(list(dense_held.batches), dense_held.kwargs) if dense_held else None}

    def _prune_block(self, i: int, block: nn.Module, sparse: Stream, kind: str | None, report: BlockReport) -> None:
        linears = self.adapter.linears(block)
        targets = {n: m for n, m in linears.items() if not any(n.endswith(s) for s in self.pruning.skip)}
        for name in linears:
            if name not in targets:
                report.sparsity[name] = achieved_sparsity(weight_of(linears[name]) != 0)
        if kind is None:
            self._prune_layers(i, targets, None, report)
            return
        if not self.pruning.sequential_within_block:
            with self.timed(report, "statistics"), BlockStatistics(targets, gram=(kind == "gram")) as stats:
                run_block(block, sparse, self.device, on_batch=stats.end_batch, keep=False)
            report.shared_inputs = stats.groups()
            self._prune_layers(i, targets, stats, report)
            return
        # discover the groups sharing an input on one batch, then prune them in forward order
        with BlockStatistics(targets, gram=False) as probe:
            run_block(block, Stream(sparse.batches[:1], sparse.kwargs), self.device, on_batch=probe.end_batch,
                      keep=False)
        report.shared_inputs = probe.groups()
        for group in report.shared_inputs.values():
            members = {n: targets[n] for n in group}
            with self.timed(report, "statistics"), BlockStatistics(members, gram=(kind == "gram")) as stats:
                run_block(block, sparse, self.device, on_batch=stats.end_batch, keep=False)
            self._prune_layers(i, members, stats, report)

    def _prune_layers(self, i: int, layers: dict[str, nn.Module], stats: BlockStatistics | None,
                      report: BlockReport) -> None:
        """Prune ``layers`` of block ``i``; layers reading one input are pruned together (one Hessian tensor,
        and for SparseGPT one factorization and one stacked sweep). With several ranks each such group is pruned
        on an owner rank (balanced by :func:`compressor.distributed.sparsegpt_cost`), its statistics reduced into
        that rank first and its results broadcast after."""
        groups: dict[str, list[str]] = {}
        for name in layers:
            groups.setdefault(stats.owner[name] if stats is not None else name, []).append(name)
        g = self.group
        ranks = dict.fromkeys(groups, g.rank)
        if g.distributed:
            ranks = assign_owners(self._group_costs(groups, layers), g.world_size)
            with self.timed(report, "reduce"):
                for owner in groups:
                    if stats is not None:
                        g.reduce_statistics(stats.of(owner), ranks[owner])
        seconds = {}
        with self.timed(report, "prune"):
            for owner, names in groups.items():
                for n in names:
                    self._layer_rank[f"{self.adapter.block_path}.{i}.{n}"] = ranks[owner]
                if ranks[owner] == g.rank:
                    t = time.perf_counter()
                    self._prune_group(i, {n: layers[n] for n in names}, stats, owner, report)
                    if g.distributed:  # the next block's owners are balanced by these seconds
                        self._synchronize()
                        seconds[owner] = time.perf_counter() - t
        with self.timed(report, "share"):
            for owner, names in groups.items():
                took = self._share_layers(i, {n: layers[n] for n in names}, ranks[owner], report, seconds.get(owner))
                if took is not None:
                    self._group_seconds[owner] = took

    def _group_costs(self, groups: dict[str, list[str]], layers: dict[str, nn.Module]) -> dict[str, float]:
        """The work of pruning each group, to balance owners: its seconds in the last block when every group has one
        (all ranks hold the same figures), else :func:`compressor.distributed.sparsegpt_cost` of its weights. With
        ``runtime.deterministic`` always the estimate: owners that follow timing noise would move each statistic's
        reduce to another root from run to run, and on three or more ranks the sum's order with it."""
        if not self.runtime.deterministic and all(o in self._group_seconds for o in groups):
            return {o: self._group_seconds[o] for o in groups}
        return {o: sum(sparsegpt_cost(*weight_of(layers[n]).shape) for n in names) for o, names in groups.items()}

    def _prune_group(self, i: int, layers: dict[str, nn.Module], stats: BlockStatistics | None, owner: str,
                     report: BlockReport) -> None:
        """Prune layers of block ``i`` that read one input (``owner``'s accumulator in ``stats``)."""
        names = list(layers)
        fulls = [f"{self.adapter.block_path}.{i}.{n}" for n in names]
        weights = [weight_of(layers[n]) for n in names]
        hessian = stats.of(owner).take_hessian() if stats is not None and stats.gram else None
        sparsities = [self.sparsity_map.get(f) for f in fulls]
        if hessian is not None and self.joint:
            self._prune_quantize(layers, fulls, hessian, sparsities, report)
            return
        results = prune_shared(weights, stats.of(owner) if stats else None, self.pruning, sparsities, hessian)
        for name, full, w, (new_w, mask) in zip(names, fulls, weights, results):
            if hessian is not None:
                report.layer_error[name] = output_error(w, new_w, hessian)
                if self.quant.method == "gptq":
                    self._hessians.setdefault(i, {})[name] = hessian
            set_weight(layers[name], new_w)
            self.masks[full] = mask  # on the device until the block is released (shared and checked there)
            report.sparsity[name] = achieved_sparsity(mask)

    def _share_layers(self, i: int, layers: dict[str, nn.Module], src: int, report: BlockReport,
                      seconds: float | None = None) -> float | None:
        """Several ranks: rank ``src``'s results for ``layers`` of block ``i`` (weights, masks, quantized parts and
        their report entries) copied into every other rank; returns ``seconds`` as rank ``src`` gave it (the time
        its work took), on every rank."""
        g = self.group
        if not g.distributed:
            return seconds
        prefix = f"{self.adapter.block_path}.{i}."
        payload = meta = None
        if g.rank == src:
            payload = {}
            for n, m in layers.items():
                full = prefix + n
                payload[f"w.{n}"] = weight_of(m).detach()
                if full in self.masks:
                    payload[f"m.{n}"] = self.masks[full]
                for part in ("codes", "scales", "zeros"):
                    if f"{full}.{part}" in self.quantized:
                        payload[f"q.{n}.{part}"] = self.quantized[f"{full}.{part}"]
            meta = {f: {n: v for n, v in getattr(report, f).items() if n in layers}
                    for f in ("sparsity", "layer_error", "quant_error")}
            meta["seconds"] = seconds
        tensors, meta = g.broadcast_tensors(payload, src, meta)
        seconds = meta.pop("seconds")
        if g.rank == src:
            return seconds
        for key, t in tensors.items():
            kind, rest = key.split(".", 1)
            if kind == "w":
                set_weight(layers[rest], t)
            elif kind == "m":
                self.masks[prefix + rest] = t  # on the device, as the owner's (see _release)
            else:
                self.quantized[prefix + rest] = t.cpu()
        for f, values in meta.items():
            getattr(report, f).update(values)
        return seconds

    @property
    def joint(self) -> bool:
        """Whether SparseGPT and GPTQ run as one sweep (quantization.joint; only when nothing changes the weights
        between the two: no reconstruction)."""
        q = self.quant
        return (q.method == "gptq" and q.joint and self.pruning.method == "sparsegpt" and self.pruning.nm is None
                and not self.recon.enabled)

    def _prune_quantize(self, layers: dict[str, nn.Module], fulls: list[str], hessian: torch.Tensor,
                        sparsities: list[float | None], report: BlockReport) -> None:
        """Joint mode: prune and quantize layers reading one input in one sweep (compressor.quant.int4)."""
        s = [self.pruning.sparsity if x is None else x for x in sparsities]
        weights = [weight_of(m) for m in layers.values()]
        results = sparsegpt_gptq_shared(weights, hessian, s, self.quant)
        for name, w, full, res in zip(layers, weights, fulls, results):
            report.layer_error[name] = output_error(w, res.dequantized, hessian)
            report.sparsity[name] = achieved_sparsity(res.mask)
            self._store_quantized(full, layers[name], res)

    def _store_quantized(self, full: str, module: nn.Module, res) -> None:
        """A quantized layer: its dequantized weight in the model, its mask (when set) and packed parts kept."""
        set_weight(module, res.dequantized)
        if res.mask is not None:
            self.masks[full] = res.mask  # on the device until the block's turn is over, as pruning's (_release)
        for part in ("codes", "scales", "zeros"):
            self.quantized[f"{full}.{part}"] = getattr(res, part).cpu()
