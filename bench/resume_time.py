"""Time to resume after block k: it should fall with k (finished blocks are loaded, not redone).

    python bench/resume_time.py --out bench/results/resume.json

Compresses a tiny random 8-block Llama (SmolLM2 tokenizer; Wanda + BR reconstruction) once, then
for each k rewrites the manifest to name only the first k blocks and times the resumed run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from fault import make_model  # noqa: E402

from compressor.config import (  # noqa: E402
    CalibrationConfig,
    EvaluationConfig,
    ModelConfig,
    OutputConfig,
    PruningConfig,
    RuntimeConfig,
)
from compressor.io import atomic_write_json  # noqa: E402
from compressor.models.loading import load_model  # noqa: E402
from compressor.pipeline import RunSettings, compress  # noqa: E402
from compressor.reconstruction.module import ReconstructionConfig  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--workdir", default="outputs/resume-time")
    ap.add_argument("--calib", default=str(ROOT.parent / "shared" / "data" / "wikitext-2" / "wiki.valid.tokens"))
    ap.add_argument("--out", default="bench/results/resume.json")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    make_model(work / "model", args.blocks)
    settings = RunSettings(
        model=ModelConfig(name_or_path=str(work / "model")),
        pruning=PruningConfig(method="wanda"),
        calibration=CalibrationConfig(sources=[args.calib], num_samples=48, seqlen=128),
        evaluation=EvaluationConfig(datasets=[], dense_baseline=False),
        output=OutputConfig(dir=str(work / "out"), plots=False, start_over=True, overwrite=True,
                            keep_checkpoints=True),
        runtime=RuntimeConfig(),
        reconstruction=ReconstructionConfig(mode="br", epochs=4, batch_size=4),
    )

    def timed() -> tuple[float, int]:
        model_tok = load_model(settings.model)
        t = time.perf_counter()
        report = compress(settings, "cpu", progress=False, model_and_tokenizer=model_tok)
        return time.perf_counter() - t, report["resumed_blocks"]

    full, _ = timed()
    settings.output.start_over = False
    manifest_path = work / "out" / "checkpoints" / "manifest.json"
    complete = json.loads(manifest_path.read_text())
    records = [{"what": "resume-after-block", "k": None, "seconds": round(full, 2), "note": "uninterrupted"}]
    print(f"uninterrupted: {full:.2f}s")
    for k in range(0, args.blocks + 1, 2):
        manifest = {**complete, "blocks": complete["blocks"][:k], "blocks_done": k}
        atomic_write_json(manifest_path, manifest)
        seconds, resumed = timed()
        records.append({"what": "resume-after-block", "k": k, "resumed_blocks": resumed, "blocks_left": args.blocks - k,
                        "seconds": round(seconds, 2)})
        print(f"resume after {k} blocks ({args.blocks - k} left): {seconds:.2f}s")
    atomic_write_json(args.out, {"machine": f"{os.cpu_count()}-core CPU", "date": datetime.date.today().isoformat(),
                                 "command": "python " + " ".join(sys.argv), "records": records})


if __name__ == "__main__":
    main()
