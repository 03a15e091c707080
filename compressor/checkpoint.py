"""Per-block checkpoints and the run manifest, so that an interrupted compression resumes.

After each finished block its weights and masks go to ``checkpoints/block_XXX.safetensors`` and
then ``manifest.json`` records it (both written atomically, file before manifest), with the
config and its hash, the model's identity (a fingerprint of its weights, per tensor: a model
changed in place is another model, the same weights moved elsewhere are the same), the data
fingerprint, seeds and library versions. A block counts as done
only once the manifest names it and its file's checksum matches, so a kill at any instant leaves
either the old state or the new one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
from dataclasses import MISSING, asdict, fields, is_dataclass
from pathlib import Path

import torch

from compressor.config import ConfigError
from compressor.io import atomic_write, atomic_write_json
from compressor.models.identity import describe_change

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
# settings that do not change the compressed weights (a resume may change them freely)
_FREE = ("output", "evaluation")
# where the model comes from: its identity (the weights' fingerprint) is compared instead
_MODEL_SOURCE = ("name_or_path", "gguf_file", "revision", "tokenizer", "trust_remote_code")
# groups of stages after pruning: they checkpoint under their own hash (``save_stage``), so changing one
# does not invalidate the pruning checkpoints
LATER_STAGES = ("moe", "cushion", "activations")


def relevant_settings(settings) -> dict:
    d = asdict(settings)
    for key in (*_FREE, *LATER_STAGES):
        d.pop(key, None)
    d.get("runtime", {}).pop("track_error", None)
    for key in _MODEL_SOURCE:
        d.get("model", {}).pop(key, None)
    return d


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def tensor_fingerprint(*tensors: torch.Tensor | None) -> str:
    h = hashlib.sha256()
    for t in tensors:
        if t is not None:
            h.update(str(tuple(t.shape)).encode())
            h.update(t.contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def config_changes(old: dict, new: dict, settings) -> list[str]:
    """``"key: old -> new"`` for every setting that differs between two ``relevant_settings`` dicts, compared as JSON
    (a tuple equals the list a manifest holds). A setting the old manifest lacks (added to the project since) counts
    as unchanged while ``settings`` leave it at its default, so checkpoints of an earlier version still resume."""
    a, b = _flatten(_as_json(old)), _flatten(_as_json(new))
    changes = []
    for k in sorted(set(a) | set(b)):
        if k not in a and b[k] == _field_default(settings, k):
            continue
        if a.get(k, MISSING) != b.get(k, MISSING):
            changes.append(f"{k}: {a.get(k)!r} -> {b.get(k)!r}")
    return changes


def _as_json(d):
    return json.loads(json.dumps(d, default=str))


def _field_default(settings, dotted: str):
    """The JSON form of the default of the dataclass field at ``dotted`` (``reconstruction.seed``) below ``settings``,
    or ``dataclasses.MISSING`` when there is no such field or it has no default."""
    *path, name = dotted.split(".")
    obj = settings
    for part in path:
        obj = getattr(obj, part, None)
    if obj is None or not is_dataclass(obj):
        return MISSING
    for f in fields(obj):
        if f.name == name:
            if f.default is not MISSING:
                return _as_json(f.default)
            if f.default_factory is not MISSING:
                return _as_json(f.default_factory())
    return MISSING


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class BlockCheckpoints:
    """Reads and writes one run's per-block checkpoints under ``folder``."""

    def __init__(self, folder: Path, settings, data_fingerprint: str, schedule: dict[str, float] | None = None,
                 model_identity: dict | None = None):
        """``model_identity``: ``compressor.models.identity.model_identity`` of the model being compressed."""
        self.folder = Path(folder)
        self.model = model_identity
        self.model_source = getattr(getattr(settings, "model", None), "name_or_path", None)
        self.schedule = schedule
        self.saved_schedule: dict[str, float] | None = None  # what an earlier run's manifest recorded
        self.settings = settings
        self.config = relevant_settings(settings)
        self.config_hash = digest(self.config)
        self.data_fingerprint = data_fingerprint
        self.blocks: list[dict] = []  # manifest entries of finished blocks, in order
        self.stages: dict[str, dict] = {}  # stage name -> its entry (digest, file, sha256)

    def _manifest(self) -> dict:
        return {
            "config_hash": self.config_hash, "config": self.config, "model": self.model,
            "data_fingerprint": self.data_fingerprint,
            "seeds": {"calibration": self.config["calibration"]["seed"],
                      "reconstruction": self.config["reconstruction"]["seed"]},
            "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                         "python": platform.python_version()},
            "schedule": self.schedule, "blocks_done": len(self.blocks), "blocks": self.blocks,
            "stages": self.stages,
        }

    def resume(self, start_over: bool = False) -> list[dict]:
        """Finished blocks recorded by an earlier run of the same config and data ([] for a fresh start).

        Raises ConfigError naming what changed when the folder holds a different run (another model, config or
        data), unless ``start_over``.
        """
        path = self.folder / MANIFEST
        for stale in self.folder.glob(".*.tmp"):  # a killed writer's leftovers: never trusted, removed
            stale.unlink(missing_ok=True)
        if start_over or not path.is_file():
            self.blocks, self.stages = [], {}
            return []
        old = json.loads(path.read_text())
        self.saved_schedule = old.get("schedule")
        if self.model is not None and (old.get("model") or {}).get("fingerprint") != self.model["fingerprint"]:
            raise ConfigError(
                f"{self.folder} holds checkpoints of another model: the model at {self.model_source!r} is not the one "
                f"they were made from ({describe_change(old.get('model'), self.model)}); restore that model, or set "
                "output.start_over=true to discard them and compress this one from scratch")
        changes = []
        if old.get("config_hash") != self.config_hash:
            changes = config_changes(old.get("config", {}), self.config, self.settings)
        if old.get("data_fingerprint") != self.data_fingerprint:
            changes.append(f"calibration data fingerprint: {old.get('data_fingerprint')} -> {self.data_fingerprint}")
        if changes:
            raise ConfigError(
                f"{self.folder} holds checkpoints of a different run ({'; '.join(changes)}); "
                "resume with the same config and data, or set output.start_over=true to discard them")
        good = []
        for entry in old.get("blocks", []):
            file = self.folder / entry["file"]
            if not file.is_file() or _file_sha(file) != entry["sha256"]:
                log.warning("checkpoint %s is missing or damaged: resuming before it", file)
                break
            good.append(entry)
        # a cross-block run continues from the newest block's in-window state: it must be intact too
        while good and "pending_report" in good[-1]:
            pfile = self.folder / good[-1].get("pending_file", "")
            if good[-1].get("pending_file") and pfile.is_file() and _file_sha(pfile) == good[-1]["pending_sha256"]:
                break
            log.warning("in-window state %s is missing or damaged: resuming before block %d", pfile,
                        good[-1]["index"])
            good.pop()
        self.blocks = good
        self.stages = old.get("stages", {})
        return list(good)

    def load(self, entry: dict, block: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Load a finished block's weights in place; returns its masks and quantized tensors by name within the
        block."""
        from safetensors.torch import load_file

        tensors = load_file(self.folder / entry["file"])
        state = {k[len("w."):]: v for k, v in tensors.items() if k.startswith("w.")}
        block.load_state_dict(state, strict=True)
        masks = {k[len("m."):]: v for k, v in tensors.items() if k.startswith("m.")}
        return masks, {k[len("q."):]: v for k, v in tensors.items() if k.startswith("q.")}

    def load_pending(self, entry: dict) -> tuple[dict, dict, dict, dict]:
        """The next block's in-window state saved beside a cross-block (CR) checkpoint:
        ``(weights, masks, hessians, report)``."""
        from safetensors.torch import load_file

        tensors = load_file(self.folder / entry["pending_file"])
        parts = {p: {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)} for p in ("p.w.", "p.m.", "p.h.")}
        hessians = parts["p.h."]
        hessians.update({k: hessians[owner] for k, owner in entry.get("pending_hessian_aliases", {}).items()})
        return parts["p.w."], parts["p.m."], hessians, entry["pending_report"]

    def save(self, index: int, block: torch.nn.Module, masks: dict[str, torch.Tensor], report: dict,
             quantized: dict[str, torch.Tensor] | None = None, pending: dict | None = None) -> None:
        """Write block ``index`` (weights, masks, quantized codes/scales/zeros), then record it in the manifest.

        ``pending`` (cross-block windows): the next block as trained so far, ``{"block", "masks", "hessians",
        "report"}``, so a resume continues with the next window instead of redoing the last one.
        """
        from safetensors.torch import save_file

        if index != len(self.blocks):
            raise RuntimeError(f"checkpoint of block {index} out of order (have {len(self.blocks)} blocks)")
        tensors = {f"w.{k}": v.detach().cpu().contiguous() for k, v in block.state_dict().items()}
        tensors.update({f"m.{k}": v.cpu().contiguous() for k, v in masks.items()})
        tensors.update({f"q.{k}": v.cpu().contiguous() for k, v in (quantized or {}).items()})
        staged = {}
        if pending is not None:  # its own file, kept only for the newest two blocks (see below)
            staged = {f"p.w.{k}": v.detach().cpu().contiguous() for k, v in pending["block"].state_dict().items()}
            staged.update({f"p.m.{k}": v.cpu().contiguous() for k, v in pending["masks"].items()})
            aliases = {}  # layers sharing one input share one Hessian: store it once
            for k, v in pending["hessians"].items():
                owner = next((o for o, t in pending["hessians"].items() if t is v), k)
                if owner == k:
                    staged[f"p.h.{k}"] = v.cpu().contiguous()
                else:
                    aliases[k] = owner
        for name, t in {**tensors, **staged}.items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise FloatingPointError(f"block {index}: {name} holds NaN/Inf; not checkpointed")
        name = f"block_{index:03d}.safetensors"
        path = atomic_write(self.folder / name, lambda tmp: save_file(tensors, tmp))
        entry = {"index": index, "file": name, "sha256": _file_sha(path), "report": report}
        if pending is not None:
            pname = f"pending_{index + 1:03d}.safetensors"
            ppath = atomic_write(self.folder / pname, lambda tmp: save_file(staged, tmp))
            entry.update(pending_file=pname, pending_sha256=_file_sha(ppath), pending_report=pending["report"],
                         pending_hessian_aliases=aliases)
        self.blocks.append(entry)
        atomic_write_json(self.folder / MANIFEST, self._manifest())
        # only the newest two blocks' in-window states can be needed by a resume (one more in case the
        # newest is damaged); older ones go, so CR checkpoints do not grow with the model
        for old in self.blocks[:-2]:
            if old.pop("pending_file", None):
                (self.folder / f"pending_{old['index'] + 1:03d}.safetensors").unlink(missing_ok=True)

    def load_stage(self, name: str, key: str) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
        """``(tensors, metadata)`` of stage ``name`` finished by an earlier run under the same ``key`` (its config
        digest), or None (never run, another key, or a missing or damaged file: the stage runs again)."""
        from safetensors import safe_open

        entry = self.stages.get(name)
        if entry is None or entry.get("digest") != key:
            return None
        file = self.folder / entry["file"]
        if not file.is_file() or _file_sha(file) != entry["sha256"]:
            log.warning("stage checkpoint %s is missing or damaged: the %s stage runs again", file, name)
            return None
        with safe_open(str(file), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}

    def save_stage(self, name: str, key: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        """Record stage ``name`` as finished under ``key``: its file first, then the manifest."""
        from safetensors.torch import save_file

        file = f"stage_{name}.safetensors"
        path = atomic_write(self.folder / file, lambda tmp: save_file(tensors, tmp, metadata=metadata))
        self.stages[name] = {"digest": key, "file": file, "sha256": _file_sha(path)}
        atomic_write_json(self.folder / MANIFEST, self._manifest())
