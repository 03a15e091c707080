"""W8A8 on the shared SmolLM2 protocol: FP and each activation granularity, with and without SmoothQuant.

    python bench/protocol_w8a8.py --data ../shared/data
    python bench/protocol_w8a8.py --model $HOME/stage/SmolLM2-135M-Instruct.Q4_1.gguf --data $HOME/stage/data
    python bench/protocol_w8a8.py --smoke          # CPU: 4 x 128 calibration windows, 4 evaluation windows

A setting is ``fp`` or a granularity (per_token_dynamic, per_tensor_dynamic, per_tensor_static), ``+sq`` for
SmoothQuant (alpha 0.8): the paper's O1/O2/O3 pairs. Optional pruning first (``--sparsity 0.5``: SparseGPT,
then W8A8 in the same run). Each setting runs ``compressor.pipeline.compress`` (the stages a ``fit`` runs) on
the model loaded once and restored between settings; calibration 128 x 2048 windows of wiki.valid.tokens
(seed 0: also the static ranges), perplexity on wiki.test.raw in 2048-token windows. Records carry
``activations``, ``smoothquant``, ``cushion`` ("none": the cushion benchmark adds its column), ``prefix_len``,
``ppl`` and ``max_to_median`` (largest |x| entering the last block over its median |x|, first evaluation
window; the CushionCache paper's outlier statistic) and write ``bench/results/protocol_w8a8.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compressor.config import CalibrationConfig, EvaluationConfig, ModelConfig, OutputConfig, PruningConfig  # noqa: E402
from compressor.config import RuntimeConfig  # noqa: E402
from compressor.data.calibration import evaluation_windows  # noqa: E402
from compressor.io import write_bench_results  # noqa: E402
from compressor.models.adapters import ModelAdapter  # noqa: E402
from compressor.models.loading import load_model  # noqa: E402
from compressor.pipeline import RunSettings, compress, machine_name  # noqa: E402
from compressor.quant.activations import GRANULARITIES, ActivationQuantConfig  # noqa: E402
from compressor.quant.w8a8 import detach  # noqa: E402

SETTINGS = ["fp", "per_token_dynamic", "per_token_dynamic+sq", "per_tensor_dynamic", "per_tensor_dynamic+sq",
            "per_tensor_static", "per_tensor_static+sq"]


@torch.no_grad()
def max_to_median(model, window: torch.Tensor, device) -> float:
    """max |x| / median |x| of the hidden states entering the last decoder block, one window ``[1, seqlen]``."""
    seen = []
    block = ModelAdapter(model).blocks[-1]
    handle = block.register_forward_pre_hook(lambda m, a, kw: seen.append((a[0] if a else kw["hidden_states"])
                                                                           .detach().float().abs()), with_kwargs=True)
    try:
        model.to(device)(input_ids=window.to(device), use_cache=False)
    finally:
        handle.remove()
    x = seen[0]
    return float(x.max() / x.median().clamp(min=1e-12))


def parse(text: str) -> ActivationQuantConfig:
    granularity, _, sq = text.partition("+")
    granularity = "none" if granularity == "fp" else granularity
    if granularity not in GRANULARITIES or sq not in ("", "sq"):
        raise SystemExit(f"setting {text!r}: use fp or one of {', '.join(GRANULARITIES[1:])}, optionally +sq")
    return ActivationQuantConfig(granularity=granularity, smoothquant=sq == "sq")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="'smollm2' (installed package) or a path to the GGUF file")
    ap.add_argument("--data", default="../shared/data", help="folder holding wikitext-2/ and wikitext-2-raw/")
    ap.add_argument("--out", default="bench/results/protocol_w8a8.json")
    ap.add_argument("--workdir", default="outputs/protocol_w8a8")
    ap.add_argument("--settings", nargs="*", default=SETTINGS)
    ap.add_argument("--sparsity", type=float, default=0.0, help="SparseGPT sparsity before W8A8 (0: no pruning)")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-windows", type=int, default=None, help="evaluate fewer windows (smoke runs only)")
    ap.add_argument("--smoke", action="store_true", help="CPU: 4 x 128 calibration, 4 evaluation windows")
    args = ap.parse_args()
    if args.smoke:
        args.samples, args.seqlen, args.max_windows, args.batch_size = 4, 128, args.max_windows or 4, 2
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    data = Path(args.data)
    calib_file, eval_file = str(data / "wikitext-2" / "wiki.valid.tokens"), str(data / "wikitext-2-raw" / "wiki.test.raw")
    model_cfg = ModelConfig(name_or_path=args.model)
    model, tokenizer = load_model(model_cfg)
    fp_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    window = evaluation_windows(eval_file, args.seqlen, tokenizer, max_windows=1)  # the first window measured
    records = []
    for i, text in enumerate(args.settings):
        act = parse(text)
        detach(model)  # the previous setting's input quantizers
        model.load_state_dict(fp_state)
        run = RunSettings(
            model=model_cfg, pruning=PruningConfig(method="sparsegpt", sparsity=args.sparsity),
            calibration=CalibrationConfig(sources=[calib_file], num_samples=args.samples, seqlen=args.seqlen, seed=0),
            evaluation=EvaluationConfig(datasets=[eval_file], heldout_samples=0, dense_baseline=False,
                                        max_windows=args.max_windows),
            output=OutputConfig(dir=os.path.join(args.workdir, text.replace("+", "_")), save_model=False,
                                save_masks=False, plots=False, checkpoint=False, start_over=True),
            runtime=RuntimeConfig(batch_size=args.batch_size), activations=act)
        t = time.perf_counter()
        report = compress(run, device, progress=False, model_and_tokenizer=(model, tokenizer))
        seconds = time.perf_counter() - t
        first = next(iter(report["perplexity"]["windows"].values()))
        ratio = max_to_median(model, window, device)
        stats = report.get("activations") or {}
        records.append({"model": "smollm2-135m", "activations": act.granularity if act.enabled else "fp",
                        "smoothquant": act.smoothquant, "smoothquant_alpha": act.smoothquant_alpha if act.smoothquant
                        else None, "weights": "int8 per channel" if act.enabled else "fp32",
                        "pruning": f"sparsegpt {args.sparsity}" if args.sparsity else None,
                        "cushion": "none", "prefix_len": 0, "ppl": report["perplexity"]["compressed"][eval_file],
                        "max_to_median": ratio, "largest_input_absmax": stats.get("largest_input_absmax"),
                        "calibration": f"{args.samples} x {args.seqlen}", "eval_windows": first[0],
                        "seconds": round(seconds, 2), "stage_seconds": round(report["timings"].get("activations", 0), 2)})
        print({k: v for k, v in records[-1].items()}, flush=True)
        write_bench_results(args.out, machine_name(device), records)
    fp = next((r["ppl"] for r in records if r["activations"] == "fp"), None)
    print(f"\n{'activations':<20} {'SmoothQuant':<11} {'ppl':>10} {'vs FP':>8} {'max/median':>11}")
    for r in records:
        rel = f"{r['ppl'] / fp - 1:+.1%}" if fp else "-"
        print(f"{r['activations']:<20} {str(r['smoothquant']):<11} {r['ppl']:>10.3f} {rel:>8} {r['max_to_median']:>11.1f}")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
