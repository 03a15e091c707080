"""How much of zero-out's error can mean replacement remove, with the best possible router?

G-MoEfication replaces an unselected neuron's activation by its calibration mean mu instead of zero
(Lee et al., EMNLP 2024). Whatever the router, at a given selection the FFN output errors are
``zero: down(a * unselected)`` and ``mean: down((a - mu) * unselected)``, so the gain of the mean is
bounded by how far the activations sit from zero. This measures it per block on the real model with an
oracle router (per token the top-k experts by the true target mass sum (a_i - mu_i)^2, what the trained
router imitates) and with a noisy oracle of lower recall, at the expert split the protocol run used:

    python bench/moe_mean_bound.py            # SmolLM2, 4 x 512 tokens of wiki.valid.tokens, CPU: ~1 min

Records per block: ``mu_to_rms`` (mean |mu_i| over the activations' RMS), the relative output error
``||out - dense||^2 / ||dense||^2`` of zero-out and of mean replacement, and ``removed`` (1 - mean/zero).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compressor.config import CalibrationConfig, ModelConfig  # noqa: E402
from compressor.data.calibration import calibration_windows  # noqa: E402
from compressor.io import write_bench_results  # noqa: E402
from compressor.models.adapters import ModelAdapter  # noqa: E402
from compressor.models.loading import load_model  # noqa: E402
from compressor.moe.ffn import activation, ffn_module, ffn_spec  # noqa: E402
from compressor.moe.stats import expert_sums  # noqa: E402
from compressor.pipeline import machine_name  # noqa: E402


def output_error(a, mu, w, keep) -> float:
    """Relative error of the FFN output when unselected neurons (``keep`` False) take ``mu`` (None: zero)."""
    ref = a @ w.T
    out = torch.where(keep, a, mu.expand_as(a) if mu is not None else torch.zeros_like(a)) @ w.T
    return float(((out - ref) ** 2).sum() / (ref**2).sum())


def block_record(a: torch.Tensor, w: torch.Tensor, assignment: torch.Tensor, experts: int, k: int,
                 noise: float, seed: int) -> dict:
    """``a`` activations entering the down projection ``[tokens, d_ff]``, ``w`` its weight ``[d, d_ff]``."""
    mu = a.mean(0)
    s = expert_sums((a - mu) ** 2, assignment, experts)  # [tokens, E]: the router's target mass
    rec = {"mu_to_rms": float(mu.abs().mean() / a.pow(2).mean().sqrt())}
    g = torch.Generator().manual_seed(seed)
    scores = {"oracle": s, "noisy_oracle": s / s.amax(1, keepdim=True) + noise * torch.rand(s.shape, generator=g)}
    for name, score in scores.items():
        chosen = torch.zeros_like(s, dtype=torch.bool).scatter_(1, score.topk(k, dim=1).indices, True)
        keep = chosen[:, assignment]
        zero, mean = output_error(a, None, w, keep), output_error(a, mu, w, keep)
        top = s.topk(max(1, round(0.2 * experts)), dim=1).indices  # recall of the target mass in the top 20%
        picked = score.topk(top.shape[1], dim=1).indices
        recall = float(s.gather(1, picked).sum() / s.gather(1, top).sum())
        rec[name] = {"zero": zero, "mean": mean, "removed": 1 - mean / zero, "recall_top20": recall}
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--assignment", default="bench/results/moe_assignment_smollm2_e64.safetensors",
                    help="the experts of the protocol run (model.layers.<i>.mlp.assignment)")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--k", type=int, default=48)
    ap.add_argument("--noise", type=float, default=0.35, help="noisy oracle: uniform noise on normalised targets")
    ap.add_argument("--out", default="bench/results/moe_mean_bound.json")
    args = ap.parse_args()
    from safetensors.torch import load_file

    model, tokenizer = load_model(ModelConfig(name_or_path=args.model))
    text = str(Path(args.data) / "wikitext-2" / "wiki.valid.tokens")
    calib = calibration_windows(CalibrationConfig(sources=[text], num_samples=args.windows, seqlen=args.seqlen),
                                model, tokenizer, "bench")
    spec, adapter = ffn_spec(model.config.model_type), ModelAdapter(model)
    assignments = load_file(args.assignment)
    inputs: dict[int, torch.Tensor] = {}
    hooks = [ffn_module(b, spec).register_forward_hook(
        lambda m, args_, out, i=i: inputs.__setitem__(i, args_[0].detach().reshape(-1, args_[0].shape[-1])))
        for i, b in enumerate(adapter.blocks)]
    with torch.no_grad():
        model(calib)
    for h in hooks:
        h.remove()
    records = []
    for i, block in enumerate(adapter.blocks):
        ffn = ffn_module(block, spec)
        with torch.no_grad():
            a = activation(ffn, spec, inputs.pop(i)).float()
            w = getattr(ffn, spec.down).weight.float()
            rec = block_record(a, w, assignments[f"{adapter.block_path}.{i}.{spec.path}.assignment"].long(),
                               args.experts, args.k, args.noise, i)
        records.append({"block": i, **rec})
        o, n = rec["oracle"], rec["noisy_oracle"]
        print(f"block {i:2d}  |mu|/rms {rec['mu_to_rms']:.3f}  oracle: zero {o['zero']:.4f} mean {o['mean']:.4f} "
              f"removed {o['removed']:6.1%}  |  noisy (recall {n['recall_top20']:.2f}): removed {n['removed']:6.1%}",
              flush=True)
    for name in ("oracle", "noisy_oracle"):
        zero = sum(r[name]["zero"] for r in records)
        mean = sum(r[name]["mean"] for r in records)
        print(f"{name}: summed over blocks, mean replacement removes {1 - mean / zero:.1%} of zero-out's error")
    common = {"model": args.model, "tokens": int(calib.numel()), "experts": args.experts, "k": args.k}
    write_bench_results(args.out, machine_name(torch.device("cpu")), [{**common, **r} for r in records])
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
