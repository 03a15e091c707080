"""The cushion stage of a run: find (and tune) the prefix, measure the outliers before and after, save.

Outputs in the run folder: ``cushion.safetensors`` (the prefix; the run copies it into ``model/``),
``cushion_outliers.png`` and, while searching, ``checkpoints/cushion_search.json`` (the accepted
tokens after every greedy step: a rerun with the same settings and data continues from them).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch

from compressor.checkpoint import tensor_fingerprint
from compressor.cushion.config import CushionConfig
from compressor.cushion.error import ratio_to_median
from compressor.cushion.prefix import FILE_NAME, Prefix, compute_prefix, decoder, prefixed_inputs, save_prefix
from compressor.cushion.search import draw_texts, greedy_search, outlier_token_prefix, start_token
from compressor.io import atomic_write, atomic_write_json
from compressor.models.adapters import ModelAdapter

log = logging.getLogger(__name__)

MEASURE_TEXTS = 8


@torch.no_grad()
def block_input_outliers(model, texts: torch.Tensor, prefix: Prefix | None = None) -> list[dict]:
    """Per decoder block: ``{"block", "max", "median", "max_to_median"}`` of |x| of the block's input
    hidden states over the texts ``[k, n]`` run after ``prefix`` (text positions only)."""
    device = next(model.parameters()).device
    stats: list[dict] = []
    handles = []

    def hook_for(i):
        def hook(_, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            top, med, ratio = ratio_to_median(x)
            stats.append({"block": i, "max": top, "median": med, "max_to_median": ratio})
        return hook

    for i, block in enumerate(ModelAdapter(model).blocks):
        handles.append(block.register_forward_pre_hook(hook_for(i), with_kwargs=True))
    try:
        p = prefix.to(device, next(model.parameters()).dtype) if prefix is not None else None
        decoder(model)(**prefixed_inputs(p, texts.to(device)))
    finally:
        for h in handles:
            h.remove()
    return stats


def plot_outliers(curves: dict[str, list[dict]], path: Path) -> Path:
    """Largest |x| into each block and its ratio to the median, one line per prefix (log scales)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label, stats in curves.items():
        idx = [s["block"] for s in stats]
        axes[0].plot(idx, [s["max"] for s in stats], marker="o", ms=3, label=label)
        axes[1].plot(idx, [s["max_to_median"] for s in stats], marker="o", ms=3, label=label)
    for ax, ylabel in zip(axes, ("max |x| of the block input", "max |x| / median |x|")):
        ax.set_yscale("log")
        ax.set_xlabel("block")
        ax.set_ylabel(ylabel)
        ax.legend()
    fig.suptitle("Activation outliers into each block, text tokens only")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    return path


def _resume_tokens(path: Path, key: dict) -> tuple[list[int], list[dict], bool] | None:
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    if saved.get("key") != key:
        log.warning("cushion search checkpoint %s is for other settings or data: starting over", path)
        return None
    return saved["tokens"], saved["steps"], saved.get("done", False)


def run_cushion(model, tokenizer, calib: torch.Tensor, cfg: CushionConfig, out_dir: str | Path,
                device: torch.device | str, progress: bool = False,
                accelerator: str = "auto") -> tuple[Prefix | None, dict | None]:
    """Find the configured prefix for ``model`` on calibration windows ``calib`` ``[k, seqlen]``.

    Returns the prefix (on ``device``, None for method none) and the report section: method, tokens,
    search steps with seconds per step, tuning losses, per-block outliers before/after, file paths.
    """
    if not cfg.enabled:
        return None, None
    out = Path(out_dir)
    device = torch.device(device)
    model.to(device)
    t0 = time.perf_counter()
    texts = draw_texts(calib, cfg.text_len, MEASURE_TEXTS, cfg.seed + 2)
    section: dict = {"method": cfg.method, "settings": asdict(cfg)}
    before = block_input_outliers(model, texts)
    start_only = block_input_outliers(model, texts, compute_prefix(model, [start_token(tokenizer)]))

    steps: list[dict] = []
    if cfg.method == "outlier_tokens":
        prefix, section["outlier_tokens"] = outlier_token_prefix(model, tokenizer, calib, cfg)
    else:
        ckpt = out / "checkpoints" / "cushion_search.json"
        key = {"search": {k: v for k, v in asdict(cfg).items()
                          if k in ("max_prefix_len", "tau", "text_len", "granularity", "bits", "objective",
                                   "precision", "seed", "candidates")}, "calibration": tensor_fingerprint(calib)}
        saved = _resume_tokens(ckpt, key)

        def on_step(p: Prefix, record) -> None:
            steps.append(asdict(record))
            atomic_write_json(ckpt, {"key": key, "tokens": p.token_ids.tolist(), "steps": steps,
                                     "done": not record.accepted})

        if saved and saved[2]:
            tokens, steps = saved[0], saved[1]
            prefix = compute_prefix(model, tokens, "greedy")
            log.info("cushion: greedy search finished before, %d tokens reloaded from %s", len(tokens), ckpt)
        else:
            if saved:
                steps = saved[1]
                log.info("cushion: resuming the greedy search after %d steps", len(steps))
                if progress:  # on the console too, as the pruning's resume is
                    print(f"resuming the cushion's greedy search: {len(steps)} steps done ({ckpt})", flush=True)
            prefix, _ = greedy_search(model, tokenizer, calib, cfg, progress, start=saved[0] if saved else None,
                                      on_step=on_step)
        seconds = [s["seconds"] for s in steps]
        section["search"] = {"steps": steps, "seconds": sum(seconds),
                             "seconds_per_step": sum(seconds) / len(seconds) if seconds else None,
                             "candidates_per_step": steps[0]["candidates"] if steps else None}
        if cfg.method == "tuned":
            from compressor.cushion.tuning import tune_prefix

            tuning_texts = draw_texts(calib, cfg.text_len, cfg.tuning_texts, cfg.seed + 3)
            prefix, section["tuning"] = tune_prefix(model, prefix, tuning_texts, cfg, accelerator, progress)
    after = block_input_outliers(model, texts, prefix)
    section.update({
        "prefix_len": len(prefix), "token_ids": prefix.token_ids.tolist(),
        "tokens": [tokenizer.decode([t]) for t in prefix.token_ids.tolist()],
        "outliers": {"without": before, "start_token_only": start_only, "with": after},
        "last_block_max_to_median": {"without": before[-1]["max_to_median"],
                                     "start_token_only": start_only[-1]["max_to_median"],
                                     "with": after[-1]["max_to_median"]},
        "seconds": time.perf_counter() - t0,
        "files": {"prefix": str(save_prefix(prefix, out / FILE_NAME)),
                  "plot": str(plot_outliers({"without prefix": before, "start token only": start_only,
                                             f"{cfg.method} prefix ({len(prefix)} tokens)": after},
                                            out / "cushion_outliers.png"))},
    })
    log.info("cushion: %s prefix %s; last block max/median %.1f -> %.1f", cfg.method, section["tokens"],
             before[-1]["max_to_median"], after[-1]["max_to_median"])
    return prefix.to(device), section
