"""A real W8A8 linear (int8 x int8 -> int32 GEMM, ``torch._int_mm``) against bf16, on LLaMA-7B layer shapes.

    python bench/int8_gemm.py                         # GPU: 7B shapes, tokens 32..8192, bench/results/int8_gemm.json
    python bench/int8_gemm.py --smoke                 # CPU: small shapes, proves the path and the numerics

The int8 linear is what the W8A8 stage's saved scales allow (compressor.quant.w8a8): activations asymmetric
per-tensor static (scale ``s_x``, zero point ``z``), weights symmetric per output channel (``s_w``):

    y = s_x * s_w[n] * sum_k (q_x[k] - z) * q_w[n, k] = s_x * s_w[n] * (q_x' @ q_w^T - z' * sum_k q_w[n, k])

with the uint8 codes shifted into int8 (``q_x' = q_x - 128``, ``z' = z - 128``) and the weight column sums
precomputed. Timed, per shape and token count, in one run with CUDA events (median of ``--reps``): the bf16
``F.linear``, the int8 GEMM alone, and the whole int8 linear (quantize the bf16 input, GEMM, dequantize to bf16).
The int8 output is checked against the fake-quant reference in fp32.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timing import call_times_ms  # noqa: E402

from compressor.io import write_bench_results  # noqa: E402
from compressor.pipeline import machine_name  # noqa: E402
from compressor.quant.activations import fake_quant, quant_params, quantize_weight, weight_params  # noqa: E402

SHAPES_7B = [(4096, 4096), (4096, 11008), (11008, 4096)]  # (in, out): q/k/v/o, gate/up, down
TOKENS = [32, 128, 512, 2048, 8192]


class Int8Linear:
    """``y = x W^T`` with int8 weights (symmetric per output channel) and per-tensor static asymmetric int8 inputs."""

    def __init__(self, weight: torch.Tensor, x_scale: torch.Tensor, x_zero: torch.Tensor):
        s_w = weight_params(weight, 8)  # [out, 1]
        self.wq = quantize_weight(weight, s_w).t().contiguous()  # [in, out] int8, the GEMM's right operand
        self.scale = (x_scale * s_w.squeeze(1)).float()  # [out]
        self.zero = int(x_zero) - 128
        self.inv_x_scale = float(1.0 / x_scale)
        self.correction = (self.zero * self.wq.sum(0, dtype=torch.int32)).to(torch.int32)  # [out]

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(torch.round(x.float() * self.inv_x_scale) + self.zero, -128, 127).to(torch.int8)

    def gemm(self, xq: torch.Tensor) -> torch.Tensor:
        return torch._int_mm(xq, self.wq)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        acc = self.gemm(self.quantize(x))
        return ((acc - self.correction).float() * self.scale).to(x.dtype)


def timer(fn, device: torch.device, reps: int, warmup: int = 5) -> float:
    """Median milliseconds of ``fn()`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    return statistics.median(call_times_ms(fn, reps, device))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, small shapes (256x256, 256x688, 688x256)")
    ap.add_argument("--tokens", type=int, nargs="*", default=None)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--out", default="bench/results/int8_gemm.json")
    args = ap.parse_args()
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    shapes = [(256, 256), (256, 688), (688, 256)] if args.smoke else SHAPES_7B
    tokens = args.tokens or ([32, 128] if args.smoke else TOKENS)
    reps = min(args.reps, 5) if args.smoke else args.reps
    dtype = torch.bfloat16
    g = torch.Generator(device="cpu").manual_seed(0)
    records = []
    print(f"{'in x out':>12} {'tokens':>6} {'bf16 ms':>9} {'int8 GEMM ms':>13} {'int8 linear ms':>15} "
          f"{'GEMM x':>7} {'linear x':>9} {'rel err':>8}")
    for cols, rows in shapes:
        weight = (torch.randn(rows, cols, generator=g) / cols**0.5).to(device)
        w_bf16 = weight.to(dtype)
        for n in tokens:
            x = torch.randn(n, cols, generator=g).to(device)
            x[:, :4] *= 20  # a few outlier channels, as LLM activations have
            s, z = quant_params(x, "per_tensor_static")  # calibrated once (static), here on the input itself
            lin = Int8Linear(weight, s, z)
            xb = x.to(dtype)
            xq = lin.quantize(xb)
            ref = fake_quant(xb.float(), s, z) @ (lin.wq.float().t() * (lin.scale / s).unsqueeze(1)).t()
            y = lin(xb).float()
            rel = float((y - ref).norm() / ref.norm())
            t_bf16 = timer(lambda: F.linear(xb, w_bf16), device, reps)
            t_gemm = timer(lambda: lin.gemm(xq), device, reps)
            t_lin = timer(lambda: lin(xb), device, reps)
            rec = {"in": cols, "out": rows, "tokens": n, "bf16_ms": round(t_bf16, 4), "int8_gemm_ms": round(t_gemm, 4),
                   "int8_linear_ms": round(t_lin, 4), "gemm_speedup": round(t_bf16 / t_gemm, 3),
                   "linear_speedup": round(t_bf16 / t_lin, 3), "rel_error_vs_fake_quant": rel,
                   "bf16_tflops": round(2 * n * cols * rows / t_bf16 / 1e9, 2),
                   "int8_tops": round(2 * n * cols * rows / t_gemm / 1e9, 2)}
            records.append(rec)
            print(f"{cols:>5} x {rows:<5} {n:>6} {t_bf16:>9.4f} {t_gemm:>13.4f} {t_lin:>15.4f} "
                  f"{rec['gemm_speedup']:>7.2f} {rec['linear_speedup']:>9.2f} {rel:>8.1e}")
            assert rel < 1e-2, f"int8 linear disagrees with the fake-quant reference: {rel}"
    path = write_bench_results(args.out, machine_name(device), records)
    print(f"written {path}")


if __name__ == "__main__":
    main()
