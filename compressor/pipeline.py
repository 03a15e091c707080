"""Orchestration of one compression run: check, load, calibrate, measure, prune, measure, save, report."""

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
from compressor.quant.int4 import QuantizationConfig, bits_per_weight
from compressor.reconstruction.module import ReconstructionConfig
from compressor.report import plot_block_error, plot_sparsity, print_summary
from compressor.schedule.allocate import ScheduleConfig
from compressor.schedule.schedule import Schedule, build_schedule, plot_schedule, schedule_table
from compressor.sequential import SequentialPruner, choose_store_device

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


def preflight(settings: RunSettings):
    """Every check that needs no weights: family, context length, output folder. Returns the model config."""
    settings.schedule.check(settings.pruning.target_sparsity, settings.pruning.nm)
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
                     quantized: bool = False) -> int:
    """Refuse to start when the output folder's disk cannot hold model, masks and block checkpoints.

    ``quantized`` (GPTQ/RTN): checkpoints hold a byte of code per linear weight and ``quantized.safetensors`` the
    packed codes and mask (under 0.7 byte per weight). ``cross_block``: checkpoints also hold in-window states, up to
    three at once while the newest replaces the oldest (a block's weights, masks and, when quantized, the fp32 GPTQ
    Hessians of its layers' inputs, counted once per layer: an upper bound)."""
    adapter = ModelAdapter(model)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    linear = sum(weight_of(m).numel() for _, m in adapter.iter_linears())
    need = (weights if output.save_model else 0) + (linear if output.save_masks else 0)
    if quantized:
        need += int(0.7 * linear)
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
    """Run the whole compression; returns the report (also written to ``output.dir/report.json``)."""
    accelerator = {"cuda": "gpu", "cpu": "cpu"}.get(torch.device(device).type, "auto")
    device = torch.device(device)
    started = time.perf_counter()
    timings: dict[str, float] = {}
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
        log.info("compressing %s with %s %s on %s", settings.model.name_or_path, settings.pruning.method,
                 settings.pruning.label, device)
        t = time.perf_counter()
        model, tokenizer = model_and_tokenizer or load_model(settings.model)
        adapter = ModelAdapter(model)
        timings["load"] = time.perf_counter() - t
        check_disk_space(model, settings.output, out, settings.reconstruction.cross_block,
                         settings.quantization.enabled)

        t = time.perf_counter()
        gen_device = device
        rc = settings.recon_calibration
        if any(GENERATED in s for s in (settings.calibration.sources, settings.evaluation.datasets,
                                         rc.sources if rc else [])):
            model.to(gen_device)
        calib = calibration_windows(settings.calibration, model, tokenizer, model_id(settings.model), gen_device)
        recon_calib = None
        if rc is not None and settings.reconstruction.enabled:
            recon_calib = calibration_windows(rc, model, tokenizer, model_id(settings.model), gen_device)
        corpora = eval_corpora(settings, model, tokenizer, gen_device)
        timings["data"] = time.perf_counter() - t

        ppl_dense: dict[str, float] = {}
        t = time.perf_counter()
        if settings.evaluation.dense_baseline and not settings.schedule.dry_run:
            for name, windows in corpora.items():
                ppl_dense[name] = perplexity(model, windows, device, progress=progress, desc=f"dense ppl {name}")
                log.info("dense perplexity on %s: %.3f", name, ppl_dense[name])
        timings["dense_eval"] = time.perf_counter() - t

        schedule = None
        if settings.schedule.needs_statistics:
            schedule = make_schedule(settings, model, calib, device, out, progress)
            timings["schedule"] = schedule.seconds
            if settings.schedule.dry_run:
                return dry_run_report(settings, schedule, timings, device, out)

        heldout = None
        if corpora and settings.evaluation.heldout_samples:
            heldout = next(iter(corpora.values()))[: settings.evaluation.heldout_samples]
        checkpoints, finished = None, []
        if settings.output.checkpoint:
            checkpoints = BlockCheckpoints(out / "checkpoints", settings, tensor_fingerprint(calib, recon_calib),
                                           schedule.sparsity if schedule else None)
            finished = checkpoints.resume(settings.output.start_over)
            if finished:
                log.info("resuming: %d finished blocks loaded from %s", len(finished), out / "checkpoints")
            if finished and schedule and checkpoints.saved_schedule and checkpoints.saved_schedule != schedule.sparsity:
                # the finished blocks followed the saved schedule: keep it (the dense pass may differ in the last
                # bits on another machine and cross a level boundary)
                log.warning("the recomputed schedule differs from the one the finished blocks used: keeping the saved")
                schedule.sparsity = checkpoints.schedule = checkpoints.saved_schedule
        t = time.perf_counter()
        pruner = SequentialPruner(model, settings.pruning, settings.runtime, device,
                                  sparsity_map=schedule.sparsity if schedule else None,
                                  reconstruction=settings.reconstruction, log_dir=out / "logs",
                                  accelerator=accelerator, quantization=settings.quantization)
        blocks = pruner.run(calib, heldout, progress=progress, recon_calib=recon_calib, checkpoints=checkpoints,
                            finished=finished,
                            on_block=lambda r: log.info("block %d: %.2fs rel_err calib %s held-out %s", r.index,
                                                        r.seconds, r.calib_rel_error, r.heldout_rel_error))
        timings["prune"] = time.perf_counter() - t

        t = time.perf_counter()
        prefix, cushion = run_cushion_stage(settings, model, tokenizer, calib, out, device, progress, accelerator)
        timings["cushion"] = time.perf_counter() - t

        ppl: dict[str, float] = {}
        t = time.perf_counter()
        for name, windows in corpora.items():
            ppl[name] = perplexity(model, windows, device, progress=progress, desc=f"compressed ppl {name}",
                                   prefix=prefix)
            log.info("compressed perplexity on %s: %.3f", name, ppl[name])
        timings["eval"] = time.perf_counter() - t

        per_layer = {f"{adapter.block_path}.{b.index}.{n}": s for b in blocks for n, s in b.sparsity.items()}
        pruned_params = sum(pruner.masks[n].numel() for n in pruner.masks)
        achieved = 1 - sum(int(m.sum()) for m in pruner.masks.values()) / max(pruned_params, 1)
        total, nonzero = parameter_counts(model)
        report = {
            "tool": "compressor",
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
            "machine": machine_name(device),
            "device": str(device),
            "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                         "python": platform.python_version()},
            "settings": asdict(settings),
            "model": {"name": settings.model.name_or_path, "family": adapter.model_type,
                      "blocks": len(adapter.blocks), "parameters": total, "nonzero": nonzero},
            "pruning": {"method": settings.pruning.method, "pattern": settings.pruning.label,
                        "reconstruction": settings.reconstruction.mode, "schedule": settings.schedule.allocator},
            "schedule": schedule.to_dict() if schedule else None,
            "quantization": quantization_summary(settings.quantization, pruner, blocks),
            "cushion": cushion,
            "calibration": {"sources": settings.calibration.sources, "windows": int(calib.shape[0]),
                            "seqlen": int(calib.shape[1]), "tokens": int(calib.numel()),
                            "reconstruction_windows": list(recon_calib.shape) if recon_calib is not None else None},
            "sparsity": {"target": settings.pruning.target_sparsity, "achieved": achieved,
                         "pruned_parameters": pruned_params, "per_layer": per_layer},
            "blocks": [asdict(b) for b in blocks],
            "perplexity": {"dense": ppl_dense, "compressed": ppl,
                           "windows": {k: list(v.shape) for k, v in corpora.items()}},
            "timings": timings,
            "resumed_blocks": len(finished),
            "peak_memory": peak_memory(device),
            "outputs": {"dir": str(out)},
        }
        t = time.perf_counter()
        save_outputs(report, model, tokenizer, pruner.masks, settings, out, pruner.quantized, prefix)
        timings["save"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - started
        atomic_write_json(out / "report.json", report)
        print_summary(report)
        log.info("report written to %s", out / "report.json")
        return report
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        logging.getLogger("compressor").removeHandler(handler)
        handler.close()


def make_schedule(settings: RunSettings, model, calib: torch.Tensor, device: torch.device, out: Path,
                  progress: bool) -> Schedule:
    """The dense statistics pass and the allocator; the schedule is written to schedule.json (+ png)."""
    hidden = getattr(model.config, "hidden_size", None) or model.config.n_embd
    need = 2 * calib.numel() * hidden * torch.finfo(model.dtype).bits // 8
    store = choose_store_device(need, device, settings.runtime.activations)
    schedule = build_schedule(model, calib, settings.schedule, settings.pruning, settings.runtime.batch_size, device,
                              store, progress)
    atomic_write_json(out / "schedule.json", schedule.to_dict())
    if settings.output.plots:
        plot_schedule(schedule, out / "schedule.png")
    return schedule


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


def run_cushion_stage(settings: RunSettings, model, tokenizer, calib: torch.Tensor, out: Path, device: torch.device,
                      progress: bool, accelerator: str):
    """The cushion prefix on the (compressed) model: ``(prefix or None, report section or None)``."""
    if not settings.cushion.enabled:
        return None, None
    from compressor.cushion.stage import run_cushion

    if settings.output.start_over:
        (out / "checkpoints" / "cushion_search.json").unlink(missing_ok=True)
    return run_cushion(model, tokenizer, calib, settings.cushion, out, device, progress, accelerator)


def quantization_summary(cfg: QuantizationConfig, pruner: SequentialPruner, blocks) -> dict | None:
    """Bits per weight (values, scales, mask) over the quantized layers, and the per-layer output error."""
    if not cfg.enabled:
        return None
    numel = kept = groups = 0
    for name, mask in pruner.masks.items():
        if f"{name}.scales" in pruner.quantized:
            numel += mask.numel()
            kept += int(mask.sum())
            groups += pruner.quantized[f"{name}.scales"].numel()
    errors = {f"{b.index}.{n}": e for b in blocks for n, e in b.quant_error.items()}
    return {"method": cfg.method, "bits": cfg.bits, "group_size": cfg.group_size, "clip": cfg.clip,
            "act_order": cfg.act_order if cfg.method == "gptq" else None, "joint": pruner.joint,
            "bits_per_weight": bits_per_weight(numel, kept, groups, cfg.bits),
            "output_error_total": sum(errors.values()) if errors else None, "layer_output_error": errors}


def save_outputs(report: dict, model, tokenizer, masks: dict, settings: RunSettings, out: Path,
                 quantized: dict | None = None, prefix=None) -> None:
    """Model folder (with the cushion prefix), masks, packed low-bit layers and plots, each written atomically;
    paths in the report."""
    from safetensors.torch import save_file

    from compressor.cushion.prefix import FILE_NAME, save_prefix

    outputs = report["outputs"]
    if settings.output.save_model:
        model.to("cpu")

        def fill(tmp: Path) -> None:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            if prefix is not None:
                save_prefix(prefix, tmp / FILE_NAME)

        outputs["model"] = str(atomic_write_dir(out / "model", fill))
    if settings.output.save_masks and masks:
        contiguous = {k: v.contiguous() for k, v in masks.items()}
        outputs["masks"] = str(atomic_write(out / "masks.safetensors", lambda tmp: save_file(contiguous, tmp)))
    if quantized:
        from compressor.quant.pack import pack_layer

        packed = {}
        for name, mask in masks.items():
            if f"{name}.codes" in quantized:
                layer = pack_layer(quantized[f"{name}.codes"], mask, quantized[f"{name}.scales"],
                                   quantized[f"{name}.zeros"])
                packed.update({f"{name}.{k}": v for k, v in layer.items()})
        meta = {"group_size": str(settings.quantization.group_size), "bits": str(settings.quantization.bits)}
        path = atomic_write(out / "quantized.safetensors", lambda tmp: save_file(packed, tmp, metadata=meta))
        outputs["quantized"] = str(path)
        report["quantization"]["file_bytes"] = path.stat().st_size
    if settings.output.plots:
        outputs["sparsity_plot"] = str(plot_sparsity(report["sparsity"]["per_layer"], out / "sparsity.png",
                                                     report["sparsity"]["target"]))
        err = plot_block_error(report["blocks"], out / "block_error.png")
        if err:
            outputs["error_plot"] = str(err)
    outputs["report"] = str(out / "report.json")
    outputs["log"] = str(out / "compress.log")


def validate(model_cfg: ModelConfig, evaluation: EvaluationConfig, calibration: CalibrationConfig,
             output: OutputConfig, device: str | torch.device = "cpu", progress: bool = True) -> dict:
    """Perplexity and achieved sparsity of a model or a compressed output folder; writes ``validate.json``.

    A ``cushion.safetensors`` in the model folder is applied in front of every window."""
    from compressor.cushion.prefix import find_prefix

    device = torch.device(device)
    settings = RunSettings(model=model_cfg, evaluation=evaluation, calibration=calibration, output=output)
    preflight(settings)
    model, tokenizer = load_model(model_cfg)
    adapter = ModelAdapter(model)
    folder = Path(os.path.expanduser(model_cfg.name_or_path))
    prefix = find_prefix(folder) if folder.is_dir() else None
    corpora = eval_corpora(settings, model, tokenizer, device)
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
    Console().print(table)
    return report
