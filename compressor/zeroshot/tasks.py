"""Zero-shot task definitions: the project's YAML files (``tasks/``) bound to a local data folder.

Each ``tasks/<name>.yaml`` is an lm-evaluation-harness task config that reproduces the harness's official
task (its prompt, choices, target and metrics, as in its own ``lm_eval/tasks`` YAML files) with Jinja
templates over the fields of the staged JSONL file, read through the ``json`` dataset builder. The file is
named relative to the data folder (``dataset_kwargs.data_files``); :func:`task_configs` makes it absolute.
Nothing here imports the harness: the configs are plain dicts that ``lm_eval`` instantiates.
"""

from __future__ import annotations

import copy
import os
from functools import cache
from pathlib import Path

import yaml

from compressor.config import ConfigError

TASK_DIR = Path(__file__).parent / "tasks"
DEFAULT_DATA_DIR = "../shared/data/zeroshot"
REPO_ROOT = Path(__file__).resolve().parents[2]
DERIVED = ("hellaswag",)
"""Tasks whose staged data is a derived form of the official split (scores close to, not equal to, the harness's)."""


@cache
def _definitions() -> dict[str, dict]:
    out = {}
    for path in sorted(TASK_DIR.glob("*.yaml")):
        with open(path, encoding="utf-8") as fh:
            cfg = yaml.safe_load(fh)
        out[cfg["task"]] = cfg
    return out


def known_tasks() -> list[str]:
    """Names of the tasks with a definition in ``compressor/zeroshot/tasks``."""
    return list(_definitions())


def resolve_data_dir(tasks_dir: str) -> Path:
    """The data folder: absolute as given, else relative to the working directory, else to the folder
    holding this checkout (so the default ``../shared/data/zeroshot`` works from anywhere in the project)."""
    path = Path(os.path.expanduser(tasks_dir))
    if path.is_absolute() or path.is_dir():
        return path.resolve() if path.is_dir() else path
    beside = REPO_ROOT / path
    return beside.resolve() if beside.is_dir() else path


def data_files(name: str) -> dict[str, str]:
    """``{split: file}`` of task ``name``, the file relative to the data folder."""
    return dict(_definitions()[name]["dataset_kwargs"]["data_files"])


def check_tasks(names: list[str], tasks_dir: str) -> None:
    """ConfigError for an unknown task name or a task whose data file is missing from the folder."""
    known = known_tasks()
    for name in names:
        if name not in known:
            raise ConfigError(f"evaluation.tasks: {name!r} is not a known zero-shot task: choose from "
                              f"{', '.join(known)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"evaluation.tasks={names} names a task twice")
    folder = resolve_data_dir(tasks_dir)
    for name in names:
        for split, rel in data_files(name).items():
            if not (folder / rel).is_file():
                raise ConfigError(f"evaluation.tasks: task {name!r} needs {rel} ({split} split) in "
                                  f"evaluation.tasks_dir={tasks_dir!r} (resolved to {folder}), which has no such "
                                  f"file; stage the data there (see its README) or set evaluation.tasks_dir")


def task_configs(names: list[str], tasks_dir: str) -> list[dict]:
    """The harness task configs of ``names``, their data files absolute paths under ``tasks_dir``."""
    check_tasks(names, tasks_dir)
    folder = resolve_data_dir(tasks_dir)
    configs = []
    for name in names:
        cfg = copy.deepcopy(_definitions()[name])
        cfg["dataset_kwargs"]["data_files"] = {split: str(folder / rel) for split, rel in data_files(name).items()}
        configs.append(cfg)
    return configs
