"""Orchestration of one compression run: check, load, calibrate, measure, run the stages, measure, save, report."""

from __future__ import annotations

import datetime
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

from compressor.checkpoint import BlockCheckpoints, tensor_fingerprint
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
from compressor.evaluation import perplexity
from compressor.io import atomic_write, atomic_write_dir, atomic_write_json
from compressor.models.adapters import ModelAdapter, check_supported, max_context, weight_of
from compressor.models.loading import load_config, load_model
from compressor.quant.int4 import QuantizationConfig
from compressor.reconstruction.module import ReconstructionConfig
from compressor.quant.activations import ActivationQuantConfig
from compressor.report import print_summary
from compressor.schedule.allocate import ScheduleConfig
from compressor.schedule.schedule import Schedule, schedule_table
from compressor.stages import RunContext, stages
from compressor.quant.w8a8 import load_saved
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
    cushion: CushionConfig = field(default_factory=CushionConfig)
    """CushionCache prefix, after pruning and before W8A8 (model.cushion)."""
    activations: ActivationQuantConfig = field(default_factory=ActivationQuantConfig)
    """W8A8 activation quantization, the last stage (model.activations)."""


def preflight(settings: RunSettings):
    """Every check that needs no weights: family, context length, output folder. Returns the model config."""
    settings.schedule.check(settings.pruning.target_sparsity, settings.pruning.nm)
    if settings.quantization.enabled and settings.activations.enabled and settings.activations.weight_bits:
        raise ConfigError(f"model.activations.weight_bits={settings.activations.weight_bits} would quantize the "
                          f"{settings.quantization.bits}-bit weights of quantization.method="
                          f"{settings.quantization.method!r} again: set model.activations.weight_bits=0 to keep "
                          "them (W4A8), or quantization.method=none")
    config = load_config(settings.model)
    check_supported(config.model_type)
    limit = max_context(config)
    eval_seqlen = settings.evaluation.seqlen or settings.calibration.seqlen
    checks = [("calibration.seqlen", settings.calibration.seqlen), ("evaluation.seqlen", eval_seqlen)]
    if settings.recon_calibration is not None:
        checks.append(("recon_calibration.seqlen", settings.recon_calibration.seqlen))
    for name, value in checks:
        if limit is not None and value > limit:
            raise ConfigError(f"{name}={value} is above the model's context of {limit} tokens: use at most {limit}")
    out = Path(settings.output.dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output.dir={settings.output.dir!r} exists and is not a folder")
    if (out / "report.json").exists() and not settings.output.overwrite:
        raise ConfigError(f"output.dir={settings.output.dir!r} already holds a report; set output.overwrite=true")
    out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK):
        raise ConfigError(f"output.dir={settings.output.dir!r} is not writable")
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


def attach_log_file(path: Path) -> logging.Handler:
    """Log everything from the package to ``path`` as well as the console."""
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    logging.getLogger("compressor").addHandler(handler)
    logging.getLogger("compressor").setLevel(logging.INFO)
    return handler


def peak_memory(device: torch.device) -> dict:
    gpu = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux
    return {"gpu_gb": gpu, "host_gb": host}


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"


def parameter_counts(model) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    nonzero = sum(int((p != 0).sum()) for p in model.parameters())
    return total, nonzero


def model_id(cfg: ModelConfig) -> str:
    return f"{cfg.name_or_path}|{cfg.gguf_file}|{cfg.revision}"


def eval_corpora(settings: RunSettings, model, tokenizer, device) -> dict[str, torch.Tensor]:
    ev = settings.evaluation
    seqlen = ev.seqlen or settings.calibration.seqlen
    return {
        src: evaluation_windows(src, seqlen, tokenizer, model, model_id(settings.model), ev.max_windows,
                                ev.generated_samples, settings.calibration.generation, settings.calibration.seed,
                                device, settings.calibration.text_field)
        for src in ev.datasets
    }


def compress(settings: RunSettings, device: str | torch.device = "cpu", progress: bool = True,
             model_and_tokenizer=None) -> dict:
    """Run the whole compression; returns the report (also written to ``output.dir/report.json``).

    Loads the model and prepares the data once, measures the dense model once, runs the configured stages
    in order (compressor.stages), then measures, saves and reports once."""
    device = torch.device(device)
    started = time.perf_counter()
    out = Path(settings.output.dir)
    preflight(settings)
    handler = attach_log_file(out / "compress.log")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    if settings.runtime.deterministic:
        # cuBLAS reads this when its handle is created: set it before the first GPU matmul of the process
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    try:
        todo = [stage for stage in stages() if stage.enabled(settings)]
        log.info("compressing %s on %s: stages %s", settings.model.name_or_path, device,
                 ", ".join(stage.name for stage in todo) or "none")
        ctx = prepare(settings, device, out, progress, model_and_tokenizer)
        if settings.schedule.dry_run:
            return dry_run_report(settings, make_schedule(settings, ctx.model, ctx.calib, device, out, progress),
                                  ctx.timings, device, out)
        ppl_dense = measure(ctx, "dense") if settings.evaluation.dense_baseline else {}
        report: dict = {}
        for stage in todo:
            t = time.perf_counter()
            report.update(stage.run(ctx))
            ctx.timings[stage.name] = time.perf_counter() - t
        ppl = measure(ctx, "compressed")
        report = run_header(settings, ctx, [stage.name for stage in todo]) | report
        report["perplexity"] = {"dense": ppl_dense, "compressed": ppl,
                                "windows": {k: list(v.shape) for k, v in ctx.corpora.items()}}
        report["peak_memory"] = peak_memory(device)
        t = time.perf_counter()
        save_outputs(report, ctx, todo)
        ctx.timings["save"] = time.perf_counter() - t
        ctx.timings["total"] = time.perf_counter() - started
        report["timings"] = ctx.timings
        atomic_write_json(out / "report.json", report)
        print_summary(report)
        log.info("report written to %s", out / "report.json")
        return report
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        logging.getLogger("compressor").removeHandler(handler)
        handler.close()


def prepare(settings: RunSettings, device: torch.device, out: Path, progress: bool,
            model_and_tokenizer=None) -> RunContext:
    """Load the model, check the disk, make the calibration and evaluation windows, open the checkpoints."""
    timings: dict[str, float] = {}
    t = time.perf_counter()
    model, tokenizer = model_and_tokenizer or load_model(settings.model)
    timings["load"] = time.perf_counter() - t
    check_disk_space(model, settings.output, out, settings.reconstruction.cross_block, settings.quantization.enabled,
                     settings.activations.enabled and settings.activations.weight_bits > 0)
    t = time.perf_counter()
    rc = settings.recon_calibration
    if any(GENERATED in s for s in (settings.calibration.sources, settings.evaluation.datasets,
                                     rc.sources if rc else [])):
        model.to(device)
    calib = calibration_windows(settings.calibration, model, tokenizer, model_id(settings.model), device)
    recon_calib = None
    if rc is not None and settings.reconstruction.enabled:
        recon_calib = calibration_windows(rc, model, tokenizer, model_id(settings.model), device)
    corpora = eval_corpora(settings, model, tokenizer, device)
    timings["data"] = time.perf_counter() - t
    accelerator = {"cuda": "gpu", "cpu": "cpu"}.get(device.type, "auto")
    ctx = RunContext(settings, model, tokenizer, device, accelerator, out, calib, recon_calib, corpora,
                     progress=progress, timings=timings)
    if settings.output.checkpoint and not settings.schedule.dry_run:
        ctx.checkpoints = BlockCheckpoints(out / "checkpoints", settings, tensor_fingerprint(calib, recon_calib))
        ctx.finished = ctx.checkpoints.resume(settings.output.start_over)
        if ctx.finished:
            log.info("resuming: %d finished blocks loaded from %s", len(ctx.finished), out / "checkpoints")
    return ctx


def measure(ctx: RunContext, label: str) -> dict[str, float]:
    """Perplexity of the model as it stands on every evaluation corpus (timed as ``<label>_eval``)."""
    t = time.perf_counter()
    ppl = {}
    for name, windows in ctx.corpora.items():
        behind = {"prefix": ctx.prefix} if ctx.prefix is not None and label != "dense" else {}
        ppl[name] = perplexity(ctx.model, windows, ctx.device, progress=ctx.progress, desc=f"{label} ppl {name}",
                               **behind)
        log.info("%s perplexity on %s: %.3f", label, name, ppl[name])
    ctx.timings["dense_eval" if label == "dense" else "eval"] = time.perf_counter() - t
    return ppl


def run_header(settings: RunSettings, ctx: RunContext, stage_names: list[str]) -> dict:
    """The report's sections every run has: tool, machine, settings, model, stages, calibration."""
    total, nonzero = parameter_counts(ctx.model)
    calib, recon_calib = ctx.calib, ctx.recon_calib
    return {
        "tool": "compressor",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "machine": machine_name(ctx.device),
        "device": str(ctx.device),
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                     "python": platform.python_version()},
        "settings": asdict(settings),
        "model": {"name": settings.model.name_or_path, "family": ModelAdapter(ctx.model).model_type,
                  "blocks": len(ModelAdapter(ctx.model).blocks), "parameters": total, "nonzero": nonzero},
        "stages": stage_names,
        "calibration": {"sources": settings.calibration.sources, "windows": int(calib.shape[0]),
                        "seqlen": int(calib.shape[1]), "tokens": int(calib.numel()),
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
    """The model folder once, then each stage's files, each written atomically; paths in the report."""
    settings, out, model, tokenizer = ctx.settings, ctx.out, ctx.model, ctx.tokenizer
    outputs = report["outputs"] = {"dir": str(out)}
    if settings.output.save_model:
        model.to("cpu")

        def fill(tmp: Path) -> None:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)

        outputs["model"] = str(atomic_write_dir(out / "model", fill))
    for stage in todo:
        outputs.update(stage.save(ctx, report))
    outputs["report"] = str(out / "report.json")
    outputs["log"] = str(out / "compress.log")


def validate(model_cfg: ModelConfig, evaluation: EvaluationConfig, calibration: CalibrationConfig,
             output: OutputConfig, device: str | torch.device = "cpu", progress: bool = True) -> dict:
    """Perplexity and achieved sparsity of a model or a compressed output folder; writes ``validate.json``.

    The folder's ``activations.safetensors`` (W8A8) and ``cushion.safetensors`` (the prefix in front of every
    window) are applied."""
    from compressor.cushion.prefix import find_prefix

    device = torch.device(device)
    settings = RunSettings(model=model_cfg, evaluation=evaluation, calibration=calibration, output=output)
    preflight(settings)
    model, tokenizer = load_model(model_cfg)
    adapter = ModelAdapter(model)
    corpora = eval_corpora(settings, model, tokenizer, device)
    w8a8 = load_saved(model, model_cfg.name_or_path)  # after the corpora: generated text comes from the fp model
    folder = Path(os.path.expanduser(model_cfg.name_or_path))
    prefix = find_prefix(folder) if folder.is_dir() else None
    ppl = {name: perplexity(model, w, device, progress=progress, desc=f"ppl {name}", prefix=prefix)
           for name, w in corpora.items()}
    zeros = total = 0
    for _, module in adapter.iter_linears():
        w = weight_of(module)
        zeros += int((w == 0).sum())
        total += w.numel()
    report = {"model": model_cfg.name_or_path, "family": adapter.model_type, "perplexity": ppl,
              "windows": {k: list(v.shape) for k, v in corpora.items()},
              "linear_sparsity": zeros / max(total, 1), "machine": machine_name(device),
              "activations": w8a8.summary()["granularity"] if w8a8 else None,
              "cushion_prefix_len": len(prefix) if prefix is not None else 0,
              "date": datetime.datetime.now().isoformat(timespec="seconds")}
    atomic_write_json(Path(output.dir) / "validate.json", report)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"validate: {model_cfg.name_or_path}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in ppl.items():
        table.add_row(f"perplexity ({'held-out generated text' if name == GENERATED else name})", f"{value:.3f}")
    table.add_row("sparsity of linear layers", f"{report['linear_sparsity']:.4f}")
    if w8a8:
        table.add_row("W8A8 activations (activations.safetensors)", w8a8.cfg.granularity)
    if prefix is not None:
        table.add_row("cushion prefix (cushion.safetensors), tokens", str(len(prefix)))
    Console().print(table)
    return report
