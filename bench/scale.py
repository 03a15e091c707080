"""End-to-end LR compression (SparseGPT) of random-weight models of real shapes, streamed block by block.

    python bench/scale.py --shape llama-7b --out bench/results/perf_scale.json
    python bench/scale.py --shape llama-70b opt-66b --blocks 3 --no-keep-files --out ...

The model is the transformers class of the family, built with its embeddings and head on the GPU
and its decoder blocks on the meta device. The project's SequentialPruner walks the blocks with a
RandomHome (compressor/streaming.py): each block is created on the GPU at its turn (normal(0, 0.02)
weights, seeded per block), pruned from the statistics of the calibration stream (random token ids,
samples x seqlen, block-0 inputs captured by running the model itself), run forward to feed the next
block, written to disk as safetensors (unless --no-keep-files) and freed. No block exists before its
turn or in memory after it, so neither the GPU nor the host ever holds the model.

``--blocks N`` runs the first N blocks of the shape; the projected total is the capture time plus
the mean time of the blocks after the first (warm-up) times the shape's block count. Peak GPU
memory is torch's max_memory_allocated (and max_memory_reserved: what the caching allocator held, run
with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True unless set otherwise); peak host memory is the
process's max resident set size.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

# big tensors of many sizes come and go per block: growable segments keep the cache from fragmenting
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compressor.config import PruningConfig, RuntimeConfig  # noqa: E402
from compressor.quant.int4 import METHODS as QUANT_METHODS  # noqa: E402
from compressor.quant.int4 import QuantizationConfig  # noqa: E402
from compressor.io import write_bench_results  # noqa: E402
from compressor.pipeline import machine_name  # noqa: E402
from compressor.models.adapters import ModelAdapter  # noqa: E402
from compressor.sequential import SequentialPruner  # noqa: E402
from compressor.streaming import RandomHome  # noqa: E402

SHAPES = {
    # LLaMA-2-7B, LLaMA-2-70B (grouped-query attention), OPT-66B: the published configurations
    "llama-7b": ("llama", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                               num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)),
    "llama-70b": ("llama", dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                num_attention_heads=64, num_key_value_heads=8, vocab_size=32000)),
    "opt-66b": ("opt", dict(hidden_size=9216, ffn_dim=36864, num_hidden_layers=64, num_attention_heads=72,
                            vocab_size=50272, word_embed_proj_dim=9216, do_layer_norm_before=True)),
    # smoke tests on a CPU
    "llama-tiny": ("llama", dict(hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=1000)),
    "opt-tiny": ("opt", dict(hidden_size=256, ffn_dim=1024, num_hidden_layers=3, num_attention_heads=4,
                             vocab_size=1000, word_embed_proj_dim=256, do_layer_norm_before=True)),
}


def make_config(shape: str):
    from transformers import LlamaConfig, OPTConfig

    family, kw = SHAPES[shape]
    cls = LlamaConfig if family == "llama" else OPTConfig
    cfg = cls(max_position_embeddings=4096, **kw)
    cfg._attn_implementation = "sdpa"
    return cfg


def build_streamed(shape: str, blocks: int, device: torch.device, dtype: torch.dtype):
    """The model with everything but its blocks on ``device`` and ``blocks`` decoder blocks on the meta device."""
    from transformers import AutoModelForCausalLM

    cfg = make_config(shape)
    cfg.num_hidden_layers = blocks
    outside_cfg = copy.deepcopy(cfg)
    outside_cfg.num_hidden_layers = 0
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(outside_cfg, dtype=dtype).eval()
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    adapter = ModelAdapter(skeleton)
    meta_blocks = adapter.blocks
    ModelAdapter(model)._set_blocks(meta_blocks)
    model.config.num_hidden_layers = blocks
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def peak_host_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB


def run_shape(shape: str, args, device: torch.device, workdir: Path) -> dict:
    total_blocks = SHAPES[shape][1]["num_hidden_layers"]
    n = min(args.blocks or total_blocks, total_blocks)
    model = build_streamed(shape, n, device, torch.bfloat16)
    calib = torch.randint(0, model.config.vocab_size, (args.samples, args.seqlen),
                          generator=torch.Generator().manual_seed(0))
    folder = workdir / shape
    home = RandomHome(folder, keep_files=args.keep_files)
    pruning = PruningConfig(method="sparsegpt", sparsity=args.sparsity)
    runtime = RuntimeConfig(batch_size=args.batch_size, track_error=False)
    quant = QuantizationConfig(method=args.quant, joint=args.joint)
    pruner = SequentialPruner(model, pruning, runtime, device, homes=home, keep_masks=False, quantization=quant)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    reports = pruner.run(calib, progress=args.progress)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    block_seconds = [r.seconds for r in reports]
    capture = seconds - sum(block_seconds)
    steady = block_seconds[1:] or block_seconds
    per_block = sum(steady) / len(steady)
    sparsity = [sum(r.sparsity.values()) / len(r.sparsity) for r in reports]
    written = sum(f.stat().st_size for f in folder.glob("*.safetensors")) if folder.exists() else 0
    rec = {
        "model": f"{shape}-shape", "what": "lr-sparsegpt-model", "pattern": f"{args.sparsity:g}",
        "quantizer": None if args.quant == "none" else args.quant,
        "joint": pruner.joint if args.quant == "gptq" else None,
        "blocks": total_blocks, "blocks_run": n, "tokens": f"{args.samples} x {args.seqlen}",
        "batch_size": args.batch_size, "dtype": "bfloat16", "activations": "gpu" if device.type == "cuda" else "cpu",
        "seconds": round(seconds, 2), "capture_seconds": round(capture, 2),
        "seconds_per_block": round(per_block, 3), "first_block_seconds": round(block_seconds[0], 3),
        "projected_total_seconds": round(capture + block_seconds[0] + per_block * (total_blocks - 1), 1),
        "peak_gpu_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if device.type == "cuda" else None,
        "peak_gpu_reserved_gb": round(torch.cuda.max_memory_reserved() / 1e9, 2) if device.type == "cuda" else None,
        "peak_host_gb": round(peak_host_gb(), 2),
        "mean_layer_sparsity": round(sum(sparsity) / len(sparsity), 4),
        "blocks_written_gb": round(written / 1e9, 2),
        "masks_in_memory": len(pruner.masks),
    }
    if not args.keep_files or args.cleanup:
        shutil.rmtree(folder, ignore_errors=True)
    del model, pruner
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", nargs="+", default=["llama-7b"], choices=sorted(SHAPES))
    ap.add_argument("--blocks", type=int, default=0, help="run the first N blocks (0: all)")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--batch-size", type=int, default=8, help="calibration windows per block forward")
    ap.add_argument("--quant", default="none", choices=QUANT_METHODS, help="INT4 g128 weights after or with pruning")
    ap.add_argument("--no-joint", dest="joint", action="store_false",
                    help="GPTQ after SparseGPT with masks fixed, not in one sweep")
    ap.add_argument("--no-keep-files", dest="keep_files", action="store_false",
                    help="free each pruned block without writing it (disks smaller than the model)")
    ap.add_argument("--cleanup", action="store_true", help="delete the written blocks at the end")
    ap.add_argument("--workdir", default=None, help="where pruned blocks are written (default: a temp folder)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="scale-"))
    records = []
    for shape in args.shape:
        rec = run_shape(shape, args, device, workdir)
        print(json.dumps(rec), flush=True)
        records.append(rec)
    if args.out:
        write_bench_results(args.out, machine_name(device), records)


if __name__ == "__main__":
    main()
