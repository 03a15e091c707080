"""Zero-shot accuracy beside perplexity on the shared SmolLM2 protocol: dense, SparseGPT 50% LR, BR+GP, BR+GP+CR.

    python bench/zeroshot.py --model <SmolLM2 gguf> --data <shared data> --out bench/results/zeroshot.json
    python bench/zeroshot.py --settings sparsegpt:0.5:br+gp --append      # one setting per command, merged
    python bench/zeroshot.py --smoke                                       # CPU, packaged model, 2 docs per task
    python bench/zeroshot.py --merge part1.json part2.json --out zeroshot.json   # tasks split over commands

Does reconstruction's lower error help or hurt zero-shot accuracy (Shin et al., EMNLP 2024, ask)? Each setting
is compressed as ``bench/protocol.py`` does (128 x 2048 calibration windows of wiki.valid.tokens, seed 0;
reconstruction on 256 x 1024 windows, lr 1e-3, 10 epochs, calibration batch 1), then measured by the same
pipeline: perplexity on wiki.test.raw (147 x 2048) and every staged zero-shot task through lm-evaluation-harness
(full splits, 0-shot, ``data.evaluation.tasks``). ``dense`` measures the loaded model without compressing it.
HellaSwag's staged file is a derived form of its validation split (shared/data/zeroshot/README.md): its scores
are close to, not equal to, lm-eval's hellaswag. Writes records ``setting, task, acc, acc_norm (where the
harness gives it), n`` and one summary per setting (perplexity, mean accuracy, seconds).
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from protocol import parse_setting  # noqa: E402

from compressor.config import CalibrationConfig, EvaluationConfig, ModelConfig, OutputConfig, RuntimeConfig  # noqa: E402
from compressor.data.calibration import evaluation_windows  # noqa: E402
from compressor.evaluation import perplexity  # noqa: E402
from compressor.io import atomic_write_json  # noqa: E402
from compressor.models.identity import model_identity  # noqa: E402
from compressor.models.loading import load_model  # noqa: E402
from compressor.pipeline import RunSettings, compress, machine_name  # noqa: E402
from compressor.reconstruction.module import ReconstructionConfig  # noqa: E402
from compressor.zeroshot import known_tasks, zeroshot_accuracy  # noqa: E402
from compressor.zeroshot.harness import DERIVED_NOTE, harness_version, mean_accuracy  # noqa: E402

SETTINGS = ["dense", "sparsegpt:0.5", "sparsegpt:0.5:br+gp", "sparsegpt:0.5:br+gp+cr"]
ORDER = ["boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa", "lambada_openai", "piqa",
         "copa"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="'smollm2' (installed package) or a path to the GGUF file")
    ap.add_argument("--data", default="../shared/data", help="folder holding wikitext-2/, wikitext-2-raw/, zeroshot/")
    ap.add_argument("--tasks-dir", default=None, help="zero-shot JSONL folder (default: DATA/zeroshot)")
    ap.add_argument("--tasks", nargs="*", default=[t for t in ORDER if t in known_tasks()])
    ap.add_argument("--settings", nargs="*", default=SETTINGS, help="'dense' or METHOD:PATTERN[:RECONSTRUCTION]")
    ap.add_argument("--out", default="bench/results/zeroshot.json")
    ap.add_argument("--append", action="store_true", help="merge into --out, replacing records of the same setting")
    ap.add_argument("--workdir", default="outputs/zeroshot")
    ap.add_argument("--resume", action="store_true",
                    help="reuse the compression checkpointed in --workdir by an earlier (interrupted or finished) "
                         "command of the same setting: only what is missing is compressed, then every task is "
                         "measured (checkpoints are kept so a later command can resume again)")
    ap.add_argument("--limit", type=int, default=None, help="documents per task (default: full splits)")
    ap.add_argument("--batch-size", type=int, default=None, help="harness requests per forward (GPU 64, CPU 8)")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--recon-samples", type=int, default=256)
    ap.add_argument("--recon-seqlen", type=int, default=1024)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--max-windows", type=int, default=None, help="perplexity windows (default: all 147)")
    ap.add_argument("--merge", nargs="+", metavar="FILE", default=None,
                    help="measure nothing: combine result files of commands that split the tasks (or settings) "
                         "between them into --out, each setting's mean accuracy over all its tasks")
    ap.add_argument("--smoke", action="store_true", help="CPU check: tiny calibration, 1 epoch, 2 docs per task")
    args = ap.parse_args()
    if args.merge:
        merged = merge([read_part(f) for f in args.merge], "python " + " ".join(sys.argv), args.merge)
        atomic_write_json(Path(args.out), merged)
        print_table(merged["records"], merged["settings"], args.tasks, Path(args.out))
        return
    if args.smoke:
        args.samples, args.seqlen, args.recon_samples, args.recon_seqlen, args.epochs = 2, 128, 2, 128, 1
        args.limit, args.max_windows = args.limit or 2, args.max_windows or 2

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch = args.batch_size or (64 if device.type == "cuda" else 8)
    data = Path(args.data)
    tasks_dir = args.tasks_dir or str(data / "zeroshot")
    calib_file, eval_file = str(data / "wikitext-2" / "wiki.valid.tokens"), str(data / "wikitext-2-raw" / "wiki.test.raw")
    evaluation = EvaluationConfig(datasets=[eval_file], heldout_samples=16, dense_baseline=False,
                                  max_windows=args.max_windows, tasks=list(args.tasks), tasks_dir=tasks_dir,
                                  tasks_limit=args.limit, tasks_batch_size=batch)  # checks every task file now
    model_cfg = ModelConfig(name_or_path=args.model)
    model, tokenizer = load_model(model_cfg)
    dense_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    out = Path(args.out)
    previous = json.loads(out.read_text()) if args.append and out.is_file() else {}
    records = [r for r in previous.get("records", []) if r["setting"] not in args.settings]
    summaries = [s for s in previous.get("settings", []) if s["setting"] not in args.settings]
    for text in args.settings:
        model.load_state_dict(dense_state)
        t = time.perf_counter()
        if text == "dense":
            windows = evaluation_windows(eval_file, args.seqlen, tokenizer, model, model_identity(model)["fingerprint"],
                                         args.max_windows, 0, CalibrationConfig().generation, 0, device)
            ppl = perplexity(model, windows, device, progress=False)
            zs = zeroshot_accuracy(model, tokenizer, list(args.tasks), tasks_dir, args.limit, batch, device)
            extra = {"method": "dense", "pattern": "0", "reconstruction": "lr", "eval_seconds": None}
        else:
            pruning, mode, _, _ = parse_setting(text)
            run = RunSettings(
                model=model_cfg, pruning=pruning,
                calibration=CalibrationConfig(sources=[calib_file], num_samples=args.samples, seqlen=args.seqlen,
                                              seed=0),
                evaluation=evaluation,
                output=OutputConfig(dir=os.path.join(args.workdir, text.replace(":", "_")), save_model=False,
                                    save_masks=False, plots=False, start_over=not args.resume,
                                    overwrite=args.resume, keep_checkpoints=args.resume),
                runtime=RuntimeConfig(batch_size=1),
                reconstruction=ReconstructionConfig(mode=mode, epochs=args.epochs, lr=args.lr),
                recon_calibration=CalibrationConfig(sources=[calib_file], num_samples=args.recon_samples,
                                                    seqlen=args.recon_seqlen, seed=0) if mode != "lr" else None)
            report = compress(run, device, progress=False, model_and_tokenizer=(model, tokenizer))
            ppl, zs = report["perplexity"]["compressed"][eval_file], report["zeroshot"]["compressed"]
            extra = {"eval_seconds": round(report["timings"]["eval"], 1),  # perplexity and zero-shot tasks
                     "method": pruning.method, "pattern": pruning.label, "reconstruction": mode,
                     "lr": args.lr if mode != "lr" else None,
                     "final_block_heldout_rel_error": report["blocks"][-1]["heldout_rel_error"]}
        seconds = time.perf_counter() - t
        for task in args.tasks:
            rec = zs[task]
            records.append({"setting": text, "task": task, "acc": rec["acc"], "acc_stderr": rec.get("acc_stderr"),
                            **({"acc_norm": rec["acc_norm"], "acc_norm_stderr": rec.get("acc_norm_stderr")}
                               if "acc_norm" in rec else {}),
                            **({"perplexity": rec["perplexity"]} if "perplexity" in rec else {}),
                            "n": rec["n"], **({"derived_data": True} if rec.get("derived_data") else {})})
        summaries.append({"setting": text, **extra, "wikitext2_ppl": ppl, "mean_acc": mean_accuracy(zs),
                          "tasks": len(zs), "seconds": round(seconds, 1)})
        if summaries[-1]["eval_seconds"] is None:
            summaries[-1]["eval_seconds"] = summaries[-1]["seconds"]
        print(json.dumps(summaries[-1]), flush=True)
        rank = {name: i for i, name in enumerate(SETTINGS + [n for n in args.settings if n not in SETTINGS])}
        summaries.sort(key=lambda x: rank.get(x["setting"], len(rank)))
        records.sort(key=lambda x: rank.get(x["setting"], len(rank)))
        atomic_write_json(out, {
            "machine": machine_name(device), "date": datetime.date.today().isoformat(),
            "command": "python " + " ".join(sys.argv), "harness": harness_version(), "num_fewshot": 0,
            "limit": args.limit, "model": "smollm2-135m (protocol)", "note": DERIVED_NOTE,
            "records": records, "settings": summaries})

    print_table(records, summaries, args.tasks, out)


def print_table(records: list[dict], summaries: list[dict], tasks: list[str], out: Path) -> None:
    by = {(r["setting"], r["task"]): r for r in records}
    names = [s["setting"] for s in summaries]
    print(f"\n{'task':<16}" + "".join(f"{n:>24}" for n in names))
    for task in tasks:
        label = task + (" *" if task == "hellaswag" else "")
        print(f"{label:<16}" + "".join(f"{by[(n, task)]['acc']:>24.4f}" if (n, task) in by else f"{'-':>24}"
                                        for n in names))
    print(f"{'mean acc':<16}" + "".join(f"{s['mean_acc']:>24.4f}" for s in summaries))
    print(f"{'wikitext2 ppl':<16}" + "".join(f"{s['wikitext2_ppl']:>24.2f}" for s in summaries))
    print(f"* {DERIVED_NOTE}\nwritten {out}")


PART_KEYS = ("records", "settings", "limit", "harness", "num_fewshot", "model", "command", "machine", "date", "note")


def read_part(path: str) -> dict:
    """One results file of this script, or SystemExit naming the file and what is wrong with it."""
    try:
        part = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"--merge {path}: cannot read it as a results file ({exc})") from None
    missing = [k for k in PART_KEYS if not isinstance(part, dict) or k not in part]
    if missing:
        raise SystemExit(f"--merge {path}: not a bench/zeroshot.py results file (no {', '.join(missing)})")
    return part


def merge(parts: list[dict], command: str, names: list[str] | None = None) -> dict:
    """One results dict from ``parts`` (this script's files) that measured disjoint tasks of the same settings.

    A setting's summary keeps the first part's fields, its ``mean_acc`` and ``tasks`` are recomputed over every
    task's record, and ``parts`` lists each part's tasks and seconds. Raises SystemExit when two parts disagree on
    the limit, harness, shots or model, measure one (setting, task) twice, or disagree on a setting's perplexity by
    more than 0.1% (then they did not compress alike)."""
    names = names or [f"part {i + 1}" for i in range(len(parts))]
    for key in ("limit", "harness", "num_fewshot", "model"):
        if len({json.dumps(p[key]) for p in parts}) > 1:
            raise SystemExit(f"the files differ in {key}: {[p[key] for p in parts]}; merge only parts of one protocol")
    records, summaries, source = {}, {}, {}
    for name, part in zip(names, parts):
        tasks = {}
        for r in part["records"]:
            key = (r["setting"], r["task"])
            if key in records:
                raise SystemExit(f"{r['setting']} {r['task']} is measured in both {source[key]} and {name}: merge "
                                 "parts that split the tasks, each task once")
            records[key], source[key] = r, name
            tasks.setdefault(r["setting"], []).append(r["task"])
        for s in part["settings"]:
            first = summaries.setdefault(s["setting"], {**s, "parts": []})
            if abs(first["wikitext2_ppl"] - s["wikitext2_ppl"]) > 1e-3 * first["wikitext2_ppl"]:
                raise SystemExit(f"{s['setting']}: perplexity {first['wikitext2_ppl']:.4f} in one file, "
                                 f"{s['wikitext2_ppl']:.4f} in another: the parts did not compress alike")
            first["parts"].append({"tasks": tasks.get(s["setting"], []), "seconds": s["seconds"],
                                   "eval_seconds": s["eval_seconds"], "command": part["command"]})
    rank = {name: i for i, name in enumerate(SETTINGS)}
    out = []
    for name, s in sorted(summaries.items(), key=lambda kv: rank.get(kv[0], len(rank))):
        mine = {r["task"]: r for (setting, _), r in records.items() if setting == name}
        out.append({**s, "mean_acc": mean_accuracy(mine), "tasks": len(mine)})
    order = {t: i for i, t in enumerate(ORDER)}
    recs = sorted(records.values(), key=lambda r: (rank.get(r["setting"], len(rank)), order.get(r["task"], 99)))
    return {**{k: parts[0][k] for k in ("machine", "date", "harness", "num_fewshot", "limit", "model", "note")},
            "command": command, "records": recs, "settings": out}


if __name__ == "__main__":
    main()
