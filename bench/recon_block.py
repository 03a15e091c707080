"""Time and memory of reconstructing one LLaMA-7B-shaped block (random weights, 50% masks).

    python bench/recon_block.py --precision 32-true bf16-mixed --out bench/results/perf_recon_block.json

The block is a transformers LlamaDecoderLayer of the given shape; inputs are random activations
(256 x 1024 tokens by default) resident on the GPU; targets are the dense block's outputs; masks
come from magnitude pruning at 50%. Training is the project's BlockReconstruction fitted by a
Lightning Trainer for the given epochs (batch 8, AdamW, linear decay). BR+GP: the targets are the dense
block's outputs on the dense stream, computed here and counted in ``seconds`` (what GP adds per block);
``fit_seconds`` is the training alone (what BR costs given its targets).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compressor.engine import BlockKwargs  # noqa: E402
from compressor.io import atomic_write_json  # noqa: E402
from compressor.models.adapters import is_linear, set_weight, weight_of  # noqa: E402
from compressor.pruning.masks import magnitude_mask  # noqa: E402
from compressor.reconstruction.fit import fit_window  # noqa: E402
from compressor.reconstruction.module import ReconstructionConfig, window_masks  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--mlp", type=int, default=11008)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--precision", nargs="+", default=["32-true", "bf16-mixed"])
    ap.add_argument("--out", default="bench/results/perf_recon_block.json")
    args = ap.parse_args()
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    device = torch.device("cuda")
    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.mlp, num_attention_heads=args.heads,
                      num_key_value_heads=args.heads, num_hidden_layers=1, max_position_embeddings=4096)
    cfg._attn_implementation = "sdpa"
    records = []
    for precision in args.precision:
        torch.manual_seed(0)
        block = LlamaDecoderLayer(cfg, layer_idx=0).to(device)
        for p in block.parameters():
            if p.dim() == 2:
                torch.nn.init.normal_(p, std=0.02)
        rotary = LlamaRotaryEmbedding(cfg).to(device)
        x = torch.randn(args.samples, args.seqlen, args.hidden, device=device)
        kwargs = {"attention_mask": None,
                  "position_embeddings": rotary(x[:8], torch.arange(args.seqlen, device=device).unsqueeze(0))}
        inputs = list(x.split(8))
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():  # GP: the targets are the dense block's outputs on the dense stream
            targets = [block(b, **kwargs) for b in inputs]
            targets = [t[0] if isinstance(t, tuple) else t for t in targets]
        torch.cuda.synchronize()
        target_seconds = time.perf_counter() - t
        with torch.no_grad():
            masks = {}
            for name, m in block.named_modules():
                if is_linear(m):
                    masks[name] = magnitude_mask(weight_of(m), 0.5)
                    set_weight(m, weight_of(m) * masks[name])
        masked = window_masks([block], [masks], weight_of)
        rc = ReconstructionConfig(mode="br+gp", epochs=args.epochs, precision=precision)
        torch.cuda.synchronize()
        t = time.perf_counter()
        stats = fit_window([block], masked, BlockKwargs([block], [{(8, args.seqlen): kwargs}]), inputs, targets, rc, "bench",
                           accelerator="gpu")
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t + target_seconds
        zeros_ok = all(bool((p[~k] == 0).all()) for p, k in masked)
        rec = {"model": "llama-7b-shape", "what": "br+gp-block", "precision": precision,
               "tokens": f"{args.samples} x {args.seqlen}", "epochs": args.epochs, "steps": stats["steps"],
               "seconds": round(seconds, 2), "fit_seconds": round(stats["seconds"], 2),
               "dense_target_seconds": round(target_seconds, 3),
               "peak_gpu_gb": round(stats["peak_gpu_gb"], 2), "final_epoch_loss": stats["last_epoch_loss"],
               "masks_held": zeros_ok,
               "note": "peak includes the resident inputs and targets (%.1f GB)" % (2 * x.numel() * 4 / 1e9)}
        print(json.dumps(rec), flush=True)
        records.append(rec)
        del block, x, inputs, targets, masked
        torch.cuda.empty_cache()
    atomic_write_json(args.out, {"machine": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
                                 "command": "python " + " ".join(sys.argv), "records": records})


if __name__ == "__main__":
    main()
