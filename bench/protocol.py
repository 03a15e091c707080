"""The shared SmolLM2 protocol (shared/guide/anchors.md) for every core pruning setting, in one run.

    python bench/protocol.py --data ../shared/data --out bench/results/protocol_lr.json
    python bench/protocol.py --model $HOME/stage/SmolLM2-135M-Instruct.Q4_1.gguf --data $HOME/stage/data

Loads the model once, restores the dense weights before each setting, and runs the same
pipeline as ``python cli.py fit`` (compressor.pipeline.compress). Prints a table and writes the
results JSON in the anchors.md shape.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compressor.config import (  # noqa: E402
    CalibrationConfig,
    EvaluationConfig,
    ModelConfig,
    OutputConfig,
    PruningConfig,
    RuntimeConfig,
)
from compressor.io import atomic_write_json  # noqa: E402
from compressor.models.loading import load_model  # noqa: E402
from compressor.pipeline import RunSettings, compress, machine_name  # noqa: E402

SETTINGS = [
    ("sparsegpt", "unstructured", 0.5),
    ("sparsegpt", "2:4", 0.5),
    ("sparsegpt", "4:8", 0.5),
    ("wanda", "unstructured", 0.5),
    ("wanda", "2:4", 0.5),
    ("magnitude", "unstructured", 0.5),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="'smollm2' (installed package) or a path to the GGUF file")
    ap.add_argument("--data", default="../shared/data", help="folder holding wikitext-2/ and wikitext-2-raw/")
    ap.add_argument("--out", default="bench/results/protocol_lr.json")
    ap.add_argument("--workdir", default="outputs/protocol", help="per-setting output folders")
    ap.add_argument("--only", nargs="*", help="subset, e.g. sparsegpt:0.5 wanda:2:4")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--sequential-within-block", action="store_true")
    ap.add_argument("--batch-size", type=int, default=8, help="calibration windows per block forward")
    ap.add_argument("--max-windows", type=int, default=None, help="evaluate fewer windows (smoke runs only)")
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = Path(args.data)
    calib_file, eval_file = str(data / "wikitext-2" / "wiki.valid.tokens"), str(data / "wikitext-2-raw" / "wiki.test.raw")
    model_cfg = ModelConfig(name_or_path=args.model)
    model, tokenizer = load_model(model_cfg)
    dense_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    records = []
    settings = SETTINGS
    if args.only:
        settings = [s for s in SETTINGS if f"{s[0]}:{s[1] if s[1] != 'unstructured' else s[2]}" in args.only]
    for i, (method, pattern, sparsity) in enumerate(settings):
        model.load_state_dict(dense_state)
        pruning = PruningConfig(method=method, pattern=pattern, sparsity=sparsity,
                                sequential_within_block=args.sequential_within_block)
        run = RunSettings(
            model=model_cfg,
            pruning=pruning,
            calibration=CalibrationConfig(sources=[calib_file], num_samples=args.samples, seqlen=2048, seed=0),
            evaluation=EvaluationConfig(datasets=[eval_file], heldout_samples=16, dense_baseline=(i == 0),
                                        max_windows=args.max_windows),
            output=OutputConfig(dir=os.path.join(args.workdir, f"{method}-{pruning.label.replace(':', 'of')}"),
                                save_model=False, save_masks=False),
            runtime=RuntimeConfig(batch_size=args.batch_size),
        )
        t = time.perf_counter()
        report = compress(run, device, progress=False, model_and_tokenizer=(model, tokenizer))
        seconds = time.perf_counter() - t
        last = report["blocks"][-1]
        common = {"model": "smollm2-135m", "schedule": "uniform", "reconstruction": "lr",
                  "sequential_within_block": args.sequential_within_block, "calib_batch_size": args.batch_size,
                  "eval_windows": report["perplexity"]["windows"][eval_file][0]}
        if i == 0 and report["perplexity"]["dense"]:
            records.append({**common, "method": "dense", "pattern": "0", "ppl": report["perplexity"]["dense"][eval_file]})
        records.append({**common, "method": method, "pattern": pruning.label, "ppl": report["perplexity"]["compressed"][eval_file],
                        "calib_error": last["calib_error"], "heldout_error": last["heldout_error"],
                        "calib_rel_error": last["calib_rel_error"], "heldout_rel_error": last["heldout_rel_error"],
                        "achieved_sparsity": report["sparsity"]["achieved"], "seconds": round(seconds, 2),
                        "prune_seconds": round(report["timings"]["prune"], 2),
                        "peak_gpu_gb": report["peak_memory"]["gpu_gb"]})
        print(json.dumps(records[-1]), flush=True)
    result = {"machine": machine_name(device), "date": datetime.date.today().isoformat(),
              "command": "python " + " ".join(sys.argv), "records": records}
    atomic_write_json(args.out, result)
    print(f"\n{'method':<10} {'pattern':<8} {'ppl':>10}")
    for r in records:
        print(f"{r['method']:<10} {r['pattern']:<8} {r['ppl']:>10.2f}")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
