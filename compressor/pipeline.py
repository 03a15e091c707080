"""Orchestration of one compression run: check, load, calibrate, measure, run the stages, measure, save, report.

The stages themselves (pruning, MoE conversion, CushionCache prefix, W8A8 activations) live in
``compressor.stages``; this module loads the model and data once, measures the dense model once, runs the
configured stages in the project's order, then measures, saves and reports once."""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import resource
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from compressor import distributed, zeroshot
from compressor.accelerators import accelerator_for, reset_peak_gpu_memory
from compressor.checkpoint import BlockCheckpoints, config_changes, tensor_fingerprint
from compressor.config import (
    GENERATED,
    CalibrationConfig,
    ConfigError,
    EvaluationConfig,
    ModelConfig,
    OutputConfig,
    PruningConfig,
    RuntimeConfig,
)
from compressor.cushion.config import CushionConfig
from compressor.data.calibration import calibration_windows, evaluation_windows
from compressor.data.text import window_bos
from compressor.evaluation import perplexity
from compressor.export import check_export, export_w4a16, export_w8a8, w8a8_state_layers
from compressor.io import atomic_write_dir, atomic_write_json, folder_bytes, writable_dir
from compressor.models.adapters import ModelAdapter, check_supported, max_context, weight_of
from compressor.models.checks import check_layer_shapes
from compressor.models.identity import model_identity
from compressor.models.loading import check_tokenizer_present, load_config, load_model
from compressor.moe.config import MoEConfig
from compressor.quant.activations import ActivationQuantConfig
from compressor.quant.int4 import QuantizationConfig
from compressor.reconstruction.module import ReconstructionConfig
from compressor.report import print_summary
from compressor.runlog import RunLog
from compressor.schedule.allocate import ScheduleConfig
from compressor.schedule.schedule import Schedule, schedule_table
from compressor.stages import RunContext, stages
from compressor.stages.prune import make_schedule

log = logging.getLogger("compressor")


@dataclass
class RunSettings:
    """Everything one run needs; the CLI assembles it from the config groups."""

    model: ModelConfig = field(default_factory=ModelConfig)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    reconstruction: ReconstructionConfig = field(default_factory=ReconstructionConfig)
    recon_calibration: CalibrationConfig | None = None
    """Calibration for reconstruction training (the paper uses 256 x 1024); None: the pruning windows."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    """FFNs into mixtures of experts (G-MoEfication), after pruning (model.moe)."""
    cushion: CushionConfig = field(default_factory=CushionConfig)
    """CushionCache prefix, after pruning and MoE, before W8A8 (model.cushion)."""
    activations: ActivationQuantConfig = field(default_factory=ActivationQuantConfig)
    """W8A8 activation quantization, the last stage (model.activations)."""


def preflight(settings: RunSettings):
    """Every check that needs no weights: family, tokenizer files, every layer's shape against the settings
    (on the meta device), context length, output folder. Returns the model config."""
    settings.schedule.check(settings.pruning.target_sparsity, settings.pruning.nm)
    if settings.quantization.enabled and settings.activations.enabled and settings.activations.weight_bits:
        raise ConfigError(f"model.activations.weight_bits={settings.activations.weight_bits} would quantize the "
                          f"{settings.quantization.bits}-bit weights of quantization.method="
                          f"{settings.quantization.method!r} again: set model.activations.weight_bits=0 to keep "
                          "them (W4A8), or quantization.method=none")
    config = load_config(settings.model)
    check_supported(config.model_type)
    check_tokenizer_present(settings.model)
    check_layer_shapes(config, settings.pruning, settings.model.trust_remote_code)
    if settings.moe.enabled:
        from compressor.models.adapters import BLOCK_PATHS
        from compressor.moe.config import check_width
        from compressor.moe.ffn import config_ffn_width, ffn_spec

        spec = ffn_spec(config.model_type)
        width = config_ffn_width(config)  # declared width; run_moe checks every block's real one again
        if width:
            check_width(f"{BLOCK_PATHS[config.model_type]}.*.{spec.path}.{spec.down}", width, settings.moe.experts)
    limit = max_context(config)
    eval_seqlen = settings.evaluation.seqlen or settings.calibration.seqlen
    checks = [("calibration.seqlen", settings.calibration.seqlen), ("evaluation.seqlen", eval_seqlen)]
    if settings.recon_calibration is not None:
        checks.append(("recon_calibration.seqlen", settings.recon_calibration.seqlen))
    for name, value in checks:
        if limit is not None and value > limit:
            raise ConfigError(f"{name}={value} is above the model's context of {limit} tokens: use at most {limit}")
    if settings.cushion.enabled and settings.cushion.text_len > settings.calibration.seqlen:
        raise ConfigError(f"model.cushion.text_len={settings.cushion.text_len} is longer than the calibration windows "
                          f"(data.calibration.seqlen={settings.calibration.seqlen}): set model.cushion.text_len to at "
                          f"most {settings.calibration.seqlen} or data.calibration.seqlen to at least "
                          f"{settings.cushion.text_len}")
    check_export(settings.output, settings.quantization, config.model_type, settings.activations)
    writable_dir(settings.output.dir, "output.dir")
    return config


def check_disk_space(model, output: OutputConfig, out: Path, cross_block: bool = False,
                     quantized: bool = False, w8a8: bool = False) -> int:
    """Refuse to start when the output folder's disk cannot hold model, masks and block checkpoints.

    ``quantized`` (GPTQ/RTN): checkpoints hold a byte of code per linear weight and ``quantized.safetensors`` the
    packed codes and mask (under 0.7 byte per weight). ``cross_block``: checkpoints also hold in-window states, up to
    three at once while the newest replaces the oldest (a block's weights, masks and, when quantized, the fp32 GPTQ
    Hessians of its layers' inputs, counted once per layer: an upper bound). ``w8a8``: a byte per linear weight
    in ``activations.safetensors`` and again in its stage checkpoint."""
    adapter = ModelAdapter(model)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    linear = sum(weight_of(m).numel() for _, m in adapter.iter_linears())
    need = (weights if output.save_model else 0) + (linear if output.save_masks else 0)
    if quantized:
        need += int(0.7 * linear)
    if w8a8:
        need += 2 * linear
    if output.checkpoint:
        need += weights + linear + (linear if quantized else 0)  # the blocks' weights, masks and codes again
        if cross_block:
            def pending(block) -> int:
                layers = [weight_of(m) for m in adapter.linears(block).values()]
                return (sum(p.numel() * p.element_size() for p in block.parameters()) + sum(w.numel() for w in layers)
                        + (sum(4 * w.shape[1] ** 2 for w in layers) if quantized else 0))

            need += 3 * max(pending(b) for b in adapter.blocks)
    free = shutil.disk_usage(out).free
    if need > free:
        raise ConfigError(f"output.dir={str(out)!r} has {free / 1e9:.2f} GB free; the outputs need about "
                          f"{need / 1e9:.2f} GB (model, masks, checkpoints): free space or choose another output.dir")
    return need


def say(message: str) -> None:
    """A line for the console and the run's log (rank 0's only, in a multi-process run)."""
    if not distributed.current().is_main:
        return
    print(message, flush=True)
    log.info(message)


def finished_run(settings: RunSettings, out: Path) -> dict | None:
    """The report of a finished run in ``out`` with the same settings (output aside), or None when there is none.

    Raises ConfigError naming what differs when ``out`` holds a finished run of other settings and neither
    ``output.overwrite`` nor ``output.start_over`` allows replacing it."""
    path = out / "report.json"
    if not path.is_file():
        return None
    try:
        old = json.loads(path.read_text()).get("settings") or {}
    except (OSError, ValueError):
        return None  # not one of our reports: nothing to compare with (overwrite still decides)
    new = asdict(settings)
    old.pop("output", None)
    new.pop("output", None)
    changes = config_changes(old, new, settings)  # a setting added since that report, left at its default, is no change
    if changes and not (settings.output.overwrite or settings.output.start_over):
        raise ConfigError(f"output.dir={str(out)!r} holds a finished run of other settings ({'; '.join(changes[:5])}"
                          f"{'; ...' if len(changes) > 5 else ''}): set output.overwrite=true to replace it, or "
                          "choose another output.dir")
    return None if changes else json.loads(path.read_text())


def redo_scope(out: Path) -> str:
    """What rerunning a finished run in ``out`` will redo: its checkpoints (if kept) spare the pruning."""
    try:
        done = json.loads((out / "checkpoints" / "manifest.json").read_text())["blocks_done"]
    except (OSError, ValueError, KeyError):
        return "compression from the start (its checkpoints were removed)"
    return f"evaluation and saving only: its {done} checkpointed blocks are loaded"


def dense_counts(model, adapter: ModelAdapter) -> dict:
    """What the source model holds before compression: parameters, nonzeros, and zeros per linear (by full name)."""
    total, nonzero = parameter_counts(model)
    zeros = {f"{adapter.block_path}.{i}.{n}": int((weight_of(m) == 0).sum())
             for i, block in enumerate(adapter.blocks) for n, m in adapter.linears(block).items()}
    return {"parameters": total, "nonzero": nonzero, "linear_zeros": zeros}


def checkpoints_summary(output: OutputConfig, out: Path) -> dict | None:
    """A finished run's checkpoint folder, its size and whether it is kept (None when there is none)."""
    folder = out / "checkpoints"
    if not folder.is_dir():
        return None
    return {"dir": str(folder), "bytes": folder_bytes(folder), "kept": output.keep_checkpoints}


def tidy_checkpoints(summary: dict | None) -> None:
    """Remove a finished run's checkpoints unless they are to be kept; say so, with their size, either way."""
    if summary is None:
        return
    size = f"{summary['bytes'] / 1e6:.0f} MB"
    if summary["kept"]:
        say(f"checkpoints kept in {summary['dir']} ({size}): a rerun with output.overwrite=true loads them "
            "instead of redoing the stages; delete the folder when done")
    else:
        shutil.rmtree(summary["dir"], ignore_errors=True)
        say(f"checkpoints removed ({size} freed; output.keep_checkpoints=true keeps them)")


def peak_memory(device: torch.device) -> dict:
    gpu = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux
    return {"gpu_gb": gpu, "host_gb": host}


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "hpu":
        return "Intel Gaudi (HPU)"
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"


def parameter_counts(model) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    nonzero = sum(int((p != 0).sum()) for p in model.parameters())
    return total, nonzero


def bos_used(tokenizer, mode: str) -> dict:
    """What the report records of a ``bos`` setting: the setting and the token each window starts with (None: none
    added, the windows are cut from the text as tokenized)."""
    return {"setting": mode, "token_id": window_bos(tokenizer, mode)}


def corpus_label(name: str) -> str:
    """How a corpus is named on the console: 'held-out generated text' or the file name."""
    return "held-out generated text" if name == GENERATED else (Path(name).name or name)



def eval_corpora(settings: RunSettings, model, tokenizer, device, model_key: str) -> dict[str, torch.Tensor]:
    """Evaluation windows per corpus; ``model_key``: the model's fingerprint (keys the generated-text cache)."""
    ev = settings.evaluation
    seqlen = ev.seqlen or settings.calibration.seqlen
    return {
        src: evaluation_windows(src, seqlen, tokenizer, model, model_key, ev.max_windows,
                                ev.generated_samples, settings.calibration.generation, settings.calibration.seed,
                                device, settings.calibration.text_field, ev.bos)
        for src in ev.datasets
    }


def compress(settings: RunSettings, device: str | torch.device = "cpu", progress: bool = True,
             model_and_tokenizer=None) -> dict:
    """Run the whole compression; returns the report (also written to ``output.dir/report.json``).

    Loads the model and prepares the data once, measures the dense model once, runs the configured stages in the
    project's order (``compressor.stages``), then measures, saves and reports once. A finished run of the same
    settings in ``output.dir`` is not redone unless ``output.overwrite`` (or ``start_over``): its report is returned.
    Ctrl-C raises ``RunInterrupted`` (a KeyboardInterrupt) saying how many blocks are checkpointed; ``compress.log``
    records every run's outcome."""
    device = torch.device(device)
    started = time.perf_counter()
    out = Path(settings.output.dir)
    group = distributed.current()  # several ranks: each walks its share of the windows, rank 0 writes
    distributed.check_settings(settings, group)
    progress = progress and group.is_main
    config = preflight(settings)
    previous = None if settings.schedule.dry_run else finished_run(settings, out)  # a dry run writes no report
    run = RunLog(out / "compress.log" if group.is_main else Path(os.devnull), checkpointing=settings.output.checkpoint)
    if previous is not None and not (settings.output.overwrite or settings.output.start_over):
        changed = finished_inputs_change(settings, config, previous, device, model_and_tokenizer)
        if changed:
            exc = ConfigError(f"output.dir={str(out)!r} holds a finished run of {changed}: set output.overwrite=true "
                              "to replace it, or choose another output.dir")
            run.failed(exc)
            run.close()
            raise exc
        say(f"{out} already holds this run, finished {previous.get('date', '')}: nothing done. "
            f"output.overwrite=true redoes it ({redo_scope(out)})")
        run.finished("already complete: nothing done")
        run.close()
        return previous
    if previous is not None:
        flag = "output.overwrite=true" if settings.output.overwrite else "output.start_over=true"
        scope = "compression from the start" if settings.output.start_over else redo_scope(out)
        say(f"{out} holds this run, finished {previous.get('date', '')}: {flag} redoes {scope}")
    reset_peak_gpu_memory(device)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    if settings.runtime.deterministic:
        # cuBLAS reads this when its handle is created: set it before the first GPU matmul of the process
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    try:
        todo = [stage for stage in stages() if stage.enabled(settings)]
        log.info("compressing %s on %s: stages %s", settings.model.name_or_path, device,
                 ", ".join(stage.name for stage in todo) or "none")
        ctx = prepare(settings, config, device, out, progress, run, model_and_tokenizer)
        if "prune" not in [stage.name for stage in todo]:
            run.blocks_total = None  # nothing is checkpointed block by block
        if settings.schedule.dry_run:
            schedule = make_schedule(settings, ctx.model, ctx.calib, device, out, progress)
            report = dry_run_report(settings, schedule, ctx.timings, device, out) if group.is_main else {}
            run.finished("dry run")
            return report
        ppl_dense, zs_dense = {}, None
        if settings.evaluation.dense_baseline:
            ppl_dense, zs_dense = measure(ctx, "dense")
        report: dict = {}
        for stage in todo:
            t = time.perf_counter()
            report.update(stage.run(ctx))
            ctx.timings[stage.name] = time.perf_counter() - t
        ppl, zs = measure(ctx, "compressed")
        report = run_header(settings, ctx, [stage.name for stage in todo]) | report
        report["perplexity"] = {"dense": ppl_dense, "compressed": ppl,
                                "bos": bos_used(ctx.tokenizer, settings.evaluation.bos),
                                "windows": {k: list(v.shape) for k, v in ctx.corpora.items()}}
        report["zeroshot"] = zeroshot.section(settings.evaluation, dense=zs_dense, compressed=zs)
        report["peak_memory"] = peak_memory(device)
        if group.distributed:
            report["ranks"] = group.world_size
        if not group.is_main:  # rank 0 writes (no barrier after: saving a large model can outlast a collective's
            return report     # timeout; torchrun waits for every process anyway)
        t = time.perf_counter()
        save_outputs(report, ctx, todo)
        ctx.timings["save"] = time.perf_counter() - t
        ctx.timings["total"] = time.perf_counter() - started
        report["timings"] = ctx.timings
        report["checkpoints"] = checkpoints_summary(settings.output, out)
        atomic_write_json(out / "report.json", report)
        print_summary(report)
        log.info("report written to %s", out / "report.json")
        tidy_checkpoints(report["checkpoints"])
        run.finished()
        return report
    except KeyboardInterrupt:
        raise run.interrupted() from None
    except BaseException as exc:
        run.failed(exc)
        raise
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        run.close()


def run_windows(settings: RunSettings, model, tokenizer, identity: dict, device: torch.device, evaluation: bool = True):
    """``(calibration, reconstruction calibration or None, evaluation windows by corpus or None)`` of a run: its text
    tokenized, or generated by the model (cached under ``identity``'s fingerprint; the model goes to ``device``)."""
    rc = settings.recon_calibration
    if any(GENERATED in s for s in (settings.calibration.sources, settings.evaluation.datasets if evaluation else [],
                                     rc.sources if rc else [])):
        model.to(device)
    with distributed.current().main_first():  # generated text: rank 0 writes the cache, the others read it
        calib = calibration_windows(settings.calibration, model, tokenizer, identity["fingerprint"], device)
        recon_calib = None
        if rc is not None and settings.reconstruction.enabled:
            recon_calib = calibration_windows(rc, model, tokenizer, identity["fingerprint"], device)
        corpora = eval_corpora(settings, model, tokenizer, device, identity["fingerprint"]) if evaluation else None
    return calib, recon_calib, corpora


def finished_inputs_change(settings: RunSettings, config, previous: dict, device: torch.device,
                           model_and_tokenizer=None) -> str | None:
    """What a finished run (``previous``, its report) was made from that this run's inputs are not: the model's
    weights (its fingerprint, ``compressor.models.identity``) and the calibration windows (theirs), so that a model
    or a calibration file changed in place is not taken for the same run because its path is. None when both are
    the same, or the report recorded no fingerprint. Loads the model (and tokenizes the calibration text)."""
    model, tokenizer = model_and_tokenizer or load_model(settings.model, config)
    identity = model_identity(model, tokenizer)
    old = (previous.get("model") or {}).get("fingerprint")
    if old is not None and old != identity["fingerprint"]:
        return (f"another model: the weights at model.name_or_path={settings.model.name_or_path!r} changed since "
                f"(fingerprint {old} -> {identity['fingerprint']})")
    old = (previous.get("calibration") or {}).get("fingerprint")
    if old is not None:
        calib, recon_calib, _ = run_windows(settings, model, tokenizer, identity, device, evaluation=False)
        new = tensor_fingerprint(calib, recon_calib)
        if new != old:
            return f"other calibration windows: the calibration text changed since (fingerprint {old} -> {new})"
    return None


def prepare(settings: RunSettings, config, device: torch.device, out: Path, progress: bool, run: RunLog,
            model_and_tokenizer=None) -> RunContext:
    """Load the model, check the disk, make the calibration and evaluation windows, open the checkpoints."""
    timings: dict[str, float] = {}
    t = time.perf_counter()
    model, tokenizer = model_and_tokenizer or load_model(settings.model, config)
    adapter = ModelAdapter(model)
    identity = model_identity(model, tokenizer)
    log.info("model weights in %s, fingerprint %s", identity["dtype"], identity["fingerprint"])
    run.blocks_total = len(adapter.blocks)
    dense = dense_counts(model, adapter)
    timings["load"] = time.perf_counter() - t
    check_disk_space(model, settings.output, out, settings.reconstruction.cross_block, settings.quantization.enabled,
                     settings.activations.enabled and settings.activations.weight_bits > 0)
    t = time.perf_counter()
    calib, recon_calib, corpora = run_windows(settings, model, tokenizer, identity, device)
    timings["data"] = time.perf_counter() - t
    ctx = RunContext(settings, model, tokenizer, device, accelerator_for(device), out, calib, recon_calib, corpora,
                     progress=progress, timings=timings, identity=identity, dense=dense)
    if settings.output.checkpoint and not settings.schedule.dry_run:
        ctx.checkpoints = BlockCheckpoints(out / "checkpoints", settings, tensor_fingerprint(calib, recon_calib),
                                           model_identity=identity)
        run.checkpoints = ctx.checkpoints
        ctx.finished = ctx.checkpoints.resume(settings.output.start_over)
        if ctx.finished:
            say(f"resuming: {len(ctx.finished)} of {len(adapter.blocks)} blocks done (checkpoints in "
                f"{out / 'checkpoints'})")
        distributed.current().barrier()  # every rank has read the manifest before rank 0 writes it again
    return ctx


def measure(ctx: RunContext, label: str) -> tuple[dict[str, float], dict | None]:
    """Perplexity on every evaluation corpus and the zero-shot tasks of the model as it stands ('dense' before the
    stages, 'compressed' after: behind the cushion prefix when there is one); timed as ``dense_eval``/``eval``."""
    t = time.perf_counter()
    prefix = ctx.prefix if label != "dense" else None
    ppl = {}
    for name, windows in ctx.corpora.items():
        ppl[name] = perplexity(ctx.model, windows, ctx.device, progress=ctx.progress, prefix=prefix,
                               desc=f"perplexity of the {label} model on {corpus_label(name)}")
        log.info("%s perplexity on %s: %.3f", label, name, ppl[name])
    zs = zeroshot.measure(ctx.settings.evaluation, ctx.model, ctx.tokenizer, ctx.device, label, prefix=prefix)
    ctx.timings["dense_eval" if label == "dense" else "eval"] = time.perf_counter() - t
    return ppl, zs


def run_header(settings: RunSettings, ctx: RunContext, stage_names: list[str]) -> dict:
    """The report's sections every run has: tool, machine, settings, model, stages, calibration."""
    total, nonzero = parameter_counts(ctx.model)
    calib, recon_calib, identity = ctx.calib, ctx.recon_calib, ctx.identity
    adapter = ModelAdapter(ctx.model)
    return {
        "tool": "compressor",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "machine": machine_name(ctx.device),
        "device": str(ctx.device),
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                     "python": platform.python_version()},
        "settings": asdict(settings),
        "model": {"name": settings.model.name_or_path, "family": adapter.model_type,
                  "blocks": len(adapter.blocks), "parameters": total, "nonzero": nonzero,
                  "dense_nonzero": ctx.dense["nonzero"], "dtype": identity["dtype"],
                  "fingerprint": identity["fingerprint"]},
        "stages": stage_names,
        "calibration": {"sources": settings.calibration.sources, "windows": int(calib.shape[0]),
                        "bos": bos_used(ctx.tokenizer, settings.calibration.bos),
                        "seqlen": int(calib.shape[1]), "tokens": int(calib.numel()),
                        "fingerprint": tensor_fingerprint(calib, ctx.recon_calib),
                        "reconstruction_windows": list(recon_calib.shape) if recon_calib is not None else None},
        "resumed_blocks": len(ctx.finished),
    }


def dry_run_report(settings: RunSettings, schedule: Schedule, timings: dict, device, out: Path) -> dict:
    """``schedule.dry_run``: print the schedule and stop before pruning."""
    from rich.console import Console

    report = {"tool": "compressor", "dry_run": True, "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "command": " ".join(sys.argv), "machine": machine_name(device), "settings": asdict(settings),
              "schedule": schedule.to_dict(), "timings": timings, "peak_memory": peak_memory(device),
              "outputs": {"dir": str(out), "schedule": str(out / "schedule.json"), "report": str(out / "dry_run.json"),
                          "schedule_plot": str(out / "schedule.png") if settings.output.plots else None}}
    atomic_write_json(out / "dry_run.json", report)  # not report.json: a dry run is not a finished compression
    Console().print(schedule_table(schedule))
    print(f"dry run: schedule computed in {schedule.seconds:.1f}s, nothing pruned; written {out / 'schedule.json'}")
    return report


def save_outputs(report: dict, ctx: RunContext, todo: list) -> None:
    """The model folder once (plain Hugging Face or a compressed-tensors export), then each stage's files, each
    written atomically; paths in the report."""
    settings, out, model, tokenizer = ctx.settings, ctx.out, ctx.model, ctx.tokenizer
    outputs = report["outputs"] = {"dir": str(out)}
    if settings.output.save_model:
        model.to("cpu")
        pruned = ctx.artifacts.get("prune") or {}

        def fill(tmp: Path) -> None:
            w8a8 = ctx.artifacts.get("activations")
            if settings.output.format == "compressed-tensors" and w8a8 is not None:
                report["export"] = export_w8a8(model, tokenizer, tmp, *w8a8_state_layers(w8a8)).summary()
                if ctx.prefix is not None:
                    kind = "its token ids prepended to every prompt reproduce it" if ctx.prefix.method != "tuned" \
                        else "tuned keys/values: an engine serving this checkpoint does not apply it"
                    report["export"]["note"] = (f"the static input scales were calibrated behind the cushion prefix "
                                                f"({len(ctx.prefix)} tokens), which the format does not hold; {kind}")
                    log.warning("export: %s", report["export"]["note"])
                return
            if settings.output.format == "compressed-tensors":
                report["export"] = export_w4a16(model, tokenizer, tmp, pruned.get("quantized"), pruned.get("masks"),
                                                settings.quantization.group_size).summary()
                return
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)

        outputs["model"] = str(atomic_write_dir(out / "model", fill))
    for stage in todo:
        outputs.update(stage.save(ctx, report))
    outputs["report"] = str(out / "report.json")
    outputs["log"] = str(out / "compress.log")


def attach_saved_moe(model, name_or_path: str) -> dict | None:
    """A converted output folder (``moe.safetensors`` beside ``model/``): its FFNs converted back into experts."""
    from compressor.moe.io import attach_moe, saved_moe_file

    path = saved_moe_file(name_or_path) if os.path.isdir(os.path.expanduser(name_or_path)) else None
    return attach_moe(model, path) if path else None


def validate_dir(model_cfg: ModelConfig, out_dir: str | None) -> Path:
    """Where ``validate.json`` goes: ``out_dir``; else the compressed output folder when the model is its
    ``model/`` (beside ``report.json``); else ``outputs/validate``."""
    if out_dir:
        return Path(out_dir)
    source = Path(os.path.expanduser(model_cfg.name_or_path))
    if source.is_dir() and (source.parent / "report.json").is_file():
        return source.parent
    return Path("outputs/validate")


def validate(model_cfg: ModelConfig, evaluation: EvaluationConfig, calibration: CalibrationConfig,
             out_dir: str | None = None, device: str | torch.device = "cpu", progress: bool = True) -> dict:
    """Perplexity and achieved sparsity of a model or a compressed output folder; writes ``validate.json`` to
    ``validate_dir(model_cfg, out_dir)`` and prints where.

    What the folder's stages saved is applied: ``moe.safetensors`` beside it (experts and routers),
    ``activations.safetensors`` (W8A8) and ``cushion.safetensors`` (the prefix in front of every window)."""
    from compressor.cushion.prefix import find_prefix
    from compressor.quant.w8a8 import load_saved

    device = torch.device(device)
    out = validate_dir(model_cfg, out_dir)
    settings = RunSettings(model=model_cfg, evaluation=evaluation, calibration=calibration,
                           output=OutputConfig(dir=str(out)))
    config = preflight(settings)
    model, tokenizer = load_model(model_cfg, config)
    adapter = ModelAdapter(model)
    moe = attach_saved_moe(model, model_cfg.name_or_path)
    identity = model_identity(model, tokenizer)
    corpora = eval_corpora(settings, model, tokenizer, device, identity["fingerprint"])
    w8a8 = load_saved(model, model_cfg.name_or_path)  # after the corpora: generated text comes from the fp model
    folder = Path(os.path.expanduser(model_cfg.name_or_path))
    prefix = find_prefix(folder) if folder.is_dir() else None
    ppl = {name: perplexity(model, w, device, progress=progress, desc=f"perplexity on {corpus_label(name)}",
                            prefix=prefix)
           for name, w in corpora.items()}
    zs = zeroshot.measure(evaluation, model, tokenizer, device, "model", prefix=prefix)
    zeros = total = 0
    for _, module in adapter.iter_linears():
        w = weight_of(module)
        zeros += int((w == 0).sum())
        total += w.numel()
    report = {"model": model_cfg.name_or_path, "family": adapter.model_type, "dtype": identity["dtype"],
              "fingerprint": identity["fingerprint"], "bos": bos_used(tokenizer, evaluation.bos), "perplexity": ppl,
              "windows": {k: list(v.shape) for k, v in corpora.items()},
              "linear_sparsity": zeros / max(total, 1), "moe": moe, "machine": machine_name(device),
              "activations": w8a8.summary()["granularity"] if w8a8 else None,
              "cushion_prefix_len": len(prefix) if prefix is not None else 0,
              "zeroshot": zeroshot.section(evaluation, model=zs),
              "date": datetime.datetime.now().isoformat(timespec="seconds")}
    if not distributed.current().is_main:  # several ranks measured their shares together; rank 0 writes
        return report
    path = atomic_write_json(out / "validate.json", report)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"validate: {model_cfg.name_or_path}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in ppl.items():
        table.add_row(f"perplexity ({'held-out generated text' if name == GENERATED else name})", f"{value:.3f}")
    table.add_row("sparsity of linear layers", f"{report['linear_sparsity']:.4f}")
    if moe:
        table.add_row("MoE FFNs (experts per token)", f"{moe['k']} of {moe['experts']} ({moe['variant']})")
    if w8a8:
        table.add_row("W8A8 activations (activations.safetensors)", w8a8.cfg.granularity)
    if prefix is not None:
        table.add_row("cushion prefix (cushion.safetensors), tokens", str(len(prefix)))
    for row in zeroshot.table_rows(report["zeroshot"], ("model",)):
        table.add_row(*row)
    Console().print(table)
    print(f"written {path}")
    return report
