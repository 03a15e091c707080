"""``--trainer.accelerator hpu``: lightning-habana's classes where it imports, one line naming the image where not."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from compressor.accelerators import accelerator_for, single_device, trainer_settings
from compressor.cli import main
from compressor.config import ConfigError
from compressor.engine import BlockKwargs, choose_store_device
from compressor.pipeline import machine_name, peak_memory
from compressor.reconstruction.fit import fit_window
from compressor.reconstruction.module import ReconstructionConfig

ROOT = Path(__file__).resolve().parents[1]


def habana_imports() -> bool:
    try:
        import lightning_habana  # noqa: F401
    except Exception:  # absent, or built for another Lightning (1.6.0 on 2.6: ImportError)
        return False
    return True


HABANA_IMPORTS = habana_imports()

# Stand-ins with lightning-habana's class names that run on the CPU. They test only the wiring (which classes
# the Trainers are given); they say nothing of whether lightning-habana or a Gaudi works.
FAKE_HABANA = '''
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

made = []


class HPUAccelerator(CPUAccelerator):
    def __init__(self):
        super().__init__()
        made.append(self)

    @staticmethod
    def is_available():
        return True

    @classmethod
    def register_accelerators(cls, registry):  # Lightning 2.3 registers lightning-habana's classes: keep "cpu" intact
        pass


class SingleHPUStrategy(SingleDeviceStrategy):
    def __init__(self, *_, **__):
        super().__init__(device="cpu")
        made.append(self)

    @classmethod
    def register_strategies(cls, registry):
        pass


class HPUParallelStrategy(DDPStrategy):
    @classmethod
    def register_strategies(cls, registry):
        pass


class HPUDDPStrategy(HPUParallelStrategy):
    def __init__(self):
        super().__init__()
        made.append(self)


class HPUPrecisionPlugin(Precision):  # Lightning 2.3 picks it for an HPUAccelerator
    def __init__(self, *_, **__):
        super().__init__()
'''


@pytest.fixture
def fake_habana(tmp_path, monkeypatch):
    """A stand-in ``lightning_habana`` on sys.path (wiring only, see FAKE_HABANA)."""
    package = tmp_path / "fake" / "lightning_habana"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(textwrap.dedent(FAKE_HABANA))
    monkeypatch.syspath_prepend(str(package.parent))
    monkeypatch.delitem(sys.modules, "lightning_habana", raising=False)
    import lightning_habana

    yield lightning_habana
    sys.modules.pop("lightning_habana", None)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    # PYTHONWARNINGS: Lightning 2.3.3 (the Gaudi pin) warns about pkg_resources on import, on every command
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore::UserWarning")
    return subprocess.run([sys.executable, "cli.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=env)


@pytest.mark.skipif(HABANA_IMPORTS, reason="lightning_habana is importable here: the refusal cannot show")
def test_hpu_without_lightning_habana_is_one_line_naming_the_image():
    done = run_cli("fit", "--trainer.accelerator", "hpu")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert lines == [lines[0]] and "Traceback" not in done.stderr
    assert lines[0].startswith("error: trainer.accelerator='hpu' needs lightning-habana")
    assert "docker/Dockerfile.gaudi" in lines[0]


@pytest.mark.skipif(not HABANA_IMPORTS, reason="lightning_habana does not import here")
def test_hpu_with_real_lightning_habana_but_no_gaudi_is_one_line():
    """The real package (the throwaway Lightning 2.3.3 environment in docker/README.md) on a machine without a Gaudi."""
    import lightning_habana

    if lightning_habana.HPUAccelerator.is_available():
        pytest.skip("a Gaudi is visible here")
    done = run_cli("fit", "--trainer.accelerator", "hpu")
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "error: trainer.accelerator='hpu': lightning-habana imports but no Gaudi device is visible (run the Gaudi "
        "image with --runtime=habana and HABANA_VISIBLE_DEVICES, see docker/README.md)"]


def test_lightning_names_pass_through():
    assert trainer_settings("gpu", 2, "ddp") == {"accelerator": "gpu", "devices": 2, "strategy": "ddp"}
    assert trainer_settings("cpu") == {"accelerator": "cpu", "devices": 1, "strategy": "auto"}
    assert single_device(1) and single_device("1") and single_device([3])
    assert not single_device(2) and not single_device("auto") and not single_device([0, 1])


def test_hpu_selects_lightning_habana_classes(fake_habana):
    """Wiring only, with a stand-in lightning_habana package (not the real one, no Gaudi)."""
    one = trainer_settings("hpu", 1)
    assert type(one["accelerator"]) is fake_habana.HPUAccelerator
    assert type(one["strategy"]) is fake_habana.SingleHPUStrategy
    several = trainer_settings("HPU", 8)
    assert type(several["strategy"]) is fake_habana.HPUDDPStrategy and several["devices"] == 8
    assert trainer_settings("hpu", 1, "my_strategy")["strategy"] == "my_strategy"


def test_cli_trainer_gets_lightning_habana_classes(fake_habana, capsys):
    """Wiring only, with a stand-in lightning_habana: the CLI's Trainer is built with its accelerator and
    strategy; the run then stops at the missing model (after the Trainer, before any loading)."""
    rc = main(["fit", "--trainer.accelerator", "hpu", "--model.source.name_or_path", "./no/such/model"])
    assert rc == 2 and "no such file or folder" in capsys.readouterr().err
    assert sorted(type(m).__name__ for m in fake_habana.made) == ["HPUAccelerator", "SingleHPUStrategy"]


def test_reconstruction_trainer_gets_lightning_habana_classes(fake_habana):
    """Wiring only, with a stand-in lightning_habana: fit_window's Trainer trains with the HPU classes."""
    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Linear(8, 8))
    masked = [(block[0].weight, torch.ones(8, 8, dtype=torch.bool))]
    x = [torch.randn(4, 3, 8)]
    blocks = [_Block(block)]
    stats = fit_window(blocks, masked, BlockKwargs(blocks, [{(4, 3): {}}]), x, [t * 0.5 for t in x],
                       ReconstructionConfig(mode="br", epochs=1, batch_size=2), "w", accelerator="hpu")
    assert stats["accelerator"] == "HPUAccelerator" and stats["steps"] == 2
    assert {type(m).__name__ for m in fake_habana.made} == {"HPUAccelerator", "SingleHPUStrategy"}


class _Block(torch.nn.Module):
    """A decoder-block-shaped module: hidden states in, a tuple out."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, hidden_states, **_):
        return (self.inner(hidden_states),)


def test_cuda_only_paths_are_skipped_on_hpu():
    hpu = torch.device("hpu")
    assert accelerator_for(hpu) == "hpu" and accelerator_for("cuda:1") == "gpu" and accelerator_for("cpu") == "cpu"
    # torch.cuda.mem_get_info would raise on this CPU-only torch: an hpu device never reaches it
    assert choose_store_device(10**15, hpu, "auto") == hpu
    assert peak_memory(hpu)["gpu_gb"] is None
    assert machine_name(hpu) == "Intel Gaudi (HPU)"


def test_hpu_refusal_is_a_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "lightning_habana", None)  # import raises ImportError
    with pytest.raises(ConfigError, match=r"not import here \((ModuleNotFound|Import)Error: .*docker/Dockerfile.gaudi"):
        trainer_settings("hpu")
