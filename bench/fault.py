"""Fault test: SIGKILL a compression at random instants, resume until done, compare with an
uninterrupted run bit for bit.

    python bench/fault.py --kills 20 --out bench/results/fault.json

The job is a real `python cli.py fit` (subprocess) on a tiny random Llama saved with the real
SmolLM2 tokenizer: Wanda statistics, pruning, BR reconstruction (Lightning Trainer per block) and
per-block checkpoint writes. Kill instants are drawn uniformly over the uninterrupted run's
duration. After every kill, each checkpoint the manifest names must pass its checksum (nothing
partial is ever trusted). Prints the counts and writes kills, resumes and identical.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_model(folder: Path, blocks: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from compressor.models.loading import packaged_model_file

    gguf = packaged_model_file()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=blocks, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=512)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)


def command(model: Path, calib: str, out: Path, samples: int, epochs: int) -> list[str]:
    return [sys.executable, str(ROOT / "cli.py"), "fit", "--trainer.accelerator", "cpu",
            "--model.source.name_or_path", str(model), "--model.pruning.method", "wanda",
            "--model.reconstruction.mode", "br", "--model.reconstruction.epochs", str(epochs),
            "--model.reconstruction.batch_size", "4",
            "--data.calibration.sources", f"[{calib}]", "--data.calibration.num_samples", str(samples),
            "--data.calibration.seqlen", "128", "--data.evaluation.datasets", "[]",
            "--output.plots", "false", "--output.dir", str(out)]


def checkpoints_trustworthy(out: Path) -> bool:
    """Every block the manifest names has a file whose checksum matches."""
    import hashlib

    manifest = out / "checkpoints" / "manifest.json"
    if not manifest.exists():
        return True
    data = json.loads(manifest.read_text())  # a torn manifest would raise here
    for entry in data["blocks"]:
        blob = (out / "checkpoints" / entry["file"]).read_bytes()
        if hashlib.sha256(blob).hexdigest() != entry["sha256"]:
            return False
    return True


def identical(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    for name in ("model/model.safetensors", "masks.safetensors"):
        x, y = load_file(a / name), load_file(b / name)
        if x.keys() != y.keys() or any(not torch.equal(x[k], y[k]) for k in x):
            return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--samples", type=int, default=64, help="calibration windows of 128 tokens")
    ap.add_argument("--epochs", type=int, default=8, help="reconstruction epochs per block")
    ap.add_argument("--workdir", default="outputs/fault")
    ap.add_argument("--calib", default=str(ROOT.parent / "shared" / "data" / "wikitext-2" / "wiki.valid.tokens"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/results/fault.json")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    work = Path(args.workdir)
    if work.exists():
        import shutil

        shutil.rmtree(work)
    work.mkdir(parents=True)
    make_model(work / "model", args.blocks)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def started(proc, log: Path, size: int) -> float:
        """Wait until the run writes to its log (imports done, work begun); returns the time waited."""
        t = time.perf_counter()
        while proc.poll() is None and (not log.exists() or log.stat().st_size <= size):
            time.sleep(0.05)
        return time.perf_counter() - t

    t = time.perf_counter()
    ref = subprocess.Popen(command(work / "model", args.calib, work / "reference", args.samples, args.epochs), env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    startup = started(ref, work / "reference" / "compress.log", 0)
    if ref.wait() != 0:
        raise SystemExit("the uninterrupted run failed")
    duration = time.perf_counter() - t
    work_seconds = duration - startup
    print(f"uninterrupted run: {duration:.1f}s ({startup:.1f}s start-up, {work_seconds:.1f}s of work)")

    out = work / "faulty"
    log = out / "compress.log"
    kills = runs = resumes_before = 0
    trusted_partial = 0
    while kills < args.kills:
        runs += 1
        size = log.stat().st_size if log.exists() else 0
        manifest = out / "checkpoints" / "manifest.json"
        err = work / f"run_{runs:02d}.stderr"  # kept: a run that fails says why
        with open(err, "wb") as err_file:
            proc = subprocess.Popen(command(work / "model", args.calib, out, args.samples, args.epochs), env=env,
                                    stdout=subprocess.DEVNULL, stderr=err_file)
        started(proc, log, size)
        # a random instant within one run's work: statistics, pruning, reconstruction, checkpoint or output
        # writes (a resumed run that finishes first is started over, so kills keep landing in work)
        try:
            proc.wait(timeout=rng.uniform(0.0, work_seconds))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            done = json.loads(manifest.read_text())["blocks_done"] if manifest.exists() else 0
            ok = checkpoints_trustworthy(out)
            trusted_partial += not ok
            print(f"kill {kills:2d}: blocks checkpointed {done}/{args.blocks}, checkpoints trustworthy: {ok}",
                  flush=True)
            continue
        if proc.returncode != 0:
            tail = err.read_text(errors="replace").strip().splitlines()[-15:]
            raise SystemExit(f"run {runs} failed with exit code {proc.returncode}; its stderr ends:\n" + "\n".join(tail))
        # finished before the kill: start over so that every kill lands in a run
        import shutil

        resumes_before += log.read_text().count("resuming:")
        shutil.rmtree(out, ignore_errors=True)
    runs += 1
    subprocess.run(command(work / "model", args.calib, out, args.samples, args.epochs), check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = (out / "compress.log").read_text()
    resumes = resumes_before + log.count("resuming:")
    same = identical(work / "reference", out)
    result = {"kills": kills, "resumes": resumes, "runs": runs, "identical": same,
              "completed_then_restarted": runs - kills - 1,
              "untrustworthy_checkpoints_seen": trusted_partial, "blocks": args.blocks,
              "uninterrupted_seconds": round(duration, 1)}
    print(json.dumps(result))
    from compressor.io import atomic_write_json

    atomic_write_json(args.out, {"machine": f"{os.cpu_count()}-core CPU", "date": datetime.date.today().isoformat(),
                                 "command": "python " + " ".join(sys.argv), "records": [result], **result})


if __name__ == "__main__":
    main()
