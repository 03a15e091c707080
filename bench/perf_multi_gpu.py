"""Multi-GPU speed: SparseGPT 50% (LR, and BR+GP) of a LLaMA-7B-shaped random model on 1 and on N GPUs.

    python bench/perf_multi_gpu.py --devices 1 2 --out bench/results/perf_multi_gpu.json
    python bench/perf_multi_gpu.py --devices 1 2 --protocol-only --out bench/results/perf_multi_gpu_protocol.json
    python bench/perf_multi_gpu.py --smoke      # CPU, gloo, a tiny Llama: proves the launch and the comparison

Each device count is a fresh ``torchrun --standalone --nproc_per_node N`` of this file (``--worker``), so the
runs do not share a process or a warm allocator. Every rank builds the model on its device from one seed and
then takes rank 0's weights by broadcast (identical by construction); the calibration windows are random token
ids (``--samples x --seqlen``, seeded) which ``SequentialPruner`` shards across ranks. Timed: ``pruner.run``
from the capture of block 0's inputs to the last block's output on every rank (statistics, reductions, owner
pruning, broadcasts and the per-block rank checksum included; model building excluded), rank 0's clock
between two barriers. The model keeps its embeddings and head but only ``--blocks`` of LLaMA-7B's 32 decoder
blocks (default 8, to keep the call short); the per-block figure is what scales to 32.

Three measurements (``--what``, all by default): ``lr``, SparseGPT 50% with 128 x 2048 windows over ``--blocks``
blocks (default 8), batch 8; ``br+gp``, SparseGPT 50% then BR+GP reconstruction of each block (256 x 1024 windows,
10 epochs, batch 8 in all, bf16-mixed) over 2 blocks, the second one's time being the steady per-block figure;
``br+gp-bf16``, the same with gradients averaged in bfloat16 (``reconstruction.gradient_allreduce``), on several
devices only, against ``br+gp``'s 1-device run.

Recorded per measurement and device count: ``devices``, ``seconds``, ``speedup_vs_1`` (of ``seconds``),
``allreduce_gb_per_s`` (several devices: a 256 MiB float32 all-reduce's size over its time, measured first),
``phases_per_block`` (rank 0's seconds per phase of a steady block: ``BlockReport.phases``),
``seconds_per_block`` (blocks after the first) and its ``speedup_per_block``, and for LR
``mask_agreement_vs_1``: the fraction of mask entries equal to the 1-device run's (the Gram matrices are
summed in another order, so a weight at an exact tie may flip; 1.0 expected in practice).

``--protocol``: also runs the shared SmolLM2 protocol (``configs/protocol.yaml``, SparseGPT 50%) through the
CLI on 1 device and under torchrun on N, and records both perplexities and their relative difference.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                vocab_size=32000, max_position_embeddings=4096)
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
            max_position_embeddings=256)


def build_model(shape: dict, blocks: int, device: torch.device, dtype: torch.dtype, group):
    """A random Llama of ``shape`` with ``blocks`` decoder blocks on ``device``, identical on every rank."""
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(num_hidden_layers=blocks, **shape)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
        if group.distributed:
            dist.broadcast(p.data, 0)
    return model


def allreduce_bandwidth(device: torch.device, mib: int = 256, reps: int = 5) -> float:
    """GB/s of an all-reduce of a ``mib``-MiB float32 tensor over the ranks (its size over the median time of ``reps``
    after one warm-up): the link the Gram sums, the broadcasts and DDP's gradients cross."""
    import torch.distributed as dist

    x = torch.ones(mib * 2**18, device=device)
    times = []
    for _ in range(reps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        dist.all_reduce(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    return round(x.numel() * 4 / sorted(times[1:])[reps // 2] / 1e9, 2)


def worker(args) -> None:
    """One rank of one device count: prune, time, write rank 0's record (and masks, or their agreement)."""
    from compressor.config import PruningConfig, RuntimeConfig
    from compressor.distributed import init_from_env
    from compressor.reconstruction.module import ReconstructionConfig
    from compressor.sequential import SequentialPruner

    gpu = not args.smoke
    group = init_from_env("gpu" if gpu else "cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if gpu else torch.device("cpu")
    if gpu:
        torch.cuda.set_device(device)
    shape = TINY if args.smoke else LLAMA_7B
    model = build_model(shape, args.blocks, device, torch.float32 if args.smoke else torch.bfloat16, group)
    calib = torch.randint(0, shape["vocab_size"], (args.samples, args.seqlen),
                          generator=torch.Generator().manual_seed(0))
    recon = ReconstructionConfig()
    if args.what != "lr":
        recon = ReconstructionConfig(mode="br+gp", epochs=args.epochs, batch_size=args.batch_size,
                                     precision="32-true" if args.smoke else "bf16-mixed",
                                     gradient_allreduce="bfloat16" if args.what == "br+gp-bf16" else "float32")
    pruner = SequentialPruner(model, PruningConfig(method="sparsegpt", sparsity=0.5),
                              RuntimeConfig(batch_size=args.batch_size, track_error=False), device,
                              reconstruction=recon, accelerator="gpu" if gpu else "cpu", group=group)
    bandwidth = allreduce_bandwidth(device) if group.distributed else None
    group.barrier()
    if gpu:
        torch.cuda.synchronize()
    t = time.perf_counter()
    reports = pruner.run(calib, progress=False)
    if gpu:
        torch.cuda.synchronize()
    group.barrier()
    seconds = time.perf_counter() - t
    if not group.is_main:
        return
    steady = [r.seconds for r in reports][1:] or [reports[0].seconds]
    later = reports[1:] or reports[:1]
    phases = {k: round(sum(r.phases.get(k, 0.0) for r in later) / len(later), 3)
              for k in dict.fromkeys(k for r in later for k in r.phases)}
    record = {"what": f"{args.what}-sparsegpt-0.5", "devices": group.world_size, "seconds": round(seconds, 3),
              "seconds_per_block": round(sum(steady) / len(steady), 3), "blocks_run": args.blocks,
              "tokens": f"{args.samples} x {args.seqlen}", "batch_size": args.batch_size,
              "peak_gpu_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if gpu else None,
              "allreduce_gb_per_s": bandwidth, "phases_per_block": phases}
    if args.what != "lr":
        record["epochs"] = args.epochs
        record["gradient_allreduce"] = recon.gradient_allreduce
        record["training_seconds_per_block"] = [round(r.training[0]["seconds"], 3) for r in reports]
        Path(args.record).write_text(json.dumps(record))
        return
    masks = Path(args.masks)
    if group.world_size == 1:
        torch.save(pruner.masks, masks)
    elif masks.is_file():
        ref = torch.load(masks)
        same = sum(int((pruner.masks[k] == m).sum()) for k, m in ref.items())
        record["mask_agreement_vs_1"] = same / sum(m.numel() for m in ref.values())
    Path(args.record).write_text(json.dumps(record))


def launch(n: int, what: str, args, folder: Path) -> dict:
    """One torchrun of ``n`` processes for measurement ``what``; returns rank 0's record."""
    record = folder / f"{what}_devices{n}.json"
    small = args.smoke
    if what == "lr":
        blocks, samples, seqlen = args.blocks or (2 if small else 8), args.samples or (8 if small else 128), \
            args.seqlen or (64 if small else 2048)
    else:
        blocks, samples, seqlen = 2, args.samples or (8 if small else 256), args.seqlen or (64 if small else 1024)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", __file__,
           "--worker", "--what", what, "--record", str(record), "--masks", str(folder / "masks_1.pt"),
           "--blocks", str(blocks), "--samples", str(samples), "--seqlen", str(seqlen),
           "--batch-size", str(args.batch_size), "--epochs", str(args.epochs)]
    if args.smoke:
        cmd.append("--smoke")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1" if args.smoke else "8")}
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)
    return json.loads(record.read_text())


def protocol(n: int, folder: Path, config: str, concurrent: bool = False) -> dict:
    """The shared SmolLM2 protocol (``config``) by the CLI on 1 device and under torchrun on ``n``.

    Output folders are ``folder/protocol<devices>``: a rerun with the same ``folder`` resumes from their
    checkpoints. ``concurrent`` starts both runs at once (they share GPU 0): the perplexities are unaffected,
    the seconds are then no speed figure."""
    base = ["cli.py", "fit", "--config", config, "--output.plots", "false"]
    runs = {}
    for devices in (1, n):
        out = folder / f"protocol{devices}"
        extra = ["--output.dir", str(out)]
        if devices == 1:
            cmd = [sys.executable, *base, *extra]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={devices}",
                   *base, *extra, "--trainer.devices", str(devices), "--trainer.strategy", "ddp"]
        print("$", " ".join(cmd), flush=True)
        runs[devices] = (out, subprocess.Popen(cmd, cwd=ROOT))
        if not concurrent:
            wait(runs[devices][1])
    ppl = {}
    for devices, (out, proc) in runs.items():
        wait(proc, [p for _, p in runs.values()])
        report = json.loads((out / "report.json").read_text())
        ppl[devices] = {"perplexity": report["perplexity"]["compressed"],
                        "seconds": round(report["timings"]["total"], 1),  # the run's own, read from its report
                        "resumed_blocks": report.get("resumed_blocks"), "date": report.get("date")}
    a, b = (next(iter(ppl[d]["perplexity"].values())) for d in (1, n))
    return {"what": "protocol", "config": config, "devices": [1, n], "runs": ppl, "concurrent": concurrent,
            "relative_difference": abs(b - a) / a}


def wait(proc: subprocess.Popen, others: list[subprocess.Popen] = ()) -> None:
    """Wait for ``proc``; when it fails, stop ``others`` still running and exit naming the command."""
    if proc.wait() != 0:
        for other in others:
            if other.poll() is None:
                other.terminate()
        raise SystemExit(f"{' '.join(map(str, proc.args))} failed with exit status {proc.returncode}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, nargs="+", default=[1, 2], help="device counts to time (1 first)")
    p.add_argument("--what", nargs="+", default=["lr", "br+gp", "br+gp-bf16"], choices=["lr", "br+gp", "br+gp-bf16"],
                   help="measurements (br+gp-bf16: several devices only, against br+gp's 1-device run)")
    p.add_argument("--blocks", type=int, default=None, help="LR: decoder blocks of the model (default 8; smoke 2)")
    p.add_argument("--samples", type=int, default=None, help="windows (default LR 128, BR+GP 256; smoke 8)")
    p.add_argument("--seqlen", type=int, default=None, help="tokens per window (default LR 2048, BR+GP 1024; "
                                                             "smoke 64)")
    p.add_argument("--batch-size", type=int, default=None, help="windows per forward and per training step in all "
                                                                 "(default 8; smoke 2)")
    p.add_argument("--epochs", type=int, default=None, help="BR+GP epochs (default 10; smoke 2)")
    p.add_argument("--smoke", action="store_true", help="CPU, gloo, a tiny Llama")
    p.add_argument("--protocol", action="store_true", help="also the SmolLM2 protocol's perplexity on 1 and N")
    p.add_argument("--protocol-only", action="store_true", help="only the protocol (no timings)")
    p.add_argument("--protocol-config", default="configs/protocol.yaml", help="the protocol's config file")
    p.add_argument("--protocol-dir", default=None, help="keep the protocol runs' output folders here (a rerun "
                                                        "resumes them; default: a temporary folder)")
    p.add_argument("--concurrent", action="store_true", help="protocol: run 1 and N devices at once (perplexity "
                                                             "only; their seconds are then no speed figure)")
    p.add_argument("--out", default=None, help="results file (default bench/results/perf_multi_gpu.json; smoke: "
                                               "a temporary folder's)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--record", help=argparse.SUPPRESS)
    p.add_argument("--masks", help=argparse.SUPPRESS)
    args = p.parse_args()
    small = args.smoke
    args.batch_size = args.batch_size or (2 if small else 8)
    args.epochs = args.epochs or (2 if small else 10)
    if args.worker:
        args.what = args.what[0]
        worker(args)
        return
    from compressor.io import write_bench_results

    if "br+gp-bf16" in args.what and "br+gp" not in args.what[:args.what.index("br+gp-bf16")]:
        p.error("--what br+gp-bf16 is timed against br+gp's 1-device run: list br+gp before it")
    if args.devices[0] != 1:
        args.devices = [1, *args.devices]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        records = []
        ones = {}  # measurement -> its 1-device record
        for what in [] if args.protocol_only else args.what:
            several = what == "br+gp-bf16"  # bf16 gradient averaging changes nothing on one device
            runs = [launch(n, what, args, folder) for n in args.devices if not (several and n == 1)]
            base = ones.get("br+gp") if several else runs[0]
            ones[what] = base
            for r in runs:
                r["speedup_vs_1"] = round(base["seconds"] / r["seconds"], 3)
                r["speedup_per_block"] = round(base["seconds_per_block"] / r["seconds_per_block"], 3)
                r.update(model="tiny-llama" if small else "llama-7b-shape", dtype="float32" if small else "bfloat16",
                         note=f"{r['blocks_run']} of {'2' if small else '32'} decoder blocks; random weights and "
                              "token ids")
                print(f"{what}, {r['devices']} device(s): {r['seconds']:.2f}s ({r['seconds_per_block']:.3f}s per "
                      f"block), speedup {r['speedup_vs_1']:.2f}x ({r['speedup_per_block']:.2f}x per block)"
                      + (f", masks agree {r['mask_agreement_vs_1']:.6f}" if "mask_agreement_vs_1" in r else "")
                      + "\n    per block: " + ", ".join(f"{k} {v:.3f}s" for k, v in r["phases_per_block"].items())
                      + (f"; all-reduce {r['allreduce_gb_per_s']} GB/s" if r["allreduce_gb_per_s"] else ""))
            records += runs
        if args.protocol or args.protocol_only:
            rec = protocol(max(args.devices), Path(args.protocol_dir) if args.protocol_dir else folder,
                           args.protocol_config, args.concurrent)
            print(f"protocol: perplexity relative difference {rec['relative_difference']:.2e}")
            records.append(rec)
        machine = "CPU (gloo)" if small else torch.cuda.get_device_name(0)
        out = Path(args.out) if args.out else (folder.parent / "perf_multi_gpu_smoke.json" if small
                                               else ROOT / "bench/results/perf_multi_gpu.json")
        print("written", write_bench_results(out, f"{max(args.devices)} x {machine}", records))


if __name__ == "__main__":
    main()
