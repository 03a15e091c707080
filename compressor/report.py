"""The end of a run: JSON report, console summary table and plots."""

from __future__ import annotations

import logging
from pathlib import Path

from compressor.io import atomic_write
from compressor.zeroshot.harness import DERIVED_NOTE, table_rows

log = logging.getLogger(__name__)


def _fmt(x, digits: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}" if abs(x) >= 0.01 or x == 0 else f"{x:.2e}"
    return str(x)


_DTYPE_BITS = {"float32": 32, "bfloat16": 16, "float16": 16}


def _fmt_count(x) -> str:
    return "-" if x is None else f"{x:,}"


def summary_table(report: dict):
    """A rich Table: dense vs compressed side by side."""
    from rich.table import Table

    pruning = report.get("pruning")
    recon = pruning.get("reconstruction", "lr") if pruning else "lr"
    what = [f"{pruning['method']} {pruning['pattern']}, reconstruction {recon}"] if pruning else []
    if report.get("activations"):
        what.append(f"W8A8 {report['activations']['granularity']}")
    table = Table(title=f"compressor: {report['model']['name']} ({'; '.join(what) or 'no stage'})")
    table.add_column("metric")
    table.add_column("dense", justify="right")
    table.add_column("compressed", justify="right")
    ppl = report.get("perplexity", {})
    for corpus, values in ppl.get("compressed", {}).items():
        label = "held-out generated text" if corpus == "generated" else Path(corpus).name
        table.add_row(f"perplexity ({label})", _fmt(ppl.get("dense", {}).get(corpus)), _fmt(values))
    sp = report.get("sparsity")
    model = report["model"]
    if sp:
        # the dense column shows the source model as loaded (an input that is already sparse shows it), never assumed
        table.add_row("sparsity of pruned linears", _fmt(sp.get("dense"), 4),
                      f"{sp['achieved']:.4f} (target {sp['target']:.4f})")
    table.add_row(f"nonzero parameters (of {model['parameters']:,})", _fmt_count(model.get("dense_nonzero")),
                  f"{model['nonzero']:,}")
    table.add_row("weights dtype (as saved)", model.get("dtype") or "-", model.get("dtype") or "-")
    blocks = report.get("blocks") or []
    if blocks and blocks[-1].get("calib_rel_error") is not None:
        last = blocks[-1]
        table.add_row("final-block rel. error vs dense (calib / held-out)", "",
                      f"{_fmt(last['calib_rel_error'], 4)} / {_fmt(last.get('heldout_rel_error'), 4)}")
        if recon != "lr":
            table.add_row("final-block calib rel. error before training", "",
                          _fmt(last.get("calib_rel_error_pruned"), 4))
            seconds = sum(t["seconds"] for b in blocks for t in b.get("training", []))
            table.add_row("reconstruction training time (s)", "", f"{seconds:.1f}")
    sched = report.get("schedule")
    if sched:
        sp_values = list(sched["sparsity"].values())
        table.add_row(f"schedule ({sched['allocator']} per {sched['granularity']})", "",
                      f"{min(sp_values):.3f} .. {max(sp_values):.3f}, mean {sched['mean']:.4f} "
                      f"({sched['seconds']:.1f}s dense pass)")
    quant = report.get("quantization")
    if quant:
        bpw = quant["bits_per_weight"]
        how = " (one sweep with pruning)" if quant.get("joint") else ""
        dtype = model.get("dtype")
        dense_bits = f"{_DTYPE_BITS[dtype]} ({dtype})" if dtype in _DTYPE_BITS else "-"
        table.add_row(f"weights: {quant['method']} INT{quant['bits']} g{quant['group_size']}{how}", dense_bits,
                      f"{bpw['total']:.3f} bits/weight (values {bpw['values']:.2f} + mask {bpw['mask']:.2f} "
                      f"+ scales {bpw['scales']:.3f})")
    act = report.get("activations")
    if act:
        sq = f", SmoothQuant alpha {act['smoothquant_alpha']}" if act["smoothquant"] else ""
        weights = f"W{act['weight_bits']}" if act["weight_bits"] else "weights kept"
        table.add_row(f"activations: {act['granularity']} A{act['bits']}{sq}", "",
                      f"{weights}; {act['quantized_inputs']} inputs of {act['quantized_layers']} layers, "
                      f"largest |x| {_fmt(act['largest_input_absmax'])}")
    cushion = report.get("cushion")
    if cushion:
        ratio = cushion.get("last_block_max_to_median") or {}
        table.add_row(f"cushion prefix ({cushion.get('method')}, {cushion.get('prefix_len')} tokens)",
                      f"max/median {_fmt(ratio.get('without'))}",
                      f"{' '.join(repr(t) for t in cushion.get('tokens') or [])}; max/median {_fmt(ratio.get('with'))}")
    export = report.get("export")
    if export:
        dense = export.get("dense_layers") or {}
        table.add_row(f"model/ as {export['format']} ({export['scheme']})", "",
                      f"{export['packed_layers']} layers packed, {len(dense)} left dense (report.json export)")
        if export.get("note"):
            table.add_row("export note", "", export["note"])
    for row in table_rows(report.get("zeroshot")):
        table.add_row(*row)
    if report.get("resumed_blocks"):
        table.add_row("blocks resumed from checkpoints", "",
                      f"{report['resumed_blocks']} of {model.get('blocks', '?')}")
    t = report["timings"]
    stage_times = " / ".join(f"{name} {t[name]:.1f}" for name in report.get("stages", []) if name in t)
    table.add_row("time: stages / total (s)", "", f"{stage_times or '-'} / {t['total']:.1f}")
    mem = report["peak_memory"]
    table.add_row("peak memory GPU / host (GB)", "", f"{_fmt(mem.get('gpu_gb'))} / {_fmt(mem['host_gb'])}")
    table.add_row("outputs", "", report["outputs"]["dir"])
    ckpt = report.get("checkpoints")
    if ckpt:
        table.add_row("checkpoints", "", f"{'kept' if ckpt['kept'] else 'removed'} ({ckpt['bytes'] / 1e6:.0f} MB)")
    return table


def print_summary(report: dict) -> None:
    from rich.console import Console

    Console().print(summary_table(report))
    if "generated" in report.get("perplexity", {}).get("compressed", {}):
        print("Perplexity 'generated' is measured on held-out text the dense model wrote itself (no corpus given).")
    if (report.get("zeroshot") or {}).get("derived_data"):
        print(f"Zero-shot: {DERIVED_NOTE}.")


def plot_sparsity(per_layer: dict[str, float], path: Path, target: float) -> Path:
    """Bar chart of achieved sparsity per linear layer, in model order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(per_layer)
    fig, ax = plt.subplots(figsize=(max(8, len(names) * 0.05), 4))
    ax.bar(range(len(names)), [per_layer[n] for n in names], width=1.0, color="tab:blue")
    ax.axhline(target, color="tab:red", lw=1, ls="--", label=f"target {target:.3f}")
    ax.set_xlabel("linear layer (model order)")
    ax.set_ylabel("sparsity")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title("Achieved sparsity per layer")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    return path


def plot_block_error(blocks: list[dict], path: Path) -> Path | None:
    """Per-block relative reconstruction error (calibration and held-out), log scale."""
    if not blocks or blocks[0].get("calib_rel_error") is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = [b["index"] for b in blocks]
    fig, ax = plt.subplots(figsize=(8, 4))
    trained = any(b.get("training") for b in blocks)
    suffix = " (after training)" if trained else ""
    ax.plot(idx, [b["calib_rel_error"] for b in blocks], marker="o", label="calibration" + suffix)
    if blocks[0].get("heldout_rel_error") is not None:
        ax.plot(idx, [b["heldout_rel_error"] for b in blocks], marker="s", label="held-out" + suffix)
    if trained and blocks[0].get("calib_rel_error_pruned") is not None:
        ax.plot(idx, [b["calib_rel_error_pruned"] for b in blocks], ls="--", color="gray",
                label="calibration, after pruning (before training)")
    ax.set_yscale("log")
    ax.set_xlabel("block")
    ax.set_ylabel("||dense - sparse||^2 / ||dense||^2")
    ax.set_title("Reconstruction error per block (vs the dense model)")
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    return path
