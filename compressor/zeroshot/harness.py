"""Zero-shot accuracy through EleutherAI's lm-evaluation-harness, on the model in memory, offline.

The harness does everything task-specific (prompts, requests, scoring, aggregation, standard errors): this
module only hands it the model and tokenizer (``HFLM`` wraps a model instance), the project's task configs
(:mod:`compressor.zeroshot.tasks`, local JSONL files) and a limit, with the hub disabled, and reads its
results back. Zero-shot (``num_fewshot`` 0 in every task config).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from collections.abc import Iterator

import torch

from compressor.zeroshot.tasks import DERIVED, resolve_data_dir, task_configs

log = logging.getLogger(__name__)

METRICS = ("acc", "acc_norm", "perplexity")
DERIVED_NOTE = ("hellaswag is scored on a derived form of its validation split (llama.cpp's reformatting, "
                "shared/data/zeroshot/README.md): close to, not equal to, lm-eval's hellaswag")


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """The hub disabled for datasets and huggingface_hub while the harness runs (read when they are imported;
    the task data are local files either way)."""
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    os.environ.update({k: "1" for k in saved})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def harness_version() -> str:
    from importlib.metadata import version

    return f"lm-eval {version('lm_eval')}"


def run_harness(model, tokenizer, tasks: list[str], tasks_dir: str, limit: int | None = None, batch_size: int = 8,
                device: str | torch.device | None = None, prefix=None) -> dict:
    """The harness's raw results dict (``lm_eval.simple_evaluate``) for ``tasks`` on ``model`` (moved to
    ``device`` when given), every forward behind the cushion ``prefix`` when given
    (``compressor.cushion.prefix.behind``). The tokenizer is copied: the harness may set its padding token."""
    from compressor.cushion.prefix import behind

    with offline():
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

        if device is not None:
            model.to(device)
        was_training = model.training
        lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)
        try:
            with behind(model, prefix):
                return simple_evaluate(lm, tasks=task_configs(tasks, tasks_dir), task_manager=TaskManager(
                    include_defaults=False), limit=limit, log_samples=False, bootstrap_iters=1000)
        finally:
            model.train(was_training)


def task_record(results: dict, task: str) -> dict:
    """One task's figures from the harness's results: ``acc`` (and ``acc_norm``, ``perplexity`` where the
    task defines them) with their standard errors, and ``n``, the documents scored."""
    raw = results["results"][task]
    rec: dict = {}
    for metric in METRICS:
        if f"{metric},none" in raw:
            rec[metric] = float(raw[f"{metric},none"])
            stderr = raw.get(f"{metric}_stderr,none")
            rec[f"{metric}_stderr"] = float(stderr) if isinstance(stderr, (int, float)) else None
    rec["n"] = int(results["n-samples"][task]["effective"])
    rec["split_size"] = int(results["n-samples"][task]["original"])
    if task in DERIVED:
        rec["derived_data"] = True
    return rec


def zeroshot_accuracy(model, tokenizer, tasks: list[str], tasks_dir: str, limit: int | None = None,
                      batch_size: int = 8, device: str | torch.device | None = None, prefix=None) -> dict[str, dict]:
    """``{task: record}`` (see :func:`task_record`) for ``tasks``, 0-shot, the first ``limit`` documents of each
    split (all when None), behind the cushion ``prefix`` when given. Raises ConfigError for an unknown task or a
    missing data file."""
    results = run_harness(model, tokenizer, tasks, tasks_dir, limit, batch_size, device, prefix)
    records = {t: task_record(results, t) for t in tasks}
    for t, r in records.items():
        log.info("zero-shot %s: acc %.4f%s (n=%d)", t, r["acc"],
                 f", acc_norm {r['acc_norm']:.4f}" if "acc_norm" in r else "", r["n"])
    return records


def mean_accuracy(records: dict[str, dict] | None) -> float | None:
    """Unweighted mean of the tasks' ``acc``."""
    if not records:
        return None
    return sum(r["acc"] for r in records.values()) / len(records)


def measure(evaluation, model, tokenizer, device, which: str, prefix=None) -> dict[str, dict] | None:
    """The pipeline's hook: zero-shot records of ``model`` under ``evaluation.tasks`` (None when there are no
    tasks), behind the cushion ``prefix`` when given; ``which`` ('dense', 'compressed', 'model') only names the
    run in the log."""
    if not evaluation.tasks:
        return None
    log.info("zero-shot evaluation of the %s model: %s", which, ", ".join(evaluation.tasks))
    return zeroshot_accuracy(model, tokenizer, list(evaluation.tasks), evaluation.tasks_dir, evaluation.tasks_limit,
                             evaluation.tasks_batch_size, device, prefix)


def section(evaluation, **measured: dict | None) -> dict | None:
    """The report's ``zeroshot`` section: the settings, and per-task records and mean accuracy for each named
    measurement (``dense=``, ``compressed=``; ``model=`` in validate)."""
    if not evaluation.tasks:
        return None
    derived = [t for t in evaluation.tasks if t in DERIVED]
    return {"harness": harness_version(), "num_fewshot": 0, "tasks": list(evaluation.tasks),
            "tasks_dir": str(resolve_data_dir(evaluation.tasks_dir)), "limit": evaluation.tasks_limit,
            **measured, "mean_acc": {k: mean_accuracy(v) for k, v in measured.items()},
            "derived_data": derived, "note": DERIVED_NOTE if derived else None}


def task_label(task: str) -> str:
    return f"{task} (derived data)" if task in DERIVED else task


def table_rows(zs: dict | None, columns: tuple[str, ...] = ("dense", "compressed")) -> list[list[str]]:
    """Rows for a summary table: one per task (acc, and acc_norm where given), then the mean; one cell per
    entry of ``columns`` (keys of ``zs``)."""
    if not zs:
        return []

    def cell(records: dict | None, task: str) -> str:
        rec = (records or {}).get(task)
        if rec is None:
            return "-"
        text = f"{rec['acc']:.4f}"
        return text + (f" (norm {rec['acc_norm']:.4f})" if "acc_norm" in rec else "")

    limit = f", first {zs['limit']} docs" if zs.get("limit") else ""
    rows = [[f"zero-shot acc: {task_label(t)}{limit}", *(cell(zs.get(c), t) for c in columns)] for t in zs["tasks"]]
    means = [mean_accuracy(zs.get(c)) for c in columns]
    rows.append([f"zero-shot mean acc ({len(zs['tasks'])} tasks)", *("-" if m is None else f"{m:.4f}" for m in means)])
    return rows
