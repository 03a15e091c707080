"""The shared SmolLM2 protocol (shared/guide/anchors.md) for many settings, in one run.

    python bench/protocol.py --data ../shared/data --out bench/results/protocol_lr.json
    python bench/protocol.py --model $HOME/stage/SmolLM2-135M-Instruct.Q4_1.gguf --data $HOME/stage/data \\
        --settings sparsegpt:0.5:br+gp wanda:2:4:br --out bench/results/protocol_reconstruction.json

A setting is METHOD:PATTERN[:RECONSTRUCTION][:ALLOCATOR][:QUANTIZER], PATTERN a sparsity (0.5) or N:M
(2:4), ALLOCATOR uniform/owl/hessian, QUANTIZER rtn/gptq (4-bit, groups of 128), e.g. sparsegpt:0.7:hessian. Loads the model
once, restores the dense weights before each setting, and runs the same pipeline as
``python cli.py fit`` (compressor.pipeline.compress). Reconstruction calibrates on 256 x 1024
windows of wiki.valid.tokens (seed 0), optionally plus self-generated samples. Prints a table and
writes the results JSON in the anchors.md shape.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compressor.config import (  # noqa: E402
    GENERATED,
    CalibrationConfig,
    EvaluationConfig,
    GenerationConfig,
    ModelConfig,
    OutputConfig,
    PruningConfig,
    RuntimeConfig,
)
from compressor.io import atomic_write_json  # noqa: E402
from compressor.models.loading import load_model  # noqa: E402
from compressor.pipeline import RunSettings, compress, machine_name  # noqa: E402
from compressor.quant.int4 import METHODS as QUANT_METHODS  # noqa: E402
from compressor.quant.int4 import QuantizationConfig  # noqa: E402
from compressor.reconstruction.module import MODES, ReconstructionConfig  # noqa: E402
from compressor.schedule.allocate import ALLOCATORS, ScheduleConfig  # noqa: E402

CORE = ["sparsegpt:0.5", "sparsegpt:2:4", "sparsegpt:4:8", "wanda:0.5", "wanda:2:4", "magnitude:0.5"]


def parse_setting(text: str) -> tuple[PruningConfig, str, str, str]:
    """-> (pruning, reconstruction mode, allocator, quantizer)."""
    parts = text.split(":")
    method, rest = parts[0], parts[1:]
    mode, allocator, quant = "lr", "uniform", "none"
    while rest and not rest[-1].replace(".", "").isdigit():
        word = rest.pop()
        if word in MODES:
            mode = word
        elif word in ALLOCATORS:
            allocator = word
        elif word in QUANT_METHODS:
            quant = word
        else:
            raise SystemExit(f"setting {text!r}: {word!r} is not a reconstruction mode {MODES}, allocator "
                             f"{ALLOCATORS} or quantizer {QUANT_METHODS}")
    if len(rest) == 2:
        return PruningConfig(method=method, pattern=f"{rest[0]}:{rest[1]}"), mode, allocator, quant
    return PruningConfig(method=method, sparsity=float(rest[0])), mode, allocator, quant


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="'smollm2' (installed package) or a path to the GGUF file")
    ap.add_argument("--data", default="../shared/data", help="folder holding wikitext-2/ and wikitext-2-raw/")
    ap.add_argument("--out", default="bench/results/protocol_lr.json")
    ap.add_argument("--workdir", default="outputs/protocol", help="per-setting output folders")
    ap.add_argument("--settings", nargs="*", default=CORE, help="METHOD:PATTERN[:RECONSTRUCTION] ...")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--sequential-within-block", action="store_true")
    ap.add_argument("--batch-size", type=int, default=8, help="calibration windows per block forward")
    ap.add_argument("--recon-samples", type=int, default=256, help="real reconstruction windows (x 1024 tokens)")
    ap.add_argument("--recon-generated", type=int, default=0, help="self-generated reconstruction windows added")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--precision", default="32-true")
    ap.add_argument("--lr", type=float, default=1e-3, help="reconstruction learning rate")
    ap.add_argument("--max-windows", type=int, default=None, help="evaluate fewer windows (smoke runs only)")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense baseline")
    ap.add_argument("--granularity", default="block", help="schedule granularity: block or layer")
    ap.add_argument("--spread", type=float, default=0.1, help="hessian schedule: range target +- spread")
    ap.add_argument("--level-step", type=float, default=0.5, help="hessian schedule: decades per level")
    ap.add_argument("--owl-lambda", type=float, default=0.08)
    ap.add_argument("--no-clip", action="store_true", help="INT4: min-max group ranges instead of the clip search")
    ap.add_argument("--no-act-order", action="store_true", help="GPTQ: columns left to right (dynamic groups)")
    ap.add_argument("--no-joint", action="store_true", help="GPTQ after SparseGPT with masks fixed, not in one sweep")
    ap.add_argument("--prune-act-order", action="store_true", help="SparseGPT alone: columns by decreasing diag(H)")
    ap.add_argument("--normalize", default="none", help="hessian schedule: none, output or residual")
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = Path(args.data)
    calib_file, eval_file = str(data / "wikitext-2" / "wiki.valid.tokens"), str(data / "wikitext-2-raw" / "wiki.test.raw")
    model_cfg = ModelConfig(name_or_path=args.model)
    model, tokenizer = load_model(model_cfg)
    dense_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    records = []
    for i, text in enumerate(args.settings):
        pruning, mode, allocator, quant = parse_setting(text)
        pruning = dataclasses.replace(pruning, sequential_within_block=args.sequential_within_block,
                                      act_order=args.prune_act_order)  # validated again
        model.load_state_dict(dense_state)
        recon_sources = [calib_file] + ([GENERATED] if args.recon_generated else [])
        n_recon = args.recon_samples + args.recon_generated
        recon_calib = CalibrationConfig(
            sources=recon_sources, weights=[args.recon_samples, args.recon_generated] if args.recon_generated else None,
            num_samples=n_recon, seqlen=1024, seed=0, bos="never",
            generation=GenerationConfig(batch_size=64, cache_dir=os.path.join(args.workdir, "generated")))
        run = RunSettings(
            model=model_cfg,
            pruning=pruning,
            calibration=CalibrationConfig(sources=[calib_file], num_samples=args.samples, seqlen=2048, seed=0,
                                          bos="never"),  # the classic protocol: no BOS per window
            evaluation=EvaluationConfig(datasets=[eval_file], heldout_samples=16, bos="never",
                                        dense_baseline=(i == 0 and not args.no_dense), max_windows=args.max_windows),
            output=OutputConfig(dir=os.path.join(args.workdir, f"{text.replace(':', '_')}"),
                                save_model=False, save_masks=False, start_over=True),
            runtime=RuntimeConfig(batch_size=args.batch_size),
            reconstruction=ReconstructionConfig(mode=mode, epochs=args.epochs, precision=args.precision, lr=args.lr),
            recon_calibration=recon_calib if mode != "lr" else None,
            schedule=ScheduleConfig(allocator=allocator, granularity=args.granularity, spread=args.spread,
                                    level_step=args.level_step, owl_lambda=args.owl_lambda,
                                    normalize=args.normalize),
            quantization=QuantizationConfig(method=quant, clip=not args.no_clip,
                                            act_order=not args.no_act_order, joint=not args.no_joint),
        )
        t = time.perf_counter()
        report = compress(run, device, progress=False, model_and_tokenizer=(model, tokenizer))
        seconds = time.perf_counter() - t
        last = report["blocks"][-1]
        common = {"model": "smollm2-135m",
                  "sequential_within_block": args.sequential_within_block, "calib_batch_size": args.batch_size,
                  "prune_act_order": args.prune_act_order,
                  "eval_windows": report["perplexity"]["windows"][eval_file][0]}
        if report["perplexity"]["dense"]:
            records.append({**common, "method": "dense", "pattern": "0", "reconstruction": "lr", "schedule": "uniform",
                            "ppl": report["perplexity"]["dense"][eval_file]})
        extra = {}
        if allocator != "uniform":
            sched = report["schedule"]
            extra.update(granularity=args.granularity, schedule_range=sched["range"],
                         schedule_seconds=round(sched["seconds"], 2),
                         level_step=args.level_step if allocator == "hessian" else None,
                         normalize=args.normalize if allocator == "hessian" else None, spread=args.spread,
                         sparsity_min=min(sched["sparsity"].values()), sparsity_max=max(sched["sparsity"].values()),
                         unit_sparsity=[u["sparsity"] for u in sched["units"]])
        if quant != "none":
            q = report["quantization"]
            extra.update(bits=q["bits"], quantizer=q["method"], group_size=q["group_size"], clip=not args.no_clip,
                         act_order=(not args.no_act_order) if quant == "gptq" else None, joint=q["joint"],
                         prune_act_order=None if q["joint"] else args.prune_act_order,  # one sweep: act_order rules
                         bits_per_weight=q["bits_per_weight"]["total"], quant_output_error=q["output_error_total"])
        train = [t for b in report["blocks"] for t in b["training"]]
        records.append({
            **common, "method": pruning.method, "pattern": pruning.label, "reconstruction": mode,
            "schedule": allocator, **extra,
            "ppl": report["perplexity"]["compressed"][eval_file],
            "calib_error": last["calib_error"], "heldout_error": last["heldout_error"],
            "calib_rel_error": last["calib_rel_error"], "heldout_rel_error": last["heldout_rel_error"],
            "calib_rel_error_before_training": last["calib_rel_error_pruned"],
            "recon_calibration": f"{args.recon_samples} real + {args.recon_generated} generated x 1024"
            if mode != "lr" else None,
            "epochs": args.epochs if mode != "lr" else None, "lr": args.lr if mode != "lr" else None,
            "train_seconds": round(sum(t["seconds"] for t in train), 2),
            "train_peak_gpu_gb": max((t["peak_gpu_gb"] or 0 for t in train), default=None),
            "per_block_calib_rel_error": [b["calib_rel_error"] for b in report["blocks"]],
            "per_block_heldout_rel_error": [b["heldout_rel_error"] for b in report["blocks"]],
            "achieved_sparsity": report["sparsity"]["achieved"], "seconds": round(seconds, 2),
            "prune_seconds": round(report["timings"]["prune"], 2), "peak_gpu_gb": report["peak_memory"]["gpu_gb"]})
        print(json.dumps({k: v for k, v in records[-1].items() if not k.startswith("per_block")}), flush=True)
        atomic_write_json(args.out, {"machine": machine_name(device), "date": datetime.date.today().isoformat(),
                                     "command": "python " + " ".join(sys.argv), "records": records})
    print(f"\n{'method':<10} {'pattern':<8} {'recon':<9} {'schedule':<9} {'quant':<6} {'ppl':>10} {'calib_err':>10} "
          f"{'heldout_err':>11}")
    for r in records:
        print(f"{r['method']:<10} {r['pattern']:<8} {r['reconstruction']:<9} {r['schedule']:<9} "
              f"{r.get('quantizer') or '-':<6} {r['ppl']:>10.2f} "
              f"{r.get('calib_rel_error') or 0:>10.4f} {r.get('heldout_rel_error') or 0:>11.4f}")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
