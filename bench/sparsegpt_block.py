"""Time SparseGPT on one LLaMA-7B-shaped block: Hessian accumulation, our pruning, the reference's.

    python bench/sparsegpt_block.py --reference /path/to/sparsegpt.py --out bench/results/perf_sparsegpt_block.json
    python bench/sparsegpt_block.py --small --reference /tmp/ref_sparsegpt.py --out /tmp/perf_small.json  # CPU check

The block has 7 linears (q, k, v, o: hidden x hidden; gate, up: mlp x hidden; down: hidden x mlp)
with normal(0, 0.02) weights. Calibration activations (samples x seqlen tokens, stored in bf16 as a
model would hand them over) are synthetic but correlated: x = (z @ A) * s + mu with z, A Gaussian,
per-channel log-normal scales s and a few outlier channels (s x 20). There is one input per
Hessian: attn_in (q, k, v), o_in (o), mlp_in (gate, up), down_in (down).

1. Hessian: accumulation of x^T x in fp32, with TF32 matmuls, and from bf16 inputs with fp32
   output; relative Frobenius error against an fp64 accumulation of the same inputs, and the
   true output error (fp64 Hessian) of the first layer of the input pruned to 50% with each.
2. Pruning, per pattern: our ``sparsegpt_prune`` over the 7 linears (and ``sparsegpt_prune_shared``
   with one factorization per input), and the reference ``SparseGPT.fasterprune`` of
   IST-DASLab/sparsegpt (``--reference path/to/sparsegpt.py``, imported from that file, never
   committed here), given the same weights and the same fp32 Hessian (``H``, ``nsamples`` set
   directly). One warm-up each, device synchronized around every timing; the error is
   tr(dW H dW^T) summed over the layers, computed in fp64.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import io
import json
import platform
import sys
import time
import types
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import compressor.pruning.sparsegpt as sparsegpt  # noqa: E402
from compressor.io import atomic_write_json  # noqa: E402
from compressor.pruning.masks import achieved_sparsity  # noqa: E402
from compressor.pruning.sparsegpt import (  # noqa: E402
    gram_update,
    hessian_from_gram,
    sparsegpt_prune,
    sparsegpt_prune_shared,
)

INPUTS = {"attn_in": ("q", "k", "v"), "o_in": ("o",), "mlp_in": ("gate", "up"), "down_in": ("down",)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    """``(fn(), seconds)``, the device synchronized before and after."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def layer_shapes(hidden: int, mlp: int) -> dict[str, tuple[int, int]]:
    """``[out, in]`` of each linear of a LLaMA block."""
    return {"q": (hidden, hidden), "k": (hidden, hidden), "v": (hidden, hidden), "o": (hidden, hidden),
            "gate": (mlp, hidden), "up": (mlp, hidden), "down": (hidden, mlp)}


def activations(cols: int, tokens: int, chunk: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """``[tokens, cols]`` bf16 activations with correlated channels, uneven scales and outlier channels."""
    mix = torch.randn(cols, cols, generator=gen, device=device) / cols**0.5
    scale = torch.exp(0.5 * torch.randn(cols, generator=gen, device=device))
    outliers = torch.randperm(cols, generator=gen, device=device)[: max(2, cols // 512)]
    scale[outliers] *= 20.0
    mean = 0.1 * torch.randn(cols, generator=gen, device=device)
    x = torch.empty(tokens, cols, dtype=torch.bfloat16, device=device)
    for t0 in range(0, tokens, chunk):
        z = torch.randn(min(chunk, tokens - t0), cols, generator=gen, device=device)
        x[t0 : t0 + z.shape[0]] = (z @ mix) * scale + mean
    return x


def bf16_has_fp32_output(device: torch.device) -> bool:
    """Whether ``torch.mm`` multiplies bf16 into an fp32 output here (CUDA, recent PyTorch)."""
    x = torch.ones(4, 2, dtype=torch.bfloat16, device=device)
    try:
        torch.mm(x.t(), x, out_dtype=torch.float32)
        return True
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def accumulate(x: torch.Tensor, chunk: int, precision: str, fp32_out: bool = True) -> torch.Tensor:
    """The Hessian (2/n) sum x x^T of ``x`` ``[tokens, cols]``, summed in fp32 (fp64 for 'fp64').

    'fp32' and 'tf32' convert each chunk to fp32 (the project's ``gram_update``); 'bf16' multiplies
    the bf16 chunk, into an fp32 output where ``fp32_out``, else rounding the product to bf16.
    """
    cols = x.shape[1]
    gram = torch.zeros(cols, cols, device=x.device, dtype=torch.float64 if precision == "fp64" else torch.float32)
    with tf32(precision == "tf32"):
        for t0 in range(0, x.shape[0], chunk):
            part = x[t0 : t0 + chunk]
            if precision != "bf16":
                gram_update(gram, part)
            elif fp32_out:
                gram.add_(torch.mm(part.t(), part, out_dtype=torch.float32))
            else:
                gram.add_((part.t() @ part).float())
    return hessian_from_gram(gram, x.shape[0])


@contextlib.contextmanager
def tf32(enabled: bool):
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def recon_error(w: torch.Tensor, new_w: torch.Tensor, h: torch.Tensor) -> float:
    """tr(dW H dW^T) in fp64."""
    delta = (w - new_w).double()
    return torch.sum((delta @ h.double()) * delta).item()


def load_reference(path: str):
    """The ``SparseGPT`` class of the reference file, imported without the rest of its repository.

    The file imports ``quant`` (its quantizer, unused when pruning) and ``transformers`` (for one
    isinstance check) at the top: stand-ins take their place during the import. It also switches
    TF32 off globally; the previous settings are restored.
    """
    quant = types.ModuleType("quant")
    transformers = types.ModuleType("transformers")
    transformers.Conv1D = type("Conv1D", (), {})
    stand_ins = {"quant": quant, "transformers": transformers}
    saved = {name: sys.modules.get(name) for name in stand_ins}
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    sys.modules.update(stand_ins)
    try:
        spec = importlib.util.spec_from_file_location("reference_sparsegpt", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        for name, mod in saved.items():
            if mod is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = mod
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    return module.SparseGPT


@contextlib.contextmanager
def cpu_safe_cuda_synchronize(device: torch.device):
    """The reference calls torch.cuda.synchronize() unconditionally; make it a no-op on CPU runs."""
    if device.type == "cuda":
        yield
        return
    saved = torch.cuda.synchronize
    torch.cuda.synchronize = lambda *args, **kwargs: None
    try:
        yield
    finally:
        torch.cuda.synchronize = saved


def reference_prune(
    cls, w: torch.Tensor, h: torch.Tensor, n_tokens: int, pattern, device: torch.device
) -> tuple[torch.Tensor, float]:
    """Run the reference on a fresh ``nn.Linear`` holding ``w``; returns ``(new weight, seconds)``."""
    layer = nn.Linear(w.shape[1], w.shape[0], bias=False, device=device)
    layer.weight.data = w.clone()
    pruner = cls(layer)
    pruner.H = h.clone()  # fasterprune edits H in place
    pruner.nsamples = n_tokens
    sparsity, nm = pattern
    prunen, prunem = (nm[1] - nm[0], nm[1]) if nm else (0, 0)  # the reference's n counts pruned weights
    with contextlib.redirect_stdout(io.StringIO()), cpu_safe_cuda_synchronize(device):
        _, seconds = timed(lambda: pruner.fasterprune(sparsity, prunen=prunen, prunem=prunem,
                                                      blocksize=128, percdamp=0.01), device)
    return layer.weight.data.float(), seconds


def solve_rows_by_columns(rhs: torch.Tensor, c: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """Alternative to ``sparsegpt._solve_rows`` for ``--solver columns``: forward substitution one
    column at a time (two kernels a column, no per-row matrices)."""
    u = rhs.clone()
    e = torch.empty_like(rhs)
    for j in range(rhs.shape[1]):
        if j:
            u[:, j].addmv_(e[:, :j], upper[:j, j], alpha=-1)
        torch.mul(u[:, j], c[:, j], out=e[:, j])
    return u


@contextlib.contextmanager
def variant(leaf: int, solver: str):
    saved = sparsegpt.LEAF_COLUMNS, sparsegpt._solve_rows
    sparsegpt.LEAF_COLUMNS = leaf
    if solver == "columns":
        sparsegpt._solve_rows = solve_rows_by_columns
    try:
        yield
    finally:
        sparsegpt.LEAF_COLUMNS, sparsegpt._solve_rows = saved


def parse_pattern(text: str) -> tuple[float, tuple[int, int] | None]:
    if ":" in text:
        n, m = (int(v) for v in text.split(":"))
        return 0.0, (n, m)
    return float(text), None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--mlp", type=int, default=11008)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--chunk", type=int, default=8192, help="tokens per Hessian update")
    ap.add_argument("--small", action="store_true", help="hidden 256, MLP 688, 4 x 256 tokens (a CPU check)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--patterns", nargs="+", default=["0.5", "2:4"], help="sparsities and N:M patterns")
    ap.add_argument("--reference", help="path to sparsegpt.py of IST-DASLab/sparsegpt")
    ap.add_argument("--leaf", type=int, nargs="+", default=[sparsegpt.LEAF_COLUMNS],
                    help="LEAF_COLUMNS values to time (the first gives the headline figures)")
    ap.add_argument("--solver", nargs="+", default=["trsm"], choices=["trsm", "columns"],
                    help="within-leaf solver(s) to time: batched triangular solve or column substitution")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/results/perf_sparsegpt_block.json")
    args = ap.parse_args()
    if args.small:
        args.hidden, args.mlp, args.samples, args.seqlen, args.chunk = 256, 688, 4, 256, 256
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 pruning math for both implementations
    model = "llama-7b-shape" if (args.hidden, args.mlp) == (4096, 11008) else f"hidden{args.hidden}-mlp{args.mlp}"
    n_tokens = args.samples * args.seqlen
    tokens = f"{args.samples} x {args.seqlen}"
    shapes = layer_shapes(args.hidden, args.mlp)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    weights = {name: 0.02 * torch.randn(*shape, generator=gen, device=device) for name, shape in shapes.items()}
    records = []

    def emit(rec: dict) -> None:
        print(json.dumps(rec), flush=True)
        records.append(rec)

    # 1. Hessians, one input at a time (the activations of the MLP's down input are the largest)
    fp32_out = bf16_has_fp32_output(device)
    hessians: dict[str, torch.Tensor] = {}
    for inp, names in INPUTS.items():
        cols = shapes[names[0]][1]
        x = activations(cols, n_tokens, args.chunk, gen, device)
        exact = accumulate(x, args.chunk, "fp64")
        w = weights[names[0]]
        base_error = None
        for precision in ("fp32", "tf32", "bf16"):
            accumulate(x[: args.chunk], args.chunk, precision, fp32_out)  # warm-up
            h, seconds = timed(lambda: accumulate(x, args.chunk, precision, fp32_out), device)
            new_w, _ = sparsegpt_prune(w, h, 0.5)
            error = recon_error(w, new_w, exact)
            base_error = base_error or error
            rec = {"model": model, "what": "hessian", "input": inp, "cols": cols, "tokens": tokens,
                   "precision": precision, "seconds": round(seconds, 4),
                   "relative_error": (torch.linalg.norm(h.double() - exact) / torch.linalg.norm(exact)).item(),
                   "pruned_layer": names[0], "pruned_error": error, "pruned_error_ratio_vs_fp32": error / base_error}
            if precision == "tf32" and device.type != "cuda":
                rec["note"] = "TF32 only exists on CUDA: same as fp32 here"
            if precision == "bf16":
                rec["note"] = ("bf16 inputs, fp32 matmul output" if fp32_out
                               else "bf16 inputs, bf16 matmul output added in fp32 (no fp32-output bf16 mm here)")
            emit(rec)
            if precision == "fp32":
                hessians[inp] = h
        del x, exact
        if device.type == "cuda":
            torch.cuda.empty_cache()
    hessian_of = {name: inp for inp, names in INPUTS.items() for name in names}

    # 2. Pruning: ours (per layer, shared factorization, variants), then the reference
    reference = None
    if args.reference and Path(args.reference).is_file():
        reference = load_reference(args.reference)
    else:
        print(f"reference {args.reference!r} not found: timing ours only" if args.reference
              else "no --reference given: timing ours only", flush=True)
    variants = [(leaf, solver) for leaf in args.leaf for solver in args.solver]
    for text in args.patterns:
        sparsity, nm = pattern = parse_pattern(text)
        per_layer: dict[str, dict] = {name: {} for name in shapes}
        variant_seconds = []
        for i, (leaf, solver) in enumerate(variants):
            with variant(leaf, solver):
                sparsegpt_prune(weights["q"], hessians["attn_in"], sparsity, nm)  # warm-up
                total = 0.0
                for name, w in weights.items():
                    (new_w, mask), seconds = timed(lambda: sparsegpt_prune(w, hessians[hessian_of[name]], sparsity, nm),
                                                   device)
                    total += seconds
                    if i == 0:
                        per_layer[name].update(seconds=seconds, error=recon_error(w, new_w, hessians[hessian_of[name]]),
                                               sparsity=achieved_sparsity(mask))
                        per_layer[name]["_new"] = new_w
            variant_seconds.append({"leaf": leaf, "solver": solver, "seconds": total})
        seconds = variant_seconds[0]["seconds"]

        # one factorization and one pass per input
        shared_total, shared_diff = 0.0, 0.0
        for inp, names in INPUTS.items():
            results, t = timed(lambda: sparsegpt_prune_shared([weights[n] for n in names], hessians[inp], sparsity, nm),
                               device)
            shared_total += t
            for name, (new_w, _) in zip(names, results):
                shared_diff = max(shared_diff, (new_w - per_layer[name]["_new"]).abs().max().item())
        rec = {"model": model, "what": "sparsegpt-block", "pattern": text, "tokens": tokens,
               "seconds": round(seconds, 4), "shared_seconds": round(shared_total, 4), "shared_max_abs_diff": shared_diff}
        if len(variants) > 1:
            rec["variants"] = [dict(v, seconds=round(v["seconds"], 4)) for v in variant_seconds]

        if reference is not None:
            _, _ = reference_prune(reference, weights["q"], hessians["attn_in"], n_tokens, pattern, device)  # warm-up
            for name, w in weights.items():
                new_w, t = reference_prune(reference, w, hessians[hessian_of[name]], n_tokens, pattern, device)
                per_layer[name].update(reference_seconds=t,
                                       reference_error=recon_error(w, new_w, hessians[hessian_of[name]]),
                                       reference_sparsity=achieved_sparsity(new_w != 0))
            ref_seconds = sum(v["reference_seconds"] for v in per_layer.values())
            error = sum(v["error"] for v in per_layer.values())
            ref_error = sum(v["reference_error"] for v in per_layer.values())
            rec.update(reference_seconds=round(ref_seconds, 4), speedup_vs_reference=round(ref_seconds / seconds, 2),
                       shared_speedup_vs_reference=round(ref_seconds / shared_total, 2),
                       error=error, reference_error=ref_error, error_ratio=error / ref_error,
                       error_within_1pct=error / ref_error <= 1.01)
        else:
            rec["error"] = sum(v["error"] for v in per_layer.values())
        for v in per_layer.values():
            v.pop("_new")
            for key in ("seconds", "reference_seconds"):
                if key in v:
                    v[key] = round(v[key], 4)
        rec["layers"] = per_layer
        emit(rec)

    if device.type == "cuda":
        machine = torch.cuda.get_device_name(device)
    else:
        machine = f"cpu ({platform.processor() or platform.machine()})"
    atomic_write_json(args.out, {"machine": machine, "date": datetime.date.today().isoformat(),
                                 "command": "python " + " ".join(sys.argv), "records": records})
    print(f"wrote {args.out}")
    for r in records:
        if r["what"] == "sparsegpt-block":
            print(f"{r['pattern']:>5}: ours {r['seconds']:.3f}s (shared {r['shared_seconds']:.3f}s)"
                  + (f", reference {r['reference_seconds']:.3f}s, speedup {r['speedup_vs_reference']}x, "
                     f"error ratio {r['error_ratio']:.4f}" if "reference_seconds" in r else ""))


if __name__ == "__main__":
    main()
