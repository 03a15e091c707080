"""G-MoEfication on the shared SmolLM2 protocol: perplexity against the active fraction k/E.

    python bench/protocol_moe.py --model SmolLM2-135M-Instruct.Q4_1.gguf --data DATA_DIR
    python bench/protocol_moe.py --smoke --data ../shared/data      # CPU, tiny: proves the script runs
    python bench/protocol_moe.py --write-assignment assign.safetensors   # k-means only (CPU), for another machine

Calibration: the protocol's 128 x 2048 windows of wiki.valid.tokens (seed 0); mu from all 262,144
tokens per block, routers trained on ``--router-tokens`` of them (default 65,536: 30 epochs stay
~3,500 Adam steps of 512 tokens per block). Evaluation: wiki.test.raw in 2048-token windows.
For each base model (dense; 50% SparseGPT, pruned first) the routers are trained once, then every
k in ``--fractions`` x variant (mean = G-MoEfication, zero = MoEfication's zero-out with the same
router, random = random experts with mean replacement) is measured by switching the converted
FFNs in place. ``--untrained`` adds the centroid-initialised router (no training) with mean
replacement. Records: experts, k, variant, ppl, ffn_flops_fraction (+ router recall and times per
block); writes bench/results/protocol_moe.json and a plot of ppl against k/E beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compressor.config import CalibrationConfig, ModelConfig, PruningConfig, RuntimeConfig  # noqa: E402
from compressor.data.calibration import calibration_windows, evaluation_windows  # noqa: E402
from compressor.evaluation import perplexity  # noqa: E402
from compressor.io import atomic_write, write_bench_results  # noqa: E402
from compressor.models.adapters import ModelAdapter  # noqa: E402
from compressor.models.loading import load_model  # noqa: E402
from compressor.moe import MoEConfig, detach_moe, set_moe  # noqa: E402
from compressor.moe.convert import convert_model, split_all  # noqa: E402
from compressor.moe.ffn import ffn_module, ffn_spec, ffn_width  # noqa: E402
from compressor.moe.stats import ffn_flops_fraction  # noqa: E402
from compressor.pipeline import machine_name  # noqa: E402
from compressor.sequential import SequentialPruner  # noqa: E402


def tiny_model(tokenizer):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=512)
    return AutoModelForCausalLM.from_config(cfg).eval()


def write_assignment(model, cfg: MoEConfig, path: str) -> None:
    """Balanced k-means of every block (on this machine's CPU), saved as ``<block>.<ffn>.assignment``."""
    from safetensors.torch import save_file

    adapter = ModelAdapter(model)
    spec = ffn_spec(adapter.model_type)
    t = time.perf_counter()
    splits = split_all(adapter, spec, cfg)
    tensors = {f"{adapter.block_path}.{i}.{spec.path}.assignment": a.contiguous() for i, (a, _) in enumerate(splits)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"experts": str(cfg.experts),
                                                                      "seed": str(cfg.seed)}))
    print(f"k-means of {len(splits)} blocks in {time.perf_counter() - t:.1f}s: written {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="'smollm2' (installed package) or a path to the GGUF file")
    ap.add_argument("--data", default="../shared/data", help="folder holding wikitext-2/ and wikitext-2-raw/")
    ap.add_argument("--out", default="bench/results/protocol_moe.json")
    ap.add_argument("--bases", nargs="*", default=["dense", "sparsegpt"], help="dense and/or sparsegpt (50%%)")
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--fractions", type=float, nargs="*", default=[0.25, 0.5, 0.75, 0.875])
    ap.add_argument("--variants", nargs="*", default=["mean", "zero", "random"])
    ap.add_argument("--untrained", action="store_true", help="also the centroid-initialised router (mean replacement)")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--router-tokens", type=int, default=65536)
    ap.add_argument("--target-norm", default="batch", help="router targets over the batch max (batch) or per token")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8, help="calibration windows per block forward")
    ap.add_argument("--kmeans-jobs", type=int, default=-1, help="blocks clustered in parallel (-1: all cores)")
    ap.add_argument("--assignment", default=None, help="experts from this file (--write-assignment) instead of k-means")
    ap.add_argument("--write-assignment", default=None, help="only run the k-means (dense model) and write this file")
    ap.add_argument("--max-windows", type=int, default=None, help="evaluate fewer windows (smoke runs only)")
    ap.add_argument("--append", action="store_true", help="add to the records already in --out")
    ap.add_argument("--smoke", action="store_true", help="tiny random Llama, the model's tokenizer, CPU, small data")
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    data = Path(args.data)
    calib_file = str(data / "wikitext-2" / "wiki.valid.tokens")
    eval_file = str(data / "wikitext-2-raw" / "wiki.test.raw")
    model, tokenizer = load_model(ModelConfig(name_or_path=args.model))
    if args.smoke:
        model = tiny_model(tokenizer)
        args.samples, args.seqlen, args.experts, args.epochs, args.router_tokens = 4, 128, 8, 2, 0
        args.max_windows = args.max_windows or 2
    cfg = MoEConfig(enabled=True, experts=args.experts, k=args.experts, epochs=args.epochs,
                    router_tokens=args.router_tokens, kmeans_jobs=args.kmeans_jobs, assignment=args.assignment,
                    target_norm=args.target_norm)
    if args.write_assignment:
        write_assignment(model, cfg, args.write_assignment)
        return
    calib = calibration_windows(CalibrationConfig(sources=[calib_file], num_samples=args.samples, seqlen=args.seqlen,
                                                  seed=0), model, tokenizer, args.model)
    windows = evaluation_windows(eval_file, args.seqlen, tokenizer, max_windows=args.max_windows)
    spec = ffn_spec(model.config.model_type)
    block0 = ffn_module(ModelAdapter(model).blocks[0], spec)
    d = model.config.hidden_size
    d_ff = ffn_width(block0, spec)
    dense_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    records = []
    if args.append and Path(args.out).is_file():
        records = json.loads(Path(args.out).read_text())["records"]
    common = {"model": "smollm2-135m" if not args.smoke else "tiny-llama", "eval_windows": int(windows.shape[0]),
              "calibration": f"{args.samples} x {args.seqlen}", "router_tokens": args.router_tokens or None,
              "epochs": args.epochs, "target_norm": args.target_norm,
              # with --assignment every base (the pruned one too) uses those experts, found on the dense weights
              "experts_from": f"file {Path(args.assignment).name}" if args.assignment else "k-means of these weights"}

    def measure(desc: str) -> float:
        return perplexity(model, windows, device, progress=False, desc=desc)

    def save(note: str = "") -> None:
        write_bench_results(args.out, machine_name(device), records)
        if note:
            print(note, flush=True)

    for base in args.bases:
        model.load_state_dict(dense_state)
        model.to(device)
        pruning, t = "none", time.perf_counter()
        if base == "sparsegpt":
            pruning = "sparsegpt:0.5"
            SequentialPruner(model, PruningConfig(method="sparsegpt", sparsity=0.5),
                             RuntimeConfig(batch_size=args.batch_size, track_error=False), device,
                             keep_masks=False).run(calib, progress=False)
        prune_seconds = time.perf_counter() - t
        base_ppl = measure(base)
        records.append({**common, "pruning": pruning, "experts": None, "k": None, "variant": "dense",
                        "active_fraction": 1.0, "ppl": base_ppl, "ffn_flops_fraction": 1.0,
                        "prune_seconds": round(prune_seconds, 2)})
        save(f"{base}: ppl {base_ppl:.3f}")
        runs = [("trained", cfg)]
        if args.untrained:
            runs.append(("untrained", dataclasses.replace(cfg, train_router=False)))
        for router_kind, run_cfg in runs:
            detach_moe(model)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            blocks = convert_model(model, calib, run_cfg, device, args.batch_size, progress=True)
            convert_seconds = time.perf_counter() - t
            router_info = {"router": router_kind, "convert_seconds": round(convert_seconds, 2),
                           "kmeans_seconds": round(sum(b["kmeans_seconds"] for b in blocks), 2),
                           "router_train_seconds": round(sum(b["router"]["seconds"] for b in blocks), 2),
                           "router_recall_mean": sum(b["router"]["recall"] for b in blocks) / len(blocks),
                           "per_block_router_seconds": [round(b["router"]["seconds"], 3) for b in blocks],
                           "per_block_recall": [round(b["router"]["recall"], 4) for b in blocks],
                           "per_block_recall_init": [round(b["router"]["recall_init"], 4) for b in blocks]}
            print(f"{base} {router_kind}: converted in {convert_seconds:.1f}s (k-means "
                  f"{router_info['kmeans_seconds']}s, routers {router_info['router_train_seconds']}s), mean recall "
                  f"{router_info['router_recall_mean']:.3f}",
                  flush=True)
            variants = args.variants if router_kind == "trained" else ["mean"]
            for fraction in args.fractions:
                k = max(1, round(fraction * args.experts))
                for variant in variants:
                    set_moe(model, k=k, variant=variant)
                    ppl = measure(f"{base} k={k} {variant}")
                    records.append({**common, "pruning": pruning, "experts": args.experts, "k": k, "variant": variant,
                                    "active_fraction": k / args.experts, "ppl": ppl,
                                    "ffn_flops_fraction": ffn_flops_fraction(d, d_ff, args.experts, k, spec.gated),
                                    **router_info})
                    save(f"{base} {router_kind} k={k}/{args.experts} {variant}: ppl {ppl:.3f} "
                         f"(dense {base_ppl:.3f})")
        detach_moe(model)
    plot(records, Path(args.out).with_suffix(".png"))
    print(f"written {args.out}")


def plot(records: list[dict], path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for pruning in sorted({r["pruning"] for r in records}):
        dense = [r for r in records if r["pruning"] == pruning and r["variant"] == "dense"]
        for variant in ("mean", "zero", "random"):
            for router in ("trained", "untrained"):
                pts = sorted((r["active_fraction"], r["ppl"]) for r in records if r["pruning"] == pruning
                             and r["variant"] == variant and r.get("router") == router)
                if pts:
                    ax.plot(*zip(*pts), "o-", label=f"{pruning} {variant}{'' if router == 'trained' else ' untrained'}")
        if dense:
            ax.axhline(dense[-1]["ppl"], ls=":", color="gray")
    ax.set_xlabel("active experts k/E")
    ax.set_ylabel("perplexity (wiki.test.raw)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
