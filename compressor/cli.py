"""LightningCLI front end: ``python cli.py fit|validate --config configs/<x>.yaml``.

The LightningModule holds the model, pruning and runtime groups; the LightningDataModule holds
calibration and evaluation; ``output`` is a top-level group. ``fit`` runs the sequential
compression on the Trainer's device; ``validate`` measures a model or a compressed output folder.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import re
import shlex
import sys
import typing
from argparse import ArgumentError
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from jsonargparse import DefaultHelpFormatter, set_parsing_settings
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI

from compressor.accelerators import hpu_overrides
from compressor.config import (
    CalibrationConfig,
    ConfigError,
    EvaluationConfig,
    ModelConfig,
    OutputConfig,
    PruningConfig,
    RuntimeConfig,
)
from compressor.cushion.config import CushionConfig
from compressor.data.text import DataError
from compressor.moe.config import MoEConfig
from compressor.quant.activations import ActivationQuantConfig
from compressor.quant.int4 import QuantizationConfig
from compressor.reconstruction.module import ReconstructionConfig
from compressor.schedule.allocate import ScheduleConfig

DESCRIPTION = """compressor: prune Hugging Face causal LMs block by block (magnitude, Wanda, SparseGPT;
unstructured or N:M), reconstruct blocks against the dense model, spread sparsity over layers,
quantize the kept weights to 4 bits, quantize weights and activations to 8 bits (W8A8), and measure
what was lost.

  fit       compress a model in stages (sequential pruning, MoE conversion, CushionCache prefix, W8A8
            activations; each when configured), evaluate it, save model + masks + report
  validate  measure perplexity and sparsity of a model or a compressed output folder (output.dir/model;
            the moe.safetensors, cushion.safetensors and activations.safetensors saved with it applied)

Examples:
  python cli.py fit --config configs/quickstart.yaml
  python cli.py fit --config configs/protocol.yaml --model.pruning.method wanda --model.pruning.pattern 2:4
  python cli.py fit --config configs/schedule.yaml --model.schedule.dry_run true
  python cli.py validate --model.source.name_or_path outputs/quickstart/model --data.evaluation.datasets [wikitext2]
  python cli.py fit --config configs/quickstart.yaml --model.moe.enabled true --model.moe.k 48
  python cli.py fit --config configs/quickstart.yaml --print_config
"""

VALIDATE_DESCRIPTION = """compressor validate: measure perplexity and the sparsity of the linear layers of a model or a
compressed output folder (output.dir/model); writes validate.json and prints where.

Examples:
  python cli.py validate --model.source.name_or_path outputs/quickstart/model
  python cli.py validate --model.source.name_or_path outputs/quickstart/model \\
      --data.evaluation.datasets '[my_text.txt]' --data.evaluation.seqlen 512
"""

# field docstrings of the config dataclasses become the --help text
set_parsing_settings(docstring_parse_attribute_docstrings=True)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """jsonargparse's help, with the description's line breaks kept."""


class CompressionTask(LightningModule):
    """The compression job: which model, how it is pruned, how the driver runs."""

    def __init__(
        self,
        source: ModelConfig = ModelConfig(),
        pruning: PruningConfig = PruningConfig(),
        runtime: RuntimeConfig = RuntimeConfig(),
        reconstruction: ReconstructionConfig = ReconstructionConfig(),
        schedule: ScheduleConfig = ScheduleConfig(),
        quantization: QuantizationConfig = QuantizationConfig(),
        moe: MoEConfig = MoEConfig(),
        cushion: CushionConfig = CushionConfig(),
        activations: ActivationQuantConfig = ActivationQuantConfig(),
    ):
        """
        Args:
            source: the model to compress or evaluate.
            pruning: criterion, sparsity and pattern.
            runtime: batch size, where activations live, error tracking.
            reconstruction: block-wise reconstruction after pruning (lr = none, br, br+gp, br+gp+cr).
            schedule: how the target sparsity is spread over blocks or layers (uniform, owl, hessian); dry_run
                prints the schedule without pruning.
            quantization: low-bit weights for the kept weights (none, rtn, gptq; 4 bits, groups of 128).
            moe: FFNs into mixtures of experts with trained routers (G-MoEfication), after pruning.
            cushion: CushionCache prefix in front of every input to tame activation outliers (none, greedy, tuned,
                outlier_tokens); saved as model/cushion.safetensors and applied by perplexity and validate.
            activations: W8A8, the last stage: 8-bit inputs of every block linear (per-tensor static or dynamic,
                per-token dynamic; SmoothQuant) and 8-bit weights, simulated; granularity none turns it off.
        """
        super().__init__()
        self.source = source
        self.pruning = pruning
        self.runtime = runtime
        self.reconstruction = reconstruction
        self.schedule = schedule
        self.quantization = quantization
        self.moe = moe
        self.cushion = cushion
        self.activations = activations
        self.save_hyperparameters({"cushion": asdict(cushion), "activations": asdict(activations),
                                   "source": asdict(source), "pruning": asdict(pruning), "runtime": asdict(runtime),
                                   "reconstruction": asdict(reconstruction), "schedule": asdict(schedule),
                                   "quantization": asdict(quantization), "moe": asdict(moe)})


class CalibrationData(LightningDataModule):
    """Calibration windows for the pruning statistics, and the corpora measured afterwards."""

    def __init__(
        self,
        calibration: CalibrationConfig = CalibrationConfig(),
        evaluation: EvaluationConfig = EvaluationConfig(),
        recon_calibration: CalibrationConfig | None = None,
    ):
        """
        Args:
            calibration: sources, number and length of the calibration windows, seed.
            evaluation: perplexity corpora and held-out windows for reconstruction error.
            recon_calibration: windows that reconstruction trains on (default: the calibration windows).
        """
        super().__init__()
        self.calibration = calibration
        self.evaluation = evaluation
        self.recon_calibration = recon_calibration


class MeasuredModel(LightningModule):
    """The model to measure."""

    def __init__(self, source: ModelConfig = ModelConfig()):
        """
        Args:
            source: a model or a compressed output folder (output.dir/model).
        """
        super().__init__()
        self.source = source


class EvaluationData(LightningDataModule):
    """The corpora measured."""

    def __init__(self, evaluation: EvaluationConfig = EvaluationConfig(),
                 calibration: CalibrationConfig = CalibrationConfig()):
        """
        Args:
            evaluation: perplexity corpora, window length and count.
            calibration: only seqlen (the default window length), seed and generation (held-out generated text)
                apply to validate.
        """
        super().__init__()
        self.evaluation = evaluation
        self.calibration = calibration


@dataclass
class ValidateOutputConfig:
    """Where validate.json goes."""

    dir: str | None = None
    """Folder for validate.json (default: the compressed output folder when the model is its model/, else
    outputs/validate). The path is printed."""


class CompressionTrainer(Trainer):
    """The Trainer settings that apply to the compressor: where it runs."""

    def __init__(self, accelerator: str = "auto", devices: int | str = 1, precision: str | None = None,
                 strategy: str = "auto", num_nodes: int = 1):
        """
        Args:
            accelerator: cpu, gpu (or cuda), or auto (a GPU when one is visible, else the CPU).
            devices: devices per node: 1, or N > 1 with strategy ddp: one process per device, started by torchrun
                (the command starts torchrun itself on one machine; torchrun --nproc_per_node N cli.py fit ...
                --trainer.devices N --trainer.strategy ddp does the same).
            precision: fit: precision of reconstruction training (Lightning's: 32-true, bf16-mixed, 16-mixed, ...);
                sets model.reconstruction.precision. Weights are held in model.source.dtype.
            strategy: auto (one device), or ddp with devices > 1 (one process per device, started by torchrun).
            num_nodes: machines of a torchrun run (torchrun --nnodes); WORLD_SIZE must be num_nodes * devices.
        """
        devices = check_trainer_settings(accelerator, devices, precision, strategy, num_nodes)
        self.reconstruction_precision = precision
        try:
            super().__init__(accelerator=accelerator, devices=devices, strategy=strategy, num_nodes=num_nodes,
                             logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False)
        except (MisconfigurationException, ValueError) as exc:
            raise ConfigError(f"trainer: {exc}") from exc
        if devices * num_nodes > 1:  # join torchrun's process group now: every later Trainer of the run reuses it
            from compressor.distributed import init_from_env

            init_from_env("gpu" if self.strategy.root_device.type == "cuda" else "cpu")

    def fit(self, model, datamodule=None, ckpt_path: str | None = None):
        """Compress a model block by block, measure it, save model, masks and report.

        Args:
            ckpt_path: 'last' only: resume from output.dir/checkpoints (rerunning the same command does the same).
        """
        raise NotImplementedError("CompressorCLI.fit runs the pipeline; this signature only defines fit's options")

    def validate(self, model=None, datamodule=None):
        """Measure perplexity and sparsity of a model or a compressed output folder (output.dir/model)."""
        raise NotImplementedError("CompressorCLI.validate runs the pipeline; this signature only defines its options")


class Relaunch(Exception):
    """A one-machine ddp run of N devices asked for without torchrun: ``main`` starts it under torchrun."""

    def __init__(self, nproc: int):
        super().__init__(f"{nproc} processes under torchrun")
        self.nproc = nproc


def relaunch(nproc: int, args: list[str]) -> int:
    """Run this command again as ``nproc`` processes on this machine under torchrun (``--standalone``: a local
    rendezvous), the way a user would start it; returns torchrun's exit code (a failed rank fails the run)."""
    import subprocess

    script = Path(__file__).resolve().parents[1] / "cli.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script),
           *args]
    print(f"starting {nproc} processes, one per device: {shlex.join(['torchrun', *cmd[3:]])}", file=sys.stderr,
          flush=True)
    return subprocess.call(cmd)


def check_trainer_settings(accelerator, devices, precision, strategy, num_nodes: int = 1) -> int:
    """Refuse Trainer settings the compressor cannot honour, naming the value and what is valid; returns the number
    of devices per node (1, or N > 1 for a ddp run started by torchrun)."""
    import torch

    from compressor.distributed import launched_by_torchrun

    if accelerator not in ("auto", "cpu", "gpu", "cuda"):
        raise ConfigError(f"trainer.accelerator={accelerator!r}: choose cpu, gpu or auto")
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.accelerator={accelerator!r} but no GPU is visible to torch "
                          f"(torch {torch.__version__}, CUDA available: no): use cpu or auto")
    n = 1 if devices == "auto" else int(devices) if str(devices).isdigit() else None
    if n is None or n < 1:
        raise ConfigError(f"trainer.devices={devices!r}: give a number of devices (1, or N > 1 with "
                          "trainer.strategy=ddp under torchrun)")
    if strategy not in ("auto", "single_device", "ddp"):
        raise ConfigError(f"trainer.strategy={strategy!r} is not supported: use auto (one device) or ddp (several)")
    if not isinstance(num_nodes, int) or num_nodes < 1:
        raise ConfigError(f"trainer.num_nodes={num_nodes!r}: give a number of machines >= 1")
    launch = (f"torchrun --nproc_per_node {max(n, 2)} cli.py fit ... --trainer.devices {max(n, 2)} "
              "--trainer.strategy ddp")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if n > 1 or num_nodes > 1:
        if strategy != "ddp":
            raise ConfigError(f"trainer.devices={devices!r}: several devices need trainer.strategy=ddp (one process "
                              f"per device): {launch}")
        if not launched_by_torchrun():
            if num_nodes == 1:
                raise Relaunch(n)
            raise ConfigError(f"trainer.num_nodes={num_nodes}: a run over several machines is started by torchrun on "
                              f"each, one process per device: torchrun --nnodes {num_nodes} --nproc_per_node {n} "
                              "--rdzv_backend c10d --rdzv_endpoint HOST:PORT cli.py fit ... --trainer.devices "
                              f"{n} --trainer.num_nodes {num_nodes} --trainer.strategy ddp")
        if world != n * num_nodes:
            raise ConfigError(f"trainer.devices={devices!r} x trainer.num_nodes={num_nodes} does not match the "
                              f"{world} processes torchrun started (WORLD_SIZE): give --nproc_per_node "
                              f"{n} per node")
    elif strategy == "ddp" or launched_by_torchrun():
        raise ConfigError(f"trainer.devices={devices!r} with {world} processes (WORLD_SIZE) and trainer.strategy="
                          f"{strategy!r}: a ddp run gives the devices per node and the strategy together: {launch}")
    if precision is not None:
        from lightning.fabric.connector import _PRECISION_INPUT_STR

        valid = typing.get_args(_PRECISION_INPUT_STR)
        if precision not in valid:
            raise ConfigError(f"trainer.precision={precision!r} is not valid: choose one of {', '.join(valid)}")
    return n


class CompressorCLI(LightningCLI):
    """LightningCLI whose ``fit`` and ``validate`` run the compressor's pipeline.

    The parser shows only what applies: the compressor's groups, the Trainer settings of ``CompressionTrainer``
    and no optimizer/scheduler groups; ``validate`` gets the model source and the evaluation data only."""

    _building: str | None = None  # the subcommand whose parser is being built

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {"fit": {"model", "datamodule"}, "validate": {"model", "datamodule"}}

    def _prepare_subcommand_parser(self, klass, subcommand: str, **kwargs):
        classes = self._model_class, self._datamodule_class
        if subcommand == "validate":
            self._model_class, self._datamodule_class = MeasuredModel, EvaluationData
        self._building = subcommand
        try:
            return super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        finally:
            self._model_class, self._datamodule_class = classes
            self._building = None

    def add_default_arguments_to_parser(self, parser) -> None:
        """No --seed_everything: the seeds that matter are data.calibration.seed and model.reconstruction.seed."""

    def _set_seed(self) -> None:
        from lightning.fabric.utilities.seed import seed_everything

        seed_everything(0, workers=True, verbose=False)

    def add_arguments_to_parser(self, parser) -> None:
        if self._building == "validate":
            parser.add_dataclass_arguments(ValidateOutputConfig, "output", help="Where validate.json goes.")
        else:
            parser.add_dataclass_arguments(OutputConfig, "output", help="Where results go.")

    def _instantiate_trainer(self, config: dict, callbacks: list):
        return self.trainer_class(**config)

    def _output(self):
        out = self.config_init[self.subcommand]["output"]
        if isinstance(out, (OutputConfig, ValidateOutputConfig)):
            return out
        return (ValidateOutputConfig if self.subcommand == "validate" else OutputConfig)(**dict(out))

    @property
    def device(self):
        return self.trainer.strategy.root_device

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)  # hpu: lightning-habana's classes, or one line why not, before any work
        self.hpu_settings = hpu_overrides(self.config[self.config.subcommand].trainer)

    def instantiate_trainer(self, **kwargs):
        return super().instantiate_trainer(**{**kwargs, **self.hpu_settings})

    def fit(self, model: CompressionTask, datamodule: CalibrationData, ckpt_path: str | None = None, **_):
        from compressor.pipeline import RunSettings, compress

        if ckpt_path not in (None, "last"):
            raise ConfigError(f"ckpt_path={ckpt_path!r}: only 'last' is supported (block checkpoints live in "
                              "output.dir/checkpoints; rerunning the same command resumes from them too)")
        reconstruction = model.reconstruction
        precision = self.trainer.reconstruction_precision
        if precision is not None and precision != reconstruction.precision:
            if reconstruction.precision != ReconstructionConfig.precision:
                raise ConfigError(f"trainer.precision={precision!r} and model.reconstruction.precision="
                                  f"{reconstruction.precision!r} disagree: give one of them")
            reconstruction = replace(reconstruction, precision=precision)
        settings = RunSettings(model=model.source, pruning=model.pruning, calibration=datamodule.calibration,
                               evaluation=datamodule.evaluation, output=self._output(), runtime=model.runtime,
                               reconstruction=reconstruction, recon_calibration=datamodule.recon_calibration,
                               schedule=model.schedule, quantization=model.quantization, moe=model.moe,
                               cushion=model.cushion, activations=model.activations)
        compress(settings, self.device)

    def validate(self, model: MeasuredModel, datamodule: EvaluationData, **_):
        from compressor.pipeline import validate

        validate(model.source, datamodule.evaluation, datamodule.calibration, self._output().dir, self.device)


# failures that are the user's to fix: one line, exit code 2; anything else is a bug and keeps its traceback
EXPECTED_ERRORS = (ConfigError, DataError, ArgumentError)
# operating-system failures that name a path the user chose (permissions, full or read-only disks)
USER_ERRNOS = (errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.ENOTDIR)


def one_line(exc: BaseException) -> str:
    """The error's message on one line (jsonargparse's messages span several, with Python type reprs)."""
    text = re.sub(r'Parser key "([^"]+)":', r"\1:", str(exc))
    text = re.sub(r"<class '([\w.]+)'>", r"\1", text)
    if isinstance(exc, OSError) and exc.filename is not None:
        text = f"{exc.strerror}: {exc.filename}"
    return " ".join(text.split())


def command_line(args: list[str]) -> str:
    """The command as the user typed it (for the resume hint); ``output.start_over`` is left out."""
    prog = sys.argv[0] if sys.argv and sys.argv[0].endswith("cli.py") else "cli.py"
    kept, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        if a == "--output.start_over":
            skip = True
            continue
        if a.startswith("--output.start_over="):
            continue
        kept.append(a)
    return "python " + shlex.join([prog, *kept])


def quiet_libraries() -> None:
    """No Lightning banners or tips (GPU/TPU availability, litlogger, seed) on the console."""
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)


def main(args: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code: 0 done, 2 a user's mistake (one line on stderr), 130 interrupted."""
    from compressor.runlog import RunInterrupted

    typed = sys.argv[1:] if args is None else list(args)
    quiet_libraries()
    try:
        CompressorCLI(
            CompressionTask,
            CalibrationData,
            trainer_class=CompressionTrainer,
            save_config_callback=None,
            auto_configure_optimizers=False,
            parser_kwargs={
                "description": DESCRIPTION, "formatter_class": HelpFormatter, "exit_on_error": False,
                "fit": {"description": DESCRIPTION, "formatter_class": HelpFormatter, "exit_on_error": False,
                        "usage": "python cli.py fit [--config FILE] [--GROUP.KEY VALUE ...]"},
                "validate": {"description": VALIDATE_DESCRIPTION, "formatter_class": HelpFormatter, "exit_on_error": False,
                             "usage": "python cli.py validate [--config FILE] [--GROUP.KEY VALUE ...]"},
            },
            args=args,
        )
    except Relaunch as exc:
        return relaunch(exc.nproc, typed)
    except RunInterrupted as exc:
        print(exc.line(command_line(typed)), file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except EXPECTED_ERRORS as exc:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank refuses alike: one line is enough
            print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in USER_ERRNOS:
            raise
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    return 0
