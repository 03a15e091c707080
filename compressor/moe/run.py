"""The MoE step of a run: convert, save the tables, return the report section."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from compressor.models.adapters import ModelAdapter
from compressor.moe.config import MoEConfig
from compressor.moe.convert import convert_model
from compressor.moe.ffn import ffn_module, ffn_spec, ffn_width
from compressor.moe.io import FILE, save_moe
from compressor.moe.stats import ffn_flops_fraction

log = logging.getLogger(__name__)


def plot_recall(blocks: list[dict], path: Path) -> Path | None:
    """Held-out router recall per block, before and after training."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.5))
    idx = [b["index"] for b in blocks]
    ax.plot(idx, [b["router"]["recall_init"] for b in blocks], "o--", label="centroid init")
    ax.plot(idx, [b["router"]["recall"] for b in blocks], "o-", label="trained")
    ax.set_xlabel("block")
    ax.set_ylabel("recall of target mass in top 20%")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_moe(model, calib_windows: torch.Tensor, cfg: MoEConfig, out_dir: str | Path, device,
            progress: bool = True, batch_size: int = 1, plots: bool = True) -> dict:
    """Convert ``model``'s FFNs (G-MoEfication) on ``calib_windows`` ``[n, seqlen]``, write ``out_dir/moe.safetensors``
    (and ``moe_recall.png``); returns the report section. Raises ConfigError before any work on a bad model/config."""
    out = Path(out_dir)
    t = time.perf_counter()
    blocks = convert_model(model, calib_windows, cfg, device, batch_size, progress)
    seconds = time.perf_counter() - t
    spec = ffn_spec(model.config.model_type)
    first = ffn_module(ModelAdapter(model).blocks[0], spec)
    d = first.router_proj.shape[1]
    d_ff = ffn_width(first, spec)
    path = save_moe(model, out / FILE)
    section = {
        "experts": cfg.experts, "k": cfg.k, "variant": cfg.variant, "train_router": cfg.train_router,
        "active_fraction": cfg.active_fraction,
        "ffn_flops_fraction": ffn_flops_fraction(d, d_ff, cfg.experts, cfg.k, spec.gated),
        "ffn_flops_fraction_experts_only": ffn_flops_fraction(d, d_ff, cfg.experts, cfg.k, spec.gated, router=False),
        "router_recall_mean": sum(b["router"]["recall"] for b in blocks) / len(blocks),
        "router_recall_init_mean": sum(b["router"]["recall_init"] for b in blocks) / len(blocks),
        "router_train_seconds": sum(b["router"]["seconds"] for b in blocks),
        "kmeans_seconds": sum(b["kmeans_seconds"] for b in blocks),
        "seconds": seconds,
        "blocks": blocks,
        "outputs": {"tables": str(path)},
    }
    if plots:
        plot = plot_recall(blocks, out / "moe_recall.png")
        if plot:
            section["outputs"]["recall_plot"] = str(plot)
    log.info("moe: %d blocks, k=%d of %d (%s), mean router recall %.3f, routers %.1fs, k-means %.1fs", len(blocks),
             cfg.k, cfg.experts, cfg.variant, section["router_recall_mean"], section["router_train_seconds"],
             section["kmeans_seconds"])
    return section
