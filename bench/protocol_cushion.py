"""CushionCache on the shared SmolLM2 protocol: W8A8 perplexity with and without the prefix, in parts.

    python bench/protocol_cushion.py --model $HOME/stage/SmolLM2-135M-Instruct.Q4_1.gguf --data $HOME/stage/data \\
        --parts search table --out bench/results/protocol_cushion.json
    python bench/protocol_cushion.py ... --parts pruned          # 50% SparseGPT + BR+GP, then W8A8 + cushion
    python bench/protocol_cushion.py --smoke                     # CPU: a tiny random Llama, small windows

Parts (each fits one 10-minute command on an H200; prefixes and the pruned weights are kept in --workdir,
so a later part or a rerun reuses them; records merge into --out by their key):
- search: greedy prefix (timed per step), its tuned version, and the outlier-token baseline on the fp model.
- table: perplexity on wiki.test.raw for FP and W8A8 at per-token dynamic / per-tensor dynamic / per-tensor
  static, each without and with SmoothQuant (alpha 0.8), x no prefix / greedy / tuned / outlier tokens
  (outlier tokens without SmoothQuant only), plus FP with each prefix (the control).
- pruned: 50% SparseGPT + BR+GP (the protocol's reconstruction), a greedy prefix found on the pruned model,
  then W8A8 per-tensor static and dynamic without and with the prefix.
Each record: activations (granularity or "none"), smoothquant, cushion, prefix_len, ppl, max_to_median
(largest |x| into the last block over its median, text tokens of 8 calibration texts of 512), model_state.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compressor.config import CalibrationConfig, ModelConfig  # noqa: E402
from compressor.cushion.config import CushionConfig  # noqa: E402
from compressor.cushion.prefix import find_prefix  # noqa: E402
from compressor.cushion.search import draw_texts  # noqa: E402
from compressor.cushion.stage import MEASURE_TEXTS, block_input_outliers, run_cushion  # noqa: E402
from compressor.data.calibration import calibration_windows, evaluation_windows  # noqa: E402
from compressor.evaluation import perplexity  # noqa: E402
from compressor.io import atomic_write_json, write_bench_results  # noqa: E402
from compressor.pipeline import machine_name  # noqa: E402
from compressor.quant.activations import ActivationQuantConfig  # noqa: E402
from compressor.quant.w8a8 import calibrate  # noqa: E402

GRANULARITIES = ("per_token_dynamic", "per_tensor_dynamic", "per_tensor_static")
KEY = ("model_state", "activations", "smoothquant", "cushion")


def load(args):
    if args.smoke:
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

        from compressor.models.loading import resolve

        name, gguf = resolve(ModelConfig(name_or_path=args.model))  # the real tokenizer, a tiny random model
        tokenizer = AutoTokenizer.from_pretrained(name, gguf_file=gguf)
        torch.manual_seed(0)
        cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=8192)
        return AutoModelForCausalLM.from_config(cfg).eval(), tokenizer
    from compressor.models.loading import load_model

    return load_model(ModelConfig(name_or_path=args.model))


def merge(path: Path, machine: str, records: list[dict]) -> None:
    old = json.loads(path.read_text())["records"] if path.is_file() else []
    keyed = {tuple(r.get(k) for k in KEY): r for r in old}
    keyed.update({tuple(r.get(k) for k in KEY): r for r in records})
    write_bench_results(path, machine, list(keyed.values()))


def prefixes(model, tokenizer, calib, args, device, where: Path, methods, cfg_kw) -> tuple[dict, dict]:
    """Prefix and report section per method, loaded from ``where/<method>`` when an earlier part found them."""
    import shutil

    found, sections = {}, {}
    for method in methods:
        folder = where / method
        saved = find_prefix(folder)
        if saved is not None and (folder / "section.json").is_file():
            found[method], sections[method] = saved.to(device), json.loads((folder / "section.json").read_text())
            continue
        greedy_steps = where / "greedy" / "checkpoints" / "cushion_search.json"
        if method == "tuned" and greedy_steps.is_file():
            # tuning starts from the greedy prefix: its finished search checkpoint is resumed, not redone
            (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
            shutil.copy(greedy_steps, folder / "checkpoints" / "cushion_search.json")
        cfg = CushionConfig(method=method, **cfg_kw)
        found[method], sections[method] = run_cushion(model, tokenizer, calib, cfg, folder, device, progress=True,
                                                      accelerator="gpu" if device.type == "cuda" else "cpu")
        atomic_write_json(folder / "section.json", sections[method])
        print(json.dumps({"method": method, "tokens": sections[method]["tokens"],
                          "search": {k: v for k, v in sections[method].get("search", {}).items() if k != "steps"},
                          "steps": [(s["piece"], round(s["error_before"], 1), round(s["error_best"], 1),
                                     round(s["seconds"], 1)) for s in sections[method].get("search", {})
                                    .get("steps", [])],
                          "tuning": sections[method].get("tuning"),
                          "outlier_tokens": sections[method].get("outlier_tokens"),
                          "last_block_max_to_median": sections[method]["last_block_max_to_median"]}), flush=True)
    return found, sections


def evaluate(model, state, calib, windows, texts, device, prefix, granularity, smoothquant, args) -> dict:
    """Perplexity (and the last block's outlier ratio) of ``model`` with W8A8 at ``granularity`` after ``prefix``;
    the weights are restored from ``state`` afterwards."""
    t = time.perf_counter()
    quant = None
    if granularity != "none":
        cfg = ActivationQuantConfig(granularity=granularity, smoothquant=smoothquant,
                                    calibration_windows=args.act_calib_windows)
        quant = calibrate(model, calib, cfg, device, batch_size=args.batch_size, prefix=prefix)
    try:
        ppl = perplexity(model, windows, device, batch_size=args.batch_size, progress=False, prefix=prefix)
        outliers = block_input_outliers(model, texts, prefix)
    finally:
        if quant is not None:
            quant.detach()
        model.load_state_dict(state)
    return {"activations": granularity, "smoothquant": smoothquant, "ppl": ppl,
            "max_to_median": outliers[-1]["max_to_median"], "last_block_max": outliers[-1]["max"],
            "eval_seconds": round(time.perf_counter() - t, 2)}


def table(model, state, calib, windows, texts, device, found: dict, sections: dict, args, model_state: str,
          grid) -> list[dict]:
    records = []
    for granularity, smoothquant, method in grid:
        prefix = found.get(method)
        rec = evaluate(model, state, calib, windows, texts, device, prefix, granularity, smoothquant, args)
        sec = sections.get(method) or {}
        rec.update({"model": "smollm2-135m" if not args.smoke else "tiny-llama", "model_state": model_state,
                    "cushion": method, "prefix_len": len(prefix) if prefix is not None else 0,
                    "prefix_tokens": sec.get("tokens"), "eval_windows": int(windows.shape[0]),
                    "search_seconds": (sec.get("search") or {}).get("seconds"),
                    "search_seconds_per_step": (sec.get("search") or {}).get("seconds_per_step"),
                    "tuning_seconds": (sec.get("tuning") or {}).get("seconds"),
                    "outlier_tokens_seconds": (sec.get("outlier_tokens") or {}).get("seconds"),
                    "command": "python " + " ".join(sys.argv)})  # parts run as separate commands
        records.append(rec)
        print(json.dumps(rec), flush=True)
    return records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="'smollm2' (installed package) or a path to the GGUF file")
    ap.add_argument("--data", default="../shared/data", help="folder holding wikitext-2/ and wikitext-2-raw/")
    ap.add_argument("--out", default="bench/results/protocol_cushion.json")
    ap.add_argument("--workdir", default="outputs/cushion")
    ap.add_argument("--parts", nargs="+", default=["search", "table"], choices=["search", "table", "pruned"])
    ap.add_argument("--granularities", nargs="+", default=list(GRANULARITIES), choices=GRANULARITIES,
                    help="W8A8 rows of the table part (split the table over two commands if needed)")
    ap.add_argument("--candidate-batch", type=int, default=1024)
    ap.add_argument("--max-prefix-len", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8, help="windows per forward (calibration, perplexity)")
    ap.add_argument("--act-calib-windows", type=int, default=None, help="W8A8 calibration windows (default all)")
    ap.add_argument("--max-windows", type=int, default=None, help="evaluate fewer windows (smoke runs only)")
    ap.add_argument("--smoke", action="store_true", help="CPU smoke run: tiny random Llama, small windows")
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = Path(args.data)
    valid, test = str(data / "wikitext-2" / "wiki.valid.tokens"), str(data / "wikitext-2-raw" / "wiki.test.raw")
    seqlen, samples, text_len = (256, 8, 64) if args.smoke else (2048, 128, 512)
    if args.smoke:
        args.max_windows = args.max_windows or 2
        args.max_prefix_len = min(args.max_prefix_len, 3)
    workdir = Path(args.workdir)
    t = time.perf_counter()
    model, tokenizer = load(args)
    model.to(device)
    print(f"model loaded in {time.perf_counter() - t:.1f}s on {machine_name(device)}", flush=True)
    calib = calibration_windows(CalibrationConfig(sources=[valid], num_samples=samples, seqlen=seqlen, seed=0),
                                model, tokenizer, args.model)
    windows = evaluation_windows(test, seqlen, tokenizer, max_windows=args.max_windows)
    texts = draw_texts(calib, text_len, MEASURE_TEXTS, 2)
    cfg_kw = {"candidate_batch": args.candidate_batch, "max_prefix_len": args.max_prefix_len, "text_len": text_len}
    if args.smoke:
        cfg_kw.update(tuning_texts=8, candidates=2048)
    machine = machine_name(device)
    out = Path(args.out)

    if "search" in args.parts or "table" in args.parts:
        found, sections = prefixes(model, tokenizer, calib, args, device, workdir / "fp",
                                   ["greedy", "tuned", "outlier_tokens"], cfg_kw)
        if "table" in args.parts:
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            grid = [("none", False, m) for m in ("none", "greedy", "tuned", "outlier_tokens")]
            grid += [(g, sq, m) for g in args.granularities for sq in (False, True)
                     for m in ("none", "greedy", "tuned")]
            grid += [(g, False, "outlier_tokens") for g in args.granularities]
            merge(out, machine, table(model, state, calib, windows, texts, device, found, sections, args, "dense",
                                      grid))
    if "pruned" in args.parts:
        found, sections = pruned_part(model, tokenizer, calib, args, device, workdir, cfg_kw, valid, test)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        grid = [("none", False, "none"), ("none", False, "greedy")]
        grid += [(g, False, m) for g in ("per_tensor_static", "per_tensor_dynamic") for m in ("none", "greedy")]
        merge(out, machine, table(model, state, calib, windows, texts, device, found, sections, args,
                                  "sparsegpt-0.5-br+gp", grid))
    summary(out)


def pruned_part(model, tokenizer, calib, args, device, workdir: Path, cfg_kw, valid, test):
    """50% SparseGPT + BR+GP as bench/protocol.py runs it (weights kept in workdir), then a greedy prefix."""
    from safetensors.torch import load_file, save_file

    from compressor.config import EvaluationConfig, OutputConfig, PruningConfig, RuntimeConfig
    from compressor.pipeline import RunSettings, compress
    from compressor.reconstruction.module import ReconstructionConfig

    weights = workdir / "pruned" / "model.safetensors"
    if weights.is_file():
        model.load_state_dict(load_file(weights))
    else:
        seqlen = 256 if args.smoke else 1024
        recon = CalibrationConfig(sources=[valid], num_samples=8 if args.smoke else 256, seqlen=seqlen, seed=0)
        run = RunSettings(
            model=ModelConfig(name_or_path=args.model), pruning=PruningConfig(method="sparsegpt", sparsity=0.5),
            calibration=CalibrationConfig(sources=[valid], num_samples=calib.shape[0], seqlen=calib.shape[1]),
            evaluation=EvaluationConfig(datasets=[test], heldout_samples=0, dense_baseline=False,
                                        max_windows=args.max_windows),
            output=OutputConfig(dir=str(workdir / "pruned"), save_model=False, save_masks=False, plots=False,
                                start_over=True),
            runtime=RuntimeConfig(batch_size=args.batch_size),
            reconstruction=ReconstructionConfig(mode="br+gp", epochs=1 if args.smoke else 10, lr=1e-3),
            recon_calibration=recon)
        report = compress(run, device, progress=False, model_and_tokenizer=(model, tokenizer))
        print(json.dumps({"pruned_ppl": report["perplexity"]["compressed"], "seconds": report["timings"]["total"]}),
              flush=True)
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        weights.parent.mkdir(parents=True, exist_ok=True)
        save_file(state, str(weights))
    model.to(device)
    return prefixes(model, tokenizer, calib, args, device, workdir / "pruned", ["greedy"], cfg_kw)


def summary(out: Path) -> None:
    if not out.is_file():  # --parts search alone: prefixes written to --workdir, no perplexity records yet
        print(f"no records in {out} yet: run --parts table to measure the prefixes")
        return
    records = json.loads(out.read_text())["records"]
    print(f"\n{'model':<22} {'activations':<19} {'SQ':<3} {'cushion':<15} {'len':>3} {'ppl':>10} {'max/med':>9}")
    for r in records:
        print(f"{r['model_state']:<22} {r['activations']:<19} {'y' if r['smoothquant'] else '-':<3} {r['cushion']:<15} "
              f"{r['prefix_len']:>3} {r['ppl']:>10.2f} {r['max_to_median']:>9.1f}")
    print(f"written {out}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
