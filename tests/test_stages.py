"""A run as stages (prune, then W8A8 activations): order, report sections, files, resume, validate."""

import json

import pytest
import torch
from safetensors.torch import load_file

from compressor.config import CalibrationConfig, ConfigError, EvaluationConfig, ModelConfig, OutputConfig, PruningConfig
from compressor.pipeline import RunSettings, compress, validate
from compressor.quant.activations import ActivationQuantConfig, range_params
from compressor.quant.int4 import QuantizationConfig
from compressor.quant.w8a8 import FILE, calibrate
from conftest import tiny_llama


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(" ".join(f"word{i % 97} and more text {i}" for i in range(3000)))
    return path


def settings(out, text_file, sparsity=0.5, granularity="per_tensor_static", smoothquant=False, **output):
    return RunSettings(pruning=PruningConfig(method="sparsegpt", sparsity=sparsity),
                       calibration=CalibrationConfig(sources=[str(text_file)], num_samples=4, seqlen=32),
                       evaluation=EvaluationConfig(datasets=[str(text_file)], max_windows=4, dense_baseline=True,
                                                   heldout_samples=0),
                       output=OutputConfig(dir=str(out), plots=False, **output),
                       activations=ActivationQuantConfig(granularity=granularity, smoothquant=smoothquant))


def run(s, tokenizer):
    model = tiny_llama(layers=3, vocab=len(tokenizer))
    report = compress(s, "cpu", progress=False, model_and_tokenizer=(model, tokenizer))
    return report, model


def test_stages_run_in_order_with_their_sections_and_files(tmp_path, text_file, smollm2_tokenizer):
    report, model = run(settings(tmp_path, text_file, smoothquant=True), smollm2_tokenizer)
    assert report["stages"] == ["prune", "activations"]
    assert report["timings"]["prune"] > 0 and report["timings"]["activations"] > 0
    act = report["activations"]
    # 3 blocks x 4 distinct inputs (q/k/v, o, gate/up, down) feeding 7 linears each
    assert act["quantized_inputs"] == 12 and act["quantized_layers"] == 21 and act["resumed"] is False
    assert report["sparsity"]["achieved"] == pytest.approx(0.5, abs=1e-6)
    saved = load_file(tmp_path / "model" / FILE)
    codes = saved["weight.model.layers.1.mlp.down_proj.codes"]
    assert codes.dtype == torch.int8 and codes.abs().max() == 127
    assert "input.model.layers.1.self_attn.q_proj.scale" in saved  # static: one scale per distinct input
    assert "input.model.layers.1.self_attn.k_proj.scale" not in saved
    # pruning's zeros survive the 8-bit weights
    mask = load_file(tmp_path / "masks.safetensors")["model.layers.1.mlp.down_proj"]
    assert (codes[~mask] == 0).all()
    # W8A8 changes the model's outputs, a little: perplexity stays finite and near the pruned model's
    (corpus, dense), = report["perplexity"]["dense"].items()
    assert report["perplexity"]["compressed"][corpus] < 2 * dense


def test_saved_w8a8_output_validates_to_the_reported_perplexity(tmp_path, text_file, smollm2_tokenizer):
    report, _ = run(settings(tmp_path, text_file, granularity="per_token_dynamic"), smollm2_tokenizer)
    s = settings(tmp_path, text_file)
    checked = validate(ModelConfig(name_or_path=str(tmp_path / "model")), s.evaluation, s.calibration, s.output.dir,
                       progress=False)
    (corpus, ppl), = checked["perplexity"].items()
    assert checked["activations"] == "per_token_dynamic"
    assert ppl == pytest.approx(report["perplexity"]["compressed"][corpus], rel=1e-6)
    assert ppl != pytest.approx(report["perplexity"]["dense"][corpus], rel=1e-6)


def test_resume_keeps_pruning_when_only_the_activation_setting_changes(tmp_path, text_file, smollm2_tokenizer):
    # checkpoints kept, and the finished run redone (overwrite): what a resume of an interrupted run loads
    keep = {"keep_checkpoints": True, "overwrite": True}
    first, model = run(settings(tmp_path, text_file, **keep), smollm2_tokenizer)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    same, model = run(settings(tmp_path, text_file, **keep), smollm2_tokenizer)
    assert same["resumed_blocks"] == 3 and same["activations"]["resumed"] is True
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert same["perplexity"]["compressed"] == first["perplexity"]["compressed"]
    other, _ = run(settings(tmp_path, text_file, granularity="per_tensor_dynamic", **keep), smollm2_tokenizer)
    assert other["resumed_blocks"] == 3 and other["activations"]["resumed"] is False
    manifest = json.loads((tmp_path / "checkpoints" / "manifest.json").read_text())
    assert set(manifest["stages"]) == {"activations"} and manifest["blocks_done"] == 3


def test_w8a8_alone_runs_without_the_prune_stage(tmp_path, text_file, smollm2_tokenizer):
    report, model = run(settings(tmp_path, text_file, sparsity=0.0, granularity="per_tensor_dynamic"),
                        smollm2_tokenizer)
    assert report["stages"] == ["activations"] and "sparsity" not in report
    assert report["model"]["nonzero"] > 0.99 * report["model"]["parameters"]


def test_int4_weights_with_8_bit_weights_is_refused(tmp_path, text_file):
    s = settings(tmp_path, text_file)
    s.quantization = QuantizationConfig(method="rtn")
    with pytest.raises(ConfigError, match="model.activations.weight_bits=8 .* set model.activations.weight_bits=0"):
        compress(s, "cpu", progress=False)


def test_static_ranges_come_from_the_calibration_windows_only():
    model = tiny_llama(layers=2)
    calib = torch.randint(0, 256, (4, 16))
    calib[2:, 3] = 7  # windows 2-3 differ
    seen = []
    hook = model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        model(calib[:2])
    hook.remove()
    x = torch.cat(seen)
    want_scale, want_zero = range_params(x.min(), x.max())
    state = calibrate(model, calib, ActivationQuantConfig("per_tensor_static", calibration_windows=2), "cpu")
    q = state.inputs["model.layers.0.self_attn.q_proj"]
    assert state.owner["model.layers.0.self_attn.v_proj"] == "model.layers.0.self_attn.q_proj"
    assert q.scale.item() == pytest.approx(want_scale.item(), rel=1e-6) and q.zero.item() == want_zero.item()


def test_bad_activation_settings_fail_before_the_model_loads(capsys, monkeypatch):
    import compressor.pipeline
    from compressor.cli import main

    monkeypatch.setattr(compressor.pipeline, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    rc = main(["fit", "--trainer.accelerator", "cpu", "--model.activations.granularity", "per_channel"])
    assert rc == 2 and "model.activations.granularity='per_channel' is unknown" in capsys.readouterr().err
