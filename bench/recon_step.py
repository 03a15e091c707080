"""Milliseconds per reconstruction step of one LLaMA-7B-shaped block: the Lightning fit against a bare loop.

    python bench/recon_step.py --out bench/results/perf_recon_step.json     # one GPU
    python bench/recon_step.py --smoke                                       # CPU, a tiny block: the path runs

For each batch size (default 8, and 4: one rank's share of batch 8 on two GPUs) the block (random weights, bf16
storage, 50% magnitude masks, inputs and targets resident on the device) is trained with bf16-mixed precision:

* ``lightning_ms_per_step``: ``compressor.reconstruction.fit.fit_window`` (a fresh Trainer per window, as the
  pipeline runs it) over ``--samples`` windows for ``--epochs`` epochs, Trainer set-up and teardown included,
  divided by its steps;
* ``bare_ms_per_step``: the same ``BlockReconstruction`` module, optimizer and masking stepped by a plain loop
  (forward under autocast, backward, gradient masks, fused AdamW, weight masks), 30 steps after 3 warm-up steps.

The difference is what the Trainer costs. The bare loop's time at batch 8 over its time at batch 4 bounds what two
data-parallel GPUs can gain per step on this block even with free communication (each rank still pays the fixed
per-step work: the optimizer over every weight, the masks).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compressor.engine import BlockKwargs  # noqa: E402
from compressor.io import write_bench_results  # noqa: E402
from compressor.models.adapters import is_linear, set_weight, weight_of  # noqa: E402
from compressor.pruning.masks import magnitude_mask  # noqa: E402
from compressor.reconstruction.fit import fit_window, float32_master  # noqa: E402
from compressor.reconstruction.module import BlockReconstruction, ReconstructionConfig, window_masks  # noqa: E402

LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32)
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def masked_block(shape: dict, device: torch.device):
    """A LLaMA decoder block of ``shape`` in bf16 on ``device``, half of each linear weight zeroed by magnitude, and
    its rotary embedding; returns ``(block, masks by linear name, rotary)``."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    cfg = LlamaConfig(**shape, num_key_value_heads=shape["num_attention_heads"], num_hidden_layers=1,
                      max_position_embeddings=4096)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    block = LlamaDecoderLayer(cfg, layer_idx=0).to(device, torch.bfloat16)
    masks = {}
    with torch.no_grad():
        for name, m in block.named_modules():
            if is_linear(m):
                masks[name] = magnitude_mask(weight_of(m), 0.5)
                set_weight(m, weight_of(m) * masks[name])
    return block, masks, LlamaRotaryEmbedding(cfg).to(device)


def bare_ms_per_step(block, masks, kwargs: BlockKwargs, inputs, targets, cfg: ReconstructionConfig,
                     device: torch.device, steps: int = 30) -> float:
    """Milliseconds per step of ``BlockReconstruction`` stepped by hand (no Trainer), after 3 warm-up steps."""
    with float32_master([block]), torch.enable_grad():
        module = BlockReconstruction([block], window_masks([block], [masks], weight_of), kwargs, cfg, 1000)
        optimizer = module.configure_optimizers()["optimizer"]

        def step(i: int) -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = F.mse_loss(module(inputs[i % len(inputs)]).float(), targets[i % len(targets)].float())
            loss.backward()
            module.on_before_optimizer_step(optimizer)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            module.on_train_batch_end(None, None, i)

        for i in range(3):
            step(i)
        sync(device)
        t = time.perf_counter()
        for i in range(steps):
            step(i)
        sync(device)
        seconds = (time.perf_counter() - t) / steps
    for p in block.parameters():
        p.requires_grad_(False)
    return seconds * 1e3


def measure(block, masks, rotary, x: torch.Tensor, batch: int, epochs: int, device: torch.device) -> dict:
    seqlen = x.shape[1]
    position = rotary(x[:batch], torch.arange(seqlen, device=device).unsqueeze(0))
    kwargs = BlockKwargs([block], [{(batch, seqlen): {"attention_mask": None, "position_embeddings": position}}])
    inputs = list(x.split(batch))
    with torch.no_grad():
        targets = [block(b, **kwargs.of(block, (batch, seqlen))) for b in inputs]
        targets = [t[0] if isinstance(t, tuple) else t for t in targets]
    cfg = ReconstructionConfig(mode="br+gp", epochs=epochs, batch_size=batch, precision="bf16-mixed")
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    masked = window_masks([block], [masks], weight_of)
    fit_window([block], masked, kwargs, inputs[:2], targets[:2], cfg, "warm-up", accelerator=accelerator)
    sync(device)
    t = time.perf_counter()
    stats = fit_window([block], masked, kwargs, inputs, targets, cfg, "timed", accelerator=accelerator)
    sync(device)
    lightning = (time.perf_counter() - t) / stats["steps"] * 1e3
    bare = bare_ms_per_step(block, masks, kwargs, inputs, targets, cfg, device)
    return {"batch_size": batch, "steps": stats["steps"], "lightning_ms_per_step": round(lightning, 2),
            "bare_ms_per_step": round(bare, 2), "trainer_overhead": round(lightning / bare - 1, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 4])
    ap.add_argument("--samples", type=int, default=None, help="windows (default 128; smoke 8)")
    ap.add_argument("--seqlen", type=int, default=None, help="tokens per window (default 1024; smoke 32)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="CPU, a tiny block")
    ap.add_argument("--out", default=None, help="results file (default bench/results/perf_recon_step.json; smoke: "
                                                "not written)")
    args = ap.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    shape = TINY if args.smoke else LLAMA_7B
    samples, seqlen = args.samples or (8 if args.smoke else 128), args.seqlen or (32 if args.smoke else 1024)
    block, masks, rotary = masked_block(shape, device)
    x = torch.randn(samples, seqlen, shape["hidden_size"], device=device, dtype=torch.bfloat16)
    records = []
    for batch in args.batch_sizes:
        rec = {"model": "tiny-llama" if args.smoke else "llama-7b-shape", "tokens": f"{samples} x {seqlen}",
               "epochs": args.epochs, **measure(block, masks, rotary, x, batch, args.epochs, device)}
        print(rec, flush=True)
        records.append(rec)
    by_batch = {r["batch_size"]: r["bare_ms_per_step"] for r in records}
    if len(by_batch) > 1:
        big, small = max(by_batch), min(by_batch)
        bound = by_batch[big] / by_batch[small]
        print(f"bare step at batch {big} over batch {small}: {bound:.2f}x (the most {big // small} data-parallel "
              f"ranks can gain per step)")
        records.append({"what": "data_parallel_bound", "batch_sizes": [big, small], "ratio": round(bound, 3)})
    if not args.smoke:
        out = Path(args.out) if args.out else ROOT / "bench/results/perf_recon_step.json"
        print("written", write_bench_results(out, torch.cuda.get_device_name(device), records))


if __name__ == "__main__":
    main()
