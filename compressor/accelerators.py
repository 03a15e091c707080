"""Which accelerator and strategy a Trainer gets: Lightning's own, or Intel Gaudi (HPU) through lightning-habana.

Lightning 2.x has no HPU support of its own (2.6 rejects ``accelerator="hpu"``); the HPU accelerator and
strategies live in the ``lightning-habana`` package. That package is archived: its last release, 1.6.0, was
built for Lightning 2.3.x and does not import on Lightning 2.6. So ``hpu`` is resolved here into instances
of its classes, in the Gaudi image (``docker/Dockerfile.gaudi``) that pins both, and is refused in one line
elsewhere.

Code that only works on CUDA is kept behind ``device.type == "cuda"`` / ``is_cuda`` checks (CUDA graphs in
``quant/int4.py``, ``torch.cuda`` memory queries and synchronizations in ``pipeline.py``, ``engine.py``,
``sequential.py``, ``schedule/schedule.py`` and ``reconstruction/fit.py``, the fused AdamW in
``reconstruction/module.py``), so an ``hpu`` device skips it.
"""

from __future__ import annotations

import torch

from compressor.config import ConfigError

HPU = "hpu"
GAUDI_IMAGE = "docker/Dockerfile.gaudi"


def is_hpu(accelerator) -> bool:
    """True for the name ``hpu`` (any case); Accelerator instances and other names are Lightning's to handle."""
    return isinstance(accelerator, str) and accelerator.lower() == HPU


def lightning_habana():
    """The ``lightning_habana`` module with a visible Gaudi device.

    Raises:
        ConfigError: one line, when the package does not import (naming the image that provides it) or imports
            but sees no Gaudi device.
    """
    try:
        import lightning_habana as habana
    except Exception as exc:  # ImportError, or an API mismatch with the installed Lightning (1.6.0 on 2.6)
        reason = (str(exc).splitlines() or [""])[0]
        raise ConfigError(f"trainer.accelerator='hpu' needs lightning-habana, which does not import here "
                          f"({type(exc).__name__}: {reason}); the Intel Gaudi image {GAUDI_IMAGE} provides it "
                          "(see docker/README.md)") from None
    if not habana.HPUAccelerator.is_available():
        raise ConfigError("trainer.accelerator='hpu': lightning-habana imports but no Gaudi device is visible (run "
                          "the Gaudi image with --runtime=habana and HABANA_VISIBLE_DEVICES, see docker/README.md)")
    return habana


def single_device(devices) -> bool:
    """True when ``devices`` (a Trainer's ``devices``) names exactly one device: 1, "1" or a one-item list."""
    if isinstance(devices, (list, tuple)):
        return len(devices) == 1
    return str(devices).strip() == "1"


def trainer_settings(accelerator="auto", devices=1, strategy="auto") -> dict:
    """``accelerator``, ``devices`` and ``strategy`` keyword arguments for a Lightning Trainer.

    Lightning's names (``cpu``, ``gpu``, ``cuda``, ``auto``...) pass through unchanged. ``hpu`` becomes
    lightning-habana's ``HPUAccelerator`` with ``SingleHPUStrategy`` on one device or ``HPUDDPStrategy`` (its
    ``HPUParallelStrategy`` for data parallel training) on several; a strategy other than ``auto`` is kept.

    Raises:
        ConfigError: ``hpu`` where lightning-habana does not import or sees no device (see ``lightning_habana``).
    """
    if not is_hpu(accelerator):
        return {"accelerator": accelerator, "devices": devices, "strategy": strategy}
    habana = lightning_habana()
    if strategy in (None, "auto"):
        strategy = habana.SingleHPUStrategy() if single_device(devices) else habana.HPUDDPStrategy()
    return {"accelerator": habana.HPUAccelerator(), "devices": devices, "strategy": strategy}


def hpu_overrides(trainer) -> dict:
    """Keyword arguments that replace a parsed CLI ``trainer`` group's own: none unless its accelerator is ``hpu``.

    A strategy given by name is kept; one given as a class (``class_path``) is left to the CLI to build.

    Raises:
        ConfigError: ``hpu`` where lightning-habana does not import or sees no device.
    """
    if not is_hpu(trainer.accelerator):
        return {}
    named = isinstance(trainer.strategy, str) or trainer.strategy is None
    settings = trainer_settings(HPU, trainer.devices, trainer.strategy if named else "auto")
    if not named:
        del settings["strategy"]
    return settings


def accelerator_for(device: str | torch.device) -> str:
    """The Trainer accelerator name that trains on ``device``: ``gpu`` for CUDA, ``cpu``, ``hpu``, else ``auto``."""
    return {"cuda": "gpu", "cpu": "cpu", HPU: HPU}.get(torch.device(device).type, "auto")


def reset_peak_gpu_memory(device: torch.device) -> None:
    """Start ``torch.cuda.max_memory_allocated(device)`` afresh; nothing for other device types.

    CUDA is initialised first: before a process's first CUDA call the caching allocator knows no device, and the
    reset raises ``RuntimeError: Invalid device argument`` (a one-device ``cli.py fit`` on a machine with several
    GPUs met this before anything had touched the GPU; pytorch/pytorch#49952 is the same for the memory queries)."""
    if device.type == "cuda":
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats(device)
