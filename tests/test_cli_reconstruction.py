"""Reconstruction through the command line, on a tiny random Llama saved with the real SmolLM2 tokenizer."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from compressor.cli import main


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer):
    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(smollm2_tokenizer), max_position_embeddings=512)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    smollm2_tokenizer.save_pretrained(folder)
    return folder


def test_fit_with_cross_block_reconstruction(tiny_model_dir, shared_data, tmp_path):
    out = tmp_path / "out"
    valid = shared_data / "wikitext-2" / "wiki.valid.tokens"
    rc = main([
        "fit", "--trainer.accelerator", "cpu", "--model.source.name_or_path", str(tiny_model_dir),
        "--model.reconstruction.mode", "br+gp+cr", "--model.reconstruction.epochs", "2",
        "--model.reconstruction.batch_size", "4",
        "--data.calibration.sources", f"[{valid}]", "--data.calibration.num_samples", "4",
        "--data.calibration.seqlen", "64",
        "--data.recon_calibration.sources", f"[{valid}]", "--data.recon_calibration.num_samples", "8",
        "--data.recon_calibration.seqlen", "64",
        "--data.evaluation.datasets", f"[{shared_data / 'wikitext-2-raw' / 'wiki.test.raw'}]",
        "--data.evaluation.max_windows", "2", "--data.evaluation.heldout_samples", "2",
        "--output.dir", str(out),
    ])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["pruning"]["reconstruction"] == "br+gp+cr"
    assert report["calibration"]["reconstruction_windows"] == [8, 64]
    windows = [t["window"] for b in report["blocks"] for t in b["training"]]
    assert windows == [[0], [0, 1], [1, 2], [2]]
    for name in ("block_000", "block_000-001", "block_001-002", "block_002"):
        metrics = (out / "logs" / name / "metrics.csv").read_text().splitlines()
        assert metrics[0].count("train_loss") >= 1 and len(metrics) > 2
    assert (out / "block_error.png").is_file()
    assert report["sparsity"]["achieved"] == pytest.approx(0.5, abs=1e-6)
