"""LightningCLI front end: ``python cli.py fit|validate --config configs/<x>.yaml``.

The LightningModule holds the model, pruning and runtime groups; the LightningDataModule holds
calibration and evaluation; ``output`` is a top-level group. ``fit`` runs the sequential
compression on the Trainer's device; ``validate`` measures a model or a compressed output folder.
"""

from __future__ import annotations

import sys
from dataclasses import asdict

import argparse

from jsonargparse import DefaultHelpFormatter, set_parsing_settings
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

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
from compressor.quant.activations import ActivationQuantConfig
from compressor.quant.int4 import QuantizationConfig
from compressor.reconstruction.module import ReconstructionConfig
from compressor.schedule.allocate import ScheduleConfig

DESCRIPTION = """compressor: prune Hugging Face causal LMs block by block (magnitude, Wanda, SparseGPT;
unstructured or N:M), reconstruct blocks against the dense model, spread sparsity over layers,
quantize the kept weights to 4 bits, quantize weights and activations to 8 bits (W8A8), and measure
what was lost.

  fit       compress a model (stages: sequential pruning, then W8A8 activations), evaluate it, save model + masks
            + report
  validate  measure perplexity and sparsity of a model or a compressed output folder (output.dir/model)

Examples:
  python cli.py fit --config configs/quickstart.yaml
  python cli.py fit --config configs/protocol.yaml --model.pruning.method wanda --model.pruning.pattern 2:4
  python cli.py fit --config configs/schedule.yaml --model.schedule.dry_run true
  python cli.py validate --model.source.name_or_path outputs/quickstart/model --data.evaluation.datasets [wikitext2]
  python cli.py fit --config configs/quickstart.yaml --print_config
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
        self.cushion = cushion
        self.activations = activations
        self.save_hyperparameters({"cushion": asdict(cushion), "activations": asdict(activations),
                                   "source": asdict(source), "pruning": asdict(pruning), "runtime": asdict(runtime),
                                   "reconstruction": asdict(reconstruction), "schedule": asdict(schedule),
                                   "quantization": asdict(quantization)})


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


class CompressorCLI(LightningCLI):
    """LightningCLI whose ``fit`` and ``validate`` run the compressor's pipeline."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {
            "fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"},
            "validate": {"model", "dataloaders", "datamodule"},
        }

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_dataclass_arguments(OutputConfig, "output", help="Where results go.")

    def _output(self) -> OutputConfig:
        out = self.config_init[self.subcommand]["output"]
        return out if isinstance(out, OutputConfig) else OutputConfig(**dict(out))

    @property
    def device(self):
        return self.trainer.strategy.root_device

    def fit(self, model: CompressionTask, datamodule: CalibrationData, ckpt_path: str | None = None, **_):
        from compressor.pipeline import RunSettings, compress

        if ckpt_path not in (None, "last"):
            raise ConfigError(f"ckpt_path={ckpt_path!r}: only 'last' is supported (block checkpoints live in "
                              "output.dir/checkpoints; rerunning the same command resumes from them too)")
        settings = RunSettings(model=model.source, pruning=model.pruning, calibration=datamodule.calibration,
                               evaluation=datamodule.evaluation, output=self._output(), runtime=model.runtime,
                               reconstruction=model.reconstruction, recon_calibration=datamodule.recon_calibration,
                               schedule=model.schedule, quantization=model.quantization, cushion=model.cushion,
                               activations=model.activations)
        compress(settings, self.device)

    def validate(self, model: CompressionTask, datamodule: CalibrationData, **_):
        from compressor.pipeline import validate

        validate(model.source, datamodule.evaluation, datamodule.calibration, self._output(), self.device)


def main(args: list[str] | None = None) -> int:
    try:
        CompressorCLI(
            CompressionTask,
            CalibrationData,
            save_config_callback=None,
            trainer_defaults={"logger": False, "enable_checkpointing": False, "devices": 1},
            seed_everything_default=0,
            parser_kwargs={
                "description": DESCRIPTION, "formatter_class": HelpFormatter,
                "fit": {"description": DESCRIPTION, "formatter_class": HelpFormatter},
                "validate": {"description": DESCRIPTION, "formatter_class": HelpFormatter},
            },
            args=args,
        )
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
