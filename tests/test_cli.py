"""Bad configurations fail before the model loads, naming the value and what is valid."""

import json
from pathlib import Path

import pytest

import compressor.pipeline
from compressor.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(autouse=True)
def model_must_not_load(monkeypatch):
    def tripwire(*a, **k):
        raise AssertionError("the model was loaded before the bad configuration was reported")

    monkeypatch.setattr(compressor.pipeline, "load_model", tripwire)


def run_fit(capsys, *args):
    rc = main(["fit", "--trainer.accelerator", "cpu", *args])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--model.pruning.sparsity", "1.0"], "pruning.sparsity=1.0 is outside [0, 1)"),
    (["--model.pruning.sparsity", "-0.1"], "pruning.sparsity=-0.1 is outside [0, 1)"),
    (["--model.pruning.pattern", "4:4"], "N:M needs 0 < N < M"),
    (["--model.pruning.pattern", "half"], "use 'unstructured' or 'N:M'"),
    (["--model.pruning.method", "obs"], "pruning.method='obs' is unknown: choose one of magnitude, wanda, sparsegpt"),
    (["--data.calibration.sources", "[missing.txt]"], "'missing.txt' is neither a known dataset"),
    (["--data.evaluation.datasets", "[nope.raw]"], "evaluation.datasets: 'nope.raw'"),
    (["--model.source.name_or_path", "./no/such/model"], "no such file or folder"),
    (["--model.source.dtype", "int3"], "model.dtype='int3' is not valid: choose one of auto, float32, bfloat16, float16"),
    (["--model.runtime.activations", "disk"], "choose auto, device or cpu"),
])
def test_bad_values_are_named(capsys, args, message):
    rc, err = run_fit(capsys, *args)
    assert rc == 2
    assert message in err


def test_seqlen_above_context(capsys, smollm2_tokenizer, tmp_path):
    rc, err = run_fit(capsys, "--data.calibration.seqlen", "10000", "--output.dir", str(tmp_path))
    assert rc == 2 and "calibration.seqlen=10000 is above the model's context of 8192 tokens" in err


def test_unknown_model_family(capsys, tmp_path):
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    rc, err = run_fit(capsys, "--model.source.name_or_path", str(folder), "--output.dir", str(tmp_path / "o"))
    assert rc == 2 and "model family 'bert' is not supported" in err and "llama" in err


def test_print_config_shows_every_group(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / "quickstart.yaml"), "--print_config"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for key in ("source:", "pruning:", "runtime:", "calibration:", "evaluation:", "output:", "method: sparsegpt"):
        assert key in out


def test_help_explains(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    out = capsys.readouterr().out
    assert "SparseGPT" in out and "--model.pruning.method" in out and "--data.calibration.sources" in out
