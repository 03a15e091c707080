"""The real packaged SmolLM2 on the shared WikiText-2 text, through the command line."""

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from compressor.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def compressed(shared_data, tmp_path_factory, smollm2):
    out = tmp_path_factory.mktemp("e2e")
    rc = main([
        "fit", "--config", str(CONFIGS / "protocol.yaml"), "--trainer.accelerator", "cpu",
        "--data.calibration.sources", f"[{shared_data / 'wikitext-2' / 'wiki.valid.tokens'}]",
        "--data.calibration.num_samples", "4", "--data.calibration.seqlen", "128",
        "--data.evaluation.datasets", f"[{shared_data / 'wikitext-2-raw' / 'wiki.test.raw'}]",
        "--data.evaluation.max_windows", "4", "--data.evaluation.heldout_samples", "2",
        "--output.dir", str(out),
    ])
    assert rc == 0
    return out


def test_fit_writes_every_output(compressed):
    for name in ("report.json", "masks.safetensors", "compress.log", "sparsity.png", "block_error.png",
                 "model/model.safetensors", "model/config.json", "model/tokenizer.json"):
        assert (compressed / name).is_file(), name
    assert not list(compressed.glob(".*tmp*"))  # no temporary leftovers


def test_report_contents(compressed):
    report = json.loads((compressed / "report.json").read_text())
    assert report["sparsity"]["achieved"] == pytest.approx(0.5, abs=1e-6)
    assert len(report["blocks"]) == 30 and len(report["sparsity"]["per_layer"]) == 30 * 7
    (corpus, dense), = report["perplexity"]["dense"].items()
    compressed_ppl = report["perplexity"]["compressed"][corpus]
    assert 5 < dense < compressed_ppl < 10 * dense
    errors = [b["calib_rel_error"] for b in report["blocks"]]
    assert all(0 < e < 1 for e in errors)
    assert report["timings"]["total"] > report["timings"]["prune"] > 0
    assert report["peak_memory"]["host_gb"] > 0
    assert report["blocks"][0]["shared_inputs"]["self_attn.q_proj"] == [
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]


def test_saved_model_loads_with_transformers_and_keeps_the_masks(compressed):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(compressed / "model")
    masks = load_file(compressed / "masks.safetensors")
    assert len(masks) == 210
    weight = model.get_submodule("model.layers.3.mlp.down_proj").weight
    mask = masks["model.layers.3.mlp.down_proj"]
    assert (weight[~mask] == 0).all() and (weight[mask] != 0).float().mean() > 0.99


def test_validate_reproduces_the_reported_perplexity(compressed, shared_data, capsys):
    report = json.loads((compressed / "report.json").read_text())
    rc = main(["validate", "--trainer.accelerator", "cpu", "--model.source.name_or_path", str(compressed / "model"),
               "--data.calibration.seqlen", "128",
               "--data.evaluation.datasets", f"[{shared_data / 'wikitext-2-raw' / 'wiki.test.raw'}]",
               "--data.evaluation.max_windows", "4", "--output.dir", str(compressed)])
    assert rc == 0
    validated = json.loads((compressed / "validate.json").read_text())
    (corpus, ppl), = validated["perplexity"].items()
    assert ppl == pytest.approx(report["perplexity"]["compressed"][corpus], rel=1e-4)
    assert validated["linear_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert "perplexity" in capsys.readouterr().out
