"""Deterministic mode on a GPU: the same config and seed, run twice in one process, bit for bit.

    python bench/determinism.py --model $HOME/stage/SmolLM2-135M-Instruct.Q4_1.gguf --data $HOME/stage/data

Runs SparseGPT 50% + BR+GP reconstruction (small calibration, 2 epochs) with
``runtime.deterministic`` on and off, twice each, and compares every weight and mask of the
compressed models bitwise. Writes bench/results/determinism.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
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
from compressor.reconstruction.module import ReconstructionConfig  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--workdir", default="outputs/determinism")
    ap.add_argument("--out", default="bench/results/determinism.json")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    calib = str(Path(args.data) / "wikitext-2" / "wiki.valid.tokens")
    model_cfg = ModelConfig(name_or_path=args.model)
    model, tokenizer = load_model(model_cfg)
    dense = {k: v.detach().clone() for k, v in model.state_dict().items()}
    results, states = [], {}
    for deterministic in (True, False):
        for attempt in range(2):
            model.load_state_dict(dense)
            out = Path(args.workdir) / f"det{int(deterministic)}_{attempt}"
            run = RunSettings(
                model=model_cfg, pruning=PruningConfig(method="sparsegpt", sparsity=0.5),
                calibration=CalibrationConfig(sources=[calib], num_samples=16, seqlen=512, seed=0),
                evaluation=EvaluationConfig(datasets=[], dense_baseline=False),
                output=OutputConfig(dir=str(out), save_model=False, plots=False, checkpoint=False, start_over=True),
                runtime=RuntimeConfig(deterministic=deterministic),
                reconstruction=ReconstructionConfig(mode="br+gp", epochs=2),
                recon_calibration=CalibrationConfig(sources=[calib], num_samples=32, seqlen=512, seed=0))
            t = time.perf_counter()
            compress(run, device, progress=False, model_and_tokenizer=(model, tokenizer))
            seconds = time.perf_counter() - t
            states[(deterministic, attempt)] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            results.append({"deterministic": deterministic, "attempt": attempt, "seconds": round(seconds, 2)})
            print(json.dumps(results[-1]), flush=True)
    records = []
    for deterministic in (True, False):
        a, b = states[(deterministic, 0)], states[(deterministic, 1)]
        differing = [k for k in a if not torch.equal(a[k], b[k])]
        max_diff = max(((a[k].float() - b[k].float()).abs().max().item() for k in differing), default=0.0)
        records.append({"what": "rerun-identical", "model": "smollm2-135m", "method": "sparsegpt", "pattern": "0.5",
                        "reconstruction": "br+gp", "deterministic": deterministic, "identical": not differing,
                        "tensors_differing": len(differing), "max_abs_diff": max_diff,
                        "seconds": [r["seconds"] for r in results if r["deterministic"] == deterministic]})
        print(json.dumps(records[-1]), flush=True)
    atomic_write_json(args.out, {"machine": machine_name(device), "date": datetime.date.today().isoformat(),
                                 "command": "python " + " ".join(sys.argv), "records": records})


if __name__ == "__main__":
    main()
