"""Magnitude and Wanda masks on LLaMA-7B-shaped weights, beside a memory-bound floor measured in the same run.

    python bench/mask_speed.py --out bench/results/perf_masks.json

For every weight of one block (q/k/v/o 4096 x 4096, gate/up 11008 x 4096, down 4096 x 11008, bf16,
normal(0, 0.02)), times the project's ``magnitude_mask`` and ``wanda_mask`` (50% and 2:4) and, as
the floor, one elementwise pass that reads the weight and writes a bool mask (``|W| > t``): the
least any mask needs to move through memory. ``vs_floor`` is our time over the floor's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compressor.io import write_bench_results  # noqa: E402
from compressor.pipeline import machine_name  # noqa: E402
from compressor.pruning.masks import magnitude_mask, wanda_mask  # noqa: E402

SHAPES = {"q/k/v/o": (4096, 4096), "gate/up": (11008, 4096), "down": (4096, 11008)}
COUNT = {"q/k/v/o": 4, "gate/up": 2, "down": 1}


def timed(fn, device, repeat: int = 5) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / repeat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    gen = torch.Generator(device=device).manual_seed(0)
    records = []
    totals: dict[str, float] = {}
    for kind, (rows, cols) in SHAPES.items():
        w = torch.empty(rows, cols, device=device, dtype=torch.bfloat16).normal_(0, 0.02, generator=gen)
        norms = torch.rand(cols, device=device, generator=gen) * 100
        floor = timed(lambda: w.abs() > 0.01, device)
        cases = {"magnitude 50%": lambda: magnitude_mask(w, 0.5), "magnitude 2:4": lambda: magnitude_mask(w, 0.5, (2, 4)),
                 "wanda 50%": lambda: wanda_mask(w, norms, 0.5), "wanda 2:4": lambda: wanda_mask(w, norms, 0.5, (2, 4))}
        for name, fn in cases.items():
            s = timed(fn, device)
            totals[name] = totals.get(name, 0.0) + s * COUNT[kind]
            rec = {"model": "llama-7b-shape", "what": "mask", "layer": kind, "shape": [rows, cols], "criterion": name,
                   "seconds": round(s, 6), "floor_seconds": round(floor, 6), "vs_floor": round(s / floor, 1),
                   "weight_gb_per_s": round(w.numel() * w.element_size() / s / 1e9, 1)}
            print(json.dumps(rec), flush=True)
            records.append(rec)
    for name, s in totals.items():
        rec = {"model": "llama-7b-shape", "what": "mask-block", "criterion": name, "seconds": round(s, 5),
               "note": "7 linears of one block"}
        print(json.dumps(rec), flush=True)
        records.append(rec)
    if args.out:
        write_bench_results(args.out, machine_name(device), records)


if __name__ == "__main__":
    main()
