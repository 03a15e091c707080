"""compressed-tensors checkpoints: written by the library, decompressed by it to our weights, loadable."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_llama
from safetensors.torch import load_file

from compressor.config import (
    CalibrationConfig,
    ConfigError,
    EvaluationConfig,
    ModelConfig,
    OutputConfig,
    PruningConfig,
)
from compressor.export import check_export, export_w4a16, export_w8a8, w4a16_layers, w4a16_scheme
from compressor.models.adapters import ModelAdapter
from compressor.models.loading import load_model
from compressor.quant.int4 import QuantizationConfig, quantize_rtn

pytest.importorskip("compressed_tensors")


def library_weights(folder) -> dict[str, torch.Tensor]:
    """Every linear's weight as the compressed-tensors library decompresses it, read from the files alone."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig as CTConfig

    qc = CTConfig.model_validate(json.loads((folder / "config.json").read_text())["quantization_config"])
    scheme = qc.config_groups["group_0"]
    comp = BaseCompressor.get_value_from_registry(qc.format)
    state = load_file(folder / "model.safetensors")
    out = {}
    for key in state:
        if key.endswith((".weight_packed", ".weight")) and (key.rsplit(".", 1)[0] + ".weight_scale") in state:
            prefix = key.rsplit(".", 1)[0]
            local = {k[len(prefix) + 1:]: v for k, v in state.items() if k.rsplit(".", 1)[0] == prefix}
            out[prefix] = comp.decompress(local, scheme)["weight"]
        elif key.endswith(".weight"):
            out[key[: -len(".weight")]] = state[key]
    return out


def int4_model(hidden=128, symmetric=True, group=128, seed=0):
    """A tiny Llama whose linears hold 50%-pruned symmetric INT4 weights; (model, quantized, masks)."""
    model = tiny_llama(layers=2, hidden=hidden, vocab=96, seed=seed)
    g = torch.Generator().manual_seed(seed)
    quantized, masks = {}, {}
    for name, module in ModelAdapter(model).iter_linears():
        w = module.weight.detach()
        mask = torch.rand(w.shape, generator=g) > 0.5
        q = quantize_rtn(w * mask, mask, 4, group, clip=True, symmetric=symmetric)
        masks[name] = mask
        quantized.update({f"{name}.{p}": getattr(q, p) for p in ("codes", "scales", "zeros")})
        with torch.no_grad():
            module.weight.copy_(q.dequantized)
    return model, quantized, masks


def test_w4a16_round_trip_is_exact_and_the_config_is_the_library_own(tmp_path):
    from compressed_tensors.quantization import QuantizationConfig as CTConfig

    model, quantized, masks = int4_model()
    ours = {n: m.weight.detach().clone() for n, m in ModelAdapter(model).iter_linears()}
    export = export_w4a16(model, None, tmp_path, quantized, masks, 128)
    assert len(export.packed) == 14 and export.dense == {"lm_head": "not quantized"}
    back = library_weights(tmp_path)
    for name, w in ours.items():
        assert torch.equal(back[name], w), name
        assert (back[name][~masks[name]] == 0).all()  # pruned weights stay zeros in the packed values
    state = load_file(tmp_path / "model.safetensors")
    packed = state["model.layers.0.mlp.down_proj.weight_packed"]
    assert packed.dtype == torch.int32 and packed.shape == (128, 256 * 4 // 32)
    assert state["model.layers.0.mlp.down_proj.weight_scale"].shape == (128, 2)
    assert "model.layers.0.mlp.down_proj.weight" not in state and "model.layers.0.mlp.down_proj.weight_zero_point" \
        not in state  # symmetric: no zero points
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["quantization_status"] == "compressed" and qc["ignore"] == ["lm_head"]
    weights = qc["config_groups"]["group_0"]["weights"]
    assert {k: weights[k] for k in ("num_bits", "type", "symmetric", "strategy", "group_size", "dynamic")} == {
        "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 128, "dynamic": False}
    assert CTConfig.model_validate(qc).config_groups["group_0"].weights == w4a16_scheme(128).weights


def test_w4a16_checkpoint_loads_with_transformers_to_the_same_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    model, quantized, masks = int4_model(seed=1)
    export_w4a16(model, None, tmp_path, quantized, masks, 128)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_layers_without_whole_groups_stay_dense_and_are_ignored(tmp_path):
    model, quantized, masks = int4_model(hidden=96, group=64)  # 96 inputs = 1.5 groups; the MLP's 192 = 3
    export = export_w4a16(model, None, tmp_path, quantized, masks, 64)
    assert sorted(export.packed) == [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    assert "model.layers.0.self_attn.q_proj" in export.dense
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert "model.layers.1.mlp.up_proj" in qc["ignore"]
    back = library_weights(tmp_path)
    for name, module in ModelAdapter(model).iter_linears():
        assert torch.equal(back[name], module.weight), name


def test_asymmetric_grids_are_refused():
    model, quantized, masks = int4_model(symmetric=False)
    with pytest.raises(ValueError, match="not symmetric"):
        w4a16_layers(quantized, masks, 128)


def test_w8a8_round_trip_within_one_step(tmp_path):
    model = tiny_llama(layers=2, hidden=64, vocab=96)
    g = torch.Generator().manual_seed(3)
    codes, scales, inputs = {}, {}, {}
    for name, module in ModelAdapter(model).iter_linears():
        out, cols = module.weight.shape
        codes[name] = torch.randint(-127, 128, (out, cols), generator=g, dtype=torch.int8)
        scales[name] = torch.rand(out, generator=g) * 1e-3 + 1e-4
        inputs[name] = float(torch.rand(1, generator=g)) * 0.05 + 0.01
    export = export_w8a8(model, None, tmp_path, codes, scales, inputs)
    assert len(export.packed) == 14
    back = library_weights(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    for name in codes:
        ours = codes[name].float() * scales[name].unsqueeze(1)
        step = scales[name].unsqueeze(1)
        assert ((back[name] - ours).abs() <= step).all(), name  # within one quantization step (in fact equal)
        assert torch.equal(back[name], ours)
        assert state[f"{name}.weight"].dtype == torch.int8 and torch.equal(state[f"{name}.weight"], codes[name])
        assert state[f"{name}.input_scale"].item() == pytest.approx(inputs[name])
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    group = qc["config_groups"]["group_0"]
    assert qc["format"] == "int-quantized"
    assert group["weights"]["num_bits"] == 8 and group["weights"]["strategy"] == "channel"
    acts = group["input_activations"]
    assert acts["num_bits"] == 8 and acts["strategy"] == "tensor" and acts["dynamic"] is False and acts["symmetric"]


def test_pipeline_writes_w8a8_static_scales_the_run_calibrated(tmp_path):
    from test_zeroshot import byte_tokenizer

    from compressor.pipeline import RunSettings, compress
    from compressor.quant.activations import ActivationQuantConfig, fake_quant
    from compressor.quant.w8a8 import FILE

    tok = byte_tokenizer()
    model = tiny_llama(layers=2, hidden=128, vocab=len(tok), seed=5)
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"word{i % 89} says more {i}." for i in range(2000)))
    acts = ActivationQuantConfig(granularity="per_tensor_static", symmetric=True)
    settings = RunSettings(pruning=PruningConfig(method="sparsegpt", sparsity=0.5),
                           calibration=CalibrationConfig(sources=[str(text)], num_samples=4, seqlen=64),
                           evaluation=EvaluationConfig(datasets=[], dense_baseline=False),
                           output=OutputConfig(dir=str(tmp_path / "out"), plots=False, format="compressed-tensors"),
                           activations=acts)
    report = compress(settings, "cpu", progress=False, model_and_tokenizer=(model, tok))
    assert report["export"]["scheme"] == "W8A8" and report["export"]["packed_layers"] == 14
    folder = tmp_path / "out" / "model"
    saved = load_file(folder / FILE)  # our own record of the same run, beside the export
    state, back = load_file(folder / "model.safetensors"), library_weights(folder)
    masks = load_file(tmp_path / "out" / "masks.safetensors")
    for name, module in ModelAdapter(model).iter_linears():
        assert torch.equal(state[f"{name}.weight"], saved[f"weight.{name}.codes"]), name
        assert torch.equal(back[name], module.weight), name  # the library's dequantized weights are the run's
        assert (back[name][~masks[name]] == 0).all()
    # a shared input (q/k/v) has one scale; the exported input scale quantizes as our quantizer does
    q, k = (state[f"model.layers.1.self_attn.{p}_proj.input_scale"] for p in ("q", "k"))
    assert torch.equal(q, k) and q.item() == pytest.approx(saved["input.model.layers.1.self_attn.q_proj.scale"].item())
    x = torch.randn(4, 128) * 3
    ours = fake_quant(x, q.reshape(()), torch.zeros(()), 8, True)
    theirs = torch.clamp(torch.round(x / q), -128, 127) * q
    assert ((ours - theirs).abs() <= q + 1e-6).all()  # within one step (they differ only at the -128 end)


def test_export_settings_are_checked_before_any_work():
    ct = OutputConfig(format="compressed-tensors")
    with pytest.raises(ConfigError, match="output.format='jax' is unknown: choose one of hf, compressed-tensors"):
        OutputConfig(format="jax")
    with pytest.raises(ConfigError, match="quantizes none"):
        check_export(ct, QuantizationConfig(), "llama")
    with pytest.raises(ConfigError, match="set quantization.bits=4 and quantization.symmetric=true"):
        check_export(ct, QuantizationConfig(method="rtn"), "llama")
    with pytest.raises(ConfigError, match="uses Conv1D"):
        check_export(ct, QuantizationConfig(method="rtn", symmetric=True), "gpt2")
    check_export(ct, QuantizationConfig(method="gptq", symmetric=True), "llama")
    check_export(OutputConfig(), QuantizationConfig(), "gpt2")
    from compressor.quant.activations import ActivationQuantConfig

    good = ActivationQuantConfig(granularity="per_tensor_static", symmetric=True)
    check_export(ct, QuantizationConfig(), "llama", good)
    with pytest.raises(ConfigError, match=r"granularity='per_token_dynamic' \(need per_tensor_static\); "
                                          r"model.activations.symmetric=False \(need true\)"):
        check_export(ct, QuantizationConfig(), "llama", ActivationQuantConfig(granularity="per_token_dynamic"))
    with pytest.raises(ConfigError, match="smoothquant=True"):
        check_export(ct, QuantizationConfig(), "llama",
                     ActivationQuantConfig(granularity="per_tensor_static", symmetric=True, smoothquant=True))


def test_pipeline_writes_a_compressed_tensors_model(tmp_path):
    from test_zeroshot import byte_tokenizer
    from transformers import AutoModelForCausalLM

    from compressor.pipeline import RunSettings, compress

    tok = byte_tokenizer()
    model = tiny_llama(layers=2, hidden=128, vocab=len(tok), seed=4)
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"word{i % 89} says more {i}." for i in range(2000)))
    settings = RunSettings(pruning=PruningConfig(method="sparsegpt", sparsity=0.5),
                           calibration=CalibrationConfig(sources=[str(text)], num_samples=4, seqlen=64),
                           evaluation=EvaluationConfig(datasets=[], dense_baseline=False),
                           output=OutputConfig(dir=str(tmp_path / "out"), plots=False, format="compressed-tensors"),
                           quantization=QuantizationConfig(method="gptq", symmetric=True))
    report = compress(settings, "cpu", progress=False, model_and_tokenizer=(model, tok))
    assert report["export"]["scheme"] == "W4A16" and report["export"]["packed_layers"] == 14
    assert report["quantization"]["symmetric"] is True
    back = library_weights(tmp_path / "out" / "model")
    masks = load_file(tmp_path / "out" / "masks.safetensors")
    for name, module in ModelAdapter(model).iter_linears():
        assert torch.equal(back[name], module.weight), name
        assert (back[name][~masks[name]] == 0).all()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model")
    ids = torch.randint(0, len(tok), (1, 16))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model.cpu()(ids).logits)
    # the project's loader (validate, fit) reads it decompressed: plain weights, equal to ours
    ours, _ = load_model(ModelConfig(name_or_path=str(tmp_path / "out" / "model")))
    for name, module in ModelAdapter(model).iter_linears():
        assert torch.equal(ours.get_submodule(name).weight, module.weight), name
