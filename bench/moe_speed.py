"""Speed of the expert-compute MoE FFN against the dense FFN it came from (LLaMA-7B shape by default).

    python bench/moe_speed.py                       # GPU: d=4096, d_ff=11008, E=64, bf16
    python bench/moe_speed.py --smoke               # CPU, tiny shape: proves the script runs

Random weights (the split is contiguous: speed does not depend on which neurons share an expert),
a random router (its cost is counted: it runs inside the MoE forward), mean replacement. For each k:
batch-1 decode (one token) and a prefill batch, the dense SwiGLU FFN and ``MoEFFN.forward_experts``
timed side by side, interleaved, with CUDA events (median of ``--iters``); decode also under CUDA
graphs (launch overhead removed for both). The masked form is timed once as the reference's cost.
Writes bench/results/moe_speed.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timing import call_times_ms  # noqa: E402

from compressor.io import write_bench_results  # noqa: E402
from compressor.moe.ffn import ffn_spec  # noqa: E402
from compressor.moe.module import MoEFFN  # noqa: E402
from compressor.moe.stats import ffn_flops_fraction  # noqa: E402


class SwiGLU(nn.Module):
    def __init__(self, d: int, d_ff: int):
        super().__init__()
        self.gate_proj = nn.Linear(d, d_ff, bias=False)
        self.up_proj = nn.Linear(d, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def timer(fn, iters: int, device: torch.device) -> list[float]:
    """Milliseconds per call, one sample per call."""
    return call_times_ms(fn, iters, device)


def graphed(fn, device: torch.device):
    """``fn`` replayed from a CUDA graph (static input captured inside ``fn``)."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def side_by_side(fns: dict, iters: int, device, rounds: int = 5) -> dict[str, float]:
    """Median ms of each function, measured in interleaved rounds."""
    samples = {k: [] for k in fns}
    for fn in fns.values():
        timer(fn, 3, device)  # warm-up
    for _ in range(rounds):
        for k, fn in fns.items():
            samples[k] += timer(fn, max(1, iters // rounds), device)
    return {k: statistics.median(v) for k, v in samples.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--d-ff", type=int, default=11008)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--ks", type=int, nargs="*", default=[8, 16, 32, 48, 56, 64])
    ap.add_argument("--prefill", type=int, default=4096, help="tokens of the prefill batch")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph decode timings")
    ap.add_argument("--smoke", action="store_true", help="tiny shape on the CPU")
    ap.add_argument("--out", default="bench/results/moe_speed.json")
    args = ap.parse_args()
    if args.smoke:
        args.d, args.d_ff, args.experts, args.ks, args.prefill, args.iters = 64, 352, 16, [4, 8, 12, 16], 64, 10
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    dense = SwiGLU(args.d, args.d_ff).to(device, dtype).eval()
    e, m = args.experts, args.d_ff // args.experts
    assignment = torch.arange(args.d_ff) // m
    moe = MoEFFN(dense, ffn_spec("llama"), assignment, 0.01 * torch.randn(args.d_ff), torch.randn(e, args.d),
                 torch.eye(e), args.experts).to(device)
    moe.expert_compute = True
    moe.pack()
    from compressor.moe.module import _GROUPED_MM_OK

    records = []
    for tokens, label in ((1, "decode"), (args.prefill, "prefill")):
        x = torch.randn(tokens, args.d, device=device, dtype=dtype)
        for k in args.ks:
            moe.k = k
            with torch.no_grad():
                fns = {"dense": lambda: dense(x), "experts": lambda: moe(x)}
                if k == args.ks[0]:
                    moe.expert_compute = False
                    fns["masked"] = lambda: moe(x)
                    times = side_by_side({"masked": fns.pop("masked")}, args.iters // 4, device)
                    moe.expert_compute = True
                    masked_ms = times["masked"]
                times = side_by_side(fns, args.iters, device)
                rec = {"model": "llama-7b-shape" if args.d == 4096 else f"d{args.d}-ff{args.d_ff}",
                       "what": "moe-ffn-forward", "phase": label, "tokens": tokens, "dtype": args.dtype,
                       "d": args.d, "d_ff": args.d_ff, "experts": e, "k": k, "active_fraction": k / e,
                       "ffn_flops_fraction": ffn_flops_fraction(args.d, args.d_ff, e, k, gated=True),
                       "dense_ms": times["dense"], "experts_ms": times["experts"],
                       "speedup": times["dense"] / times["experts"], "masked_ms_at_first_k": masked_ms,
                       "grouped_mm": _GROUPED_MM_OK.get((device.type, dtype)), "graphs": False}
                records.append(rec)
                print(f"{label:<8} k={k:>3}/{e} dense {times['dense']:.4f} ms  experts {times['experts']:.4f} ms  "
                      f"speedup {rec['speedup']:.2f}x  (FLOPs {rec['ffn_flops_fraction']:.3f})", flush=True)
                if label == "decode" and device.type == "cuda" and not args.no_graphs:
                    g = side_by_side({"dense": graphed(fns["dense"], device),
                                      "experts": graphed(fns["experts"], device)}, args.iters, device)
                    records.append({**rec, "dense_ms": g["dense"], "experts_ms": g["experts"],
                                    "speedup": g["dense"] / g["experts"], "graphs": True})
                    print(f"{'  graphs':<8} k={k:>3}/{e} dense {g['dense']:.4f} ms  experts {g['experts']:.4f} ms  "
                          f"speedup {g['dense'] / g['experts']:.2f}x", flush=True)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    write_bench_results(args.out, machine, records)
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
