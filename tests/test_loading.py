"""Loading is checked by us: dtypes kept, incomplete checkpoints, missing tokenizers, layer shapes, loader errors."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import compressor.pipeline
from compressor.cli import main
from compressor.config import CalibrationConfig, ConfigError, EvaluationConfig, ModelConfig, OutputConfig, PruningConfig
from compressor.models.loading import load_config, load_model, load_tokenizer, source_dtype
from compressor.pipeline import RunSettings, compress, preflight
from conftest import save_tiny_model, word_text


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(word_text())
    return path


def settings(model: ModelConfig, out, text_file, **pruning) -> RunSettings:
    return RunSettings(model=model, pruning=PruningConfig(**pruning),
                       calibration=CalibrationConfig(sources=[str(text_file)], num_samples=4, seqlen=32),
                       evaluation=EvaluationConfig(datasets=[], dense_baseline=False),
                       output=OutputConfig(dir=str(out), plots=False, checkpoint=False))


@pytest.fixture
def no_model_load(monkeypatch):
    def tripwire(*a, **k):
        raise AssertionError("the weights were loaded before the bad setting was reported")

    monkeypatch.setattr(compressor.pipeline, "load_model", tripwire)


@pytest.mark.parametrize("saved,setting,expected", [
    (torch.bfloat16, "auto", torch.bfloat16),
    (torch.float16, "auto", torch.float16),
    (torch.float32, "auto", torch.float32),
    (torch.bfloat16, "float32", torch.float32),
])
def test_saved_model_keeps_the_source_dtype_and_size(tmp_path, text_file, saved, setting, expected):
    src = save_tiny_model(tmp_path / "src", saved)
    report = compress(settings(ModelConfig(name_or_path=str(src), dtype=setting), tmp_path / "out", text_file), "cpu",
                      progress=False)
    out = tmp_path / "out" / "model"
    weights = load_file(out / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {expected}
    assert json.loads((out / "config.json").read_text())["dtype"] == str(expected).removeprefix("torch.")
    assert report["model"]["dtype"] == str(expected).removeprefix("torch.")
    ratio = (out / "model.safetensors").stat().st_size / (src / "model.safetensors").stat().st_size
    assert ratio == pytest.approx(expected.itemsize / saved.itemsize, rel=0.02)
    assert report["sparsity"]["achieved"] == pytest.approx(0.5, abs=0.01)  # the pruning math ran (in fp32)


def test_auto_dtype_of_gguf_is_float32_and_of_a_config_without_one_too():
    from transformers import LlamaConfig

    cfg = LlamaConfig()
    cfg.dtype = None
    assert source_dtype(ModelConfig(name_or_path="org/model"), cfg) == torch.float32
    cfg.dtype = torch.bfloat16
    assert source_dtype(ModelConfig(name_or_path="org/model"), cfg) == torch.bfloat16
    assert source_dtype(ModelConfig(name_or_path="org/model", dtype="float16"), cfg) == torch.float16
    assert source_dtype(ModelConfig(name_or_path="org/model", gguf_file="m.gguf"), cfg) == torch.float32


def test_checkpoint_missing_or_holding_extra_tensors_is_refused_by_name(tmp_path):
    src = save_tiny_model(tmp_path / "src")
    state = load_file(src / "model.safetensors")
    del state["model.layers.1.mlp.down_proj.weight"], state["model.norm.weight"]
    state["model.layers.0.extra.weight"] = torch.zeros(2)
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConfigError) as err:
        load_model(ModelConfig(name_or_path=str(src)))
    message = str(err.value)
    assert "lacks 2 tensors" in message and "model.layers.1.mlp.down_proj.weight" in message
    assert "model.norm.weight" in message and "model.layers.0.extra.weight" in message


def test_tied_embeddings_are_not_missing(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=1000, tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "tied")
    save_tiny_model(tmp_path / "tok", layers=1)  # only for its tokenizer
    model, _ = load_model(ModelConfig(name_or_path=str(tmp_path / "tied"), tokenizer=str(tmp_path / "tok")))
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_folder_without_tokenizer_is_refused_in_one_line_and_the_tokenizer_option_fixes_it(tmp_path, text_file,
                                                                                              capsys, no_model_load):
    ckpt = save_tiny_model(tmp_path / "ckpt", tokenizer=False)
    args = ["fit", "--trainer.accelerator", "cpu", "--model.source.name_or_path", str(ckpt),
            "--data.calibration.sources", f"[{text_file}]", "--data.calibration.seqlen", "32",
            "--data.evaluation.datasets", "[]", "--output.dir", str(tmp_path / "out")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: model.name_or_path='{ckpt}' has no tokenizer")
    assert "model.source.tokenizer" in err[-1]
    tok_src = save_tiny_model(tmp_path / "base")
    cfg = ModelConfig(name_or_path=str(ckpt), tokenizer=str(tok_src))
    preflight(settings(cfg, tmp_path / "out", text_file))
    assert load_tokenizer(cfg)("w5 w6").input_ids == [8, 9]


def test_nm_pattern_on_an_indivisible_width_names_every_layer_before_loading(tmp_path, text_file, no_model_load):
    src = save_tiny_model(tmp_path / "src", intermediate=130, layers=3)
    model = ModelConfig(name_or_path=str(src))
    with pytest.raises(ConfigError) as err:
        preflight(settings(model, tmp_path / "out", text_file, method="wanda", pattern="2:4"))
    message = str(err.value)
    assert "pruning.pattern='2:4' needs every pruned layer's in_features divisible by 4" in message
    assert "mlp.down_proj (in_features=130) in blocks 0-2" in message
    assert "--model.pruning.skip '[mlp.down_proj]'" in message
    assert "q_proj" not in message and "gate_proj" not in message  # widths 64: fine
    # the suggested remedy passes the check
    preflight(settings(model, tmp_path / "out", text_file, method="wanda", pattern="2:4", skip=["mlp.down_proj"]))


def test_skip_naming_no_layer_is_refused(tmp_path, text_file, no_model_load):
    src = save_tiny_model(tmp_path / "src")
    with pytest.raises(ConfigError, match=r"pruning.skip entry 'mlp.dwn_proj' names no linear layer.*mlp.down_proj"):
        preflight(settings(ModelConfig(name_or_path=str(src)), tmp_path / "out", text_file, skip=["mlp.dwn_proj"]))


def test_unreadable_checkpoints_become_config_errors_naming_the_value(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"this is not a gguf file" * 100)
    with pytest.raises(ConfigError, match=r"model.name_or_path='.*model.gguf': its config could not be loaded"):
        load_config(ModelConfig(name_or_path=str(fake)))

    torn = save_tiny_model(tmp_path / "torn")
    blob = (torn / "model.safetensors").read_bytes()
    (torn / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ConfigError, match=r"model.name_or_path='.*torn': the weights could not be loaded"):
        load_model(ModelConfig(name_or_path=str(torn)))

    bad_config = save_tiny_model(tmp_path / "badcfg")
    (bad_config / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"model.name_or_path='.*badcfg': its config could not be loaded"):
        load_config(ModelConfig(name_or_path=str(bad_config)))

    shutil.rmtree(tmp_path / "badcfg")
    with pytest.raises(ConfigError, match=r"model.tokenizer='.*nowhere': no such file or folder"):
        ModelConfig(name_or_path=str(torn), tokenizer=str(tmp_path / "nowhere"))
