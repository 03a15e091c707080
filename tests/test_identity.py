"""The model's identity is its weights: a model changed in place is another model, a moved one the same."""

import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from compressor.config import (
    CalibrationConfig,
    ConfigError,
    EvaluationConfig,
    GenerationConfig,
    ModelConfig,
    OutputConfig,
    PruningConfig,
)
from compressor.models.identity import describe_change, model_identity
from compressor.models.loading import load_model
from compressor.pipeline import RunSettings, compress
from conftest import save_tiny_model, word_text


def change_in_place(folder, names=None, seed=1):
    """Add noise to the saved weights (all, or those whose name contains one of ``names``) and save over them."""
    model = AutoModelForCausalLM.from_pretrained(folder)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if names is None or any(n in name for n in names):
                p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(folder)


def test_fingerprint_follows_the_weights_not_the_path(tmp_path):
    src = save_tiny_model(tmp_path / "src")
    first = model_identity(*load_model(ModelConfig(name_or_path=str(src))))
    shutil.copytree(src, tmp_path / "moved")
    assert model_identity(*load_model(ModelConfig(name_or_path=str(tmp_path / "moved"))))["fingerprint"] == \
        first["fingerprint"]
    change_in_place(src, names=["layers.1.mlp.up_proj"])
    changed = model_identity(*load_model(ModelConfig(name_or_path=str(src))))
    assert changed["fingerprint"] != first["fingerprint"]
    assert describe_change(first, changed).startswith("1 of 21 weight tensors differ (model.layers.1.mlp.up_proj.weight)")
    as_bf16 = model_identity(*load_model(ModelConfig(name_or_path=str(src), dtype="bfloat16")))
    assert "dtype float32 -> bfloat16" in describe_change(changed, as_bf16)


def test_resume_refuses_a_model_changed_in_place_and_generated_text_is_not_reused(tmp_path):
    src = save_tiny_model(tmp_path / "ft", layers=3)
    (tmp_path / "text.txt").write_text(word_text())
    cache = tmp_path / "cache"

    def settings(start_over=False):
        generation = GenerationConfig(language="any", cache_dir=str(cache), batch_size=2, greedy_tokens=0)
        return RunSettings(model=ModelConfig(name_or_path=str(src)), pruning=PruningConfig(method="wanda"),
                           calibration=CalibrationConfig(sources=["generated"], num_samples=2, seqlen=16,
                                                         generation=generation),
                           evaluation=EvaluationConfig(datasets=[], dense_baseline=False),
                           output=OutputConfig(dir=str(tmp_path / "out"), plots=False, start_over=start_over,
                                               keep_checkpoints=True, overwrite=True))

    first = compress(settings(), "cpu", progress=False)
    assert len(list(cache.glob("*.pt"))) == 1
    assert compress(settings(), "cpu", progress=False)["resumed_blocks"] == 3  # same model: resumes
    change_in_place(src)
    with pytest.raises(ConfigError) as err:
        compress(settings(), "cpu", progress=False)
    message = str(err.value)
    assert "holds checkpoints of another model" in message and f"{src}" in message
    assert "30 of 30 weight tensors differ" in message and "output.start_over=true" in message
    assert len(list(cache.glob("*.pt"))) == 2  # the new model wrote its own calibration text
    fresh = compress(settings(start_over=True), "cpu", progress=False)
    assert fresh["resumed_blocks"] == 0 and fresh["model"]["fingerprint"] != first["model"]["fingerprint"]
