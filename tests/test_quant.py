"""INT4 weights for pruned layers: grids, GPTQ vs round-to-nearest, masks untouched, packing, the pipeline."""

import math

import pytest
import torch
from safetensors.torch import load_file

from compressor.config import CalibrationConfig, ConfigError, EvaluationConfig, OutputConfig, PruningConfig
from compressor.pipeline import RunSettings, compress
from compressor.pruning.sparsegpt import output_error, sparsegpt_prune, sparsegpt_prune_shared
from compressor.quant.int4 import QuantizationConfig, bits_per_weight, quantize_gptq, quantize_rtn, sparsegpt_gptq_shared
from compressor.quant.pack import pack_layer, unpack_layer
from conftest import tiny_llama


def pruned_layer(rows=32, cols=256, sparsity=0.5, seed=0):
    # LLM activations are close to low rank: 32 directions plus a little noise
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2048, 32, generator=g) @ torch.randn(32, cols, generator=g) / math.sqrt(32)
    x += 0.1 * torch.randn(2048, cols, generator=g)
    h = 2 * x.t() @ x / x.shape[0]
    w = torch.randn(rows, cols, generator=g) * 0.05
    w_pruned, mask = sparsegpt_prune(w, h, sparsity)
    return w_pruned, mask, h


@pytest.mark.parametrize("method", ["rtn", "gptq", "gptq-act-order"])
@pytest.mark.parametrize("group", [128, 64, 100])
def test_quantized_weights_respect_the_mask_and_the_grid(method, group):
    w, mask, h = pruned_layer()
    if method == "rtn":
        q = quantize_rtn(w, mask, 4, group)
    else:
        q = quantize_gptq(w, h, mask, 4, group, blocksize=group, act_order=method == "gptq-act-order")
    assert torch.all(q.dequantized[~mask] == 0)  # pruned stay exactly zero
    assert torch.all(q.codes[~mask] == 0) and int(q.codes.max()) <= 15
    # every kept weight is exactly (code - zero) * scale of its group
    cols = torch.arange(w.shape[1]) // group
    grid = (q.codes.float() - q.zeros[:, cols]) * q.scales[:, cols]
    assert torch.equal(grid * mask, q.dequantized)
    # kept weights are not all rounded to zero
    assert (q.dequantized[mask] != 0).float().mean() > 0.8


def test_rtn_error_is_at_most_half_a_step():
    w, mask, _ = pruned_layer()
    q = quantize_rtn(w, mask, 4, 128)
    cols = torch.arange(w.shape[1]) // 128
    step = q.scales[:, cols]
    assert torch.all(((w - q.dequantized).abs() <= 0.5 * step + 1e-7)[mask])


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_round_to_nearest_with_and_without_act_order(act_order):
    w, mask, h = pruned_layer(seed=1)
    rtn = output_error(w, quantize_rtn(w, mask, 4, 128).dequantized, h)
    gptq = output_error(w, quantize_gptq(w, h, mask, 4, 128, act_order=act_order).dequantized, h)
    assert gptq < 0.5 * rtn, (gptq, rtn)


def test_act_order_with_a_diagonal_hessian_is_round_to_nearest():
    # uncorrelated inputs: no error to spread, and act-order's grids are those of the weights as they enter
    w, mask, _ = pruned_layer()
    h = torch.diag(torch.linspace(0.5, 3.0, w.shape[1]).flip(0)[torch.randperm(w.shape[1])])
    q = quantize_gptq(w, h, mask, 4, 64, blocksize=64, act_order=True, clip=True)
    r = quantize_rtn(w, mask, 4, 64, clip=True)
    assert torch.equal(q.codes, r.codes) and torch.equal(q.scales, r.scales) and torch.equal(q.zeros, r.zeros)
    assert torch.allclose(q.dequantized, r.dequantized, atol=1e-7)


def test_single_kept_weight_and_empty_groups_are_exact():
    w = torch.tensor([[0.0, 0.3, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [-0.2, 0.0, 0.0, 0.0]])
    mask = w != 0
    q = quantize_rtn(w, mask, 4, 4)
    assert torch.allclose(q.dequantized, w, atol=1e-4)


def test_pack_unpack_round_trip_is_exact():
    w, mask, h = pruned_layer(rows=17, cols=200)  # odd counts: padding of both the values and the mask bits
    q = quantize_gptq(w, h, mask, 4, 64)
    packed = pack_layer(q.codes, mask, q.scales, q.zeros)
    deq, mask2 = unpack_layer(packed, 64)
    assert torch.equal(mask2, mask)
    assert torch.equal(deq, q.dequantized)
    stored_bits = 8 * (packed["values"].numel() + packed["mask"].numel()) + 16 * packed["scales"].numel() \
        + 8 * packed["zeros"].numel()
    assert stored_bits / w.numel() < 4.0


def test_bits_per_weight_counts_values_mask_and_scales():
    b = bits_per_weight(numel=128 * 256, kept=128 * 128, groups=128 * 2, bits=4)
    assert b["values"] == 2.0 and b["mask"] == 1.0
    assert b["scales"] == pytest.approx(20 / 128)
    assert b["total"] == pytest.approx(3.0 + 20 / 128)


def test_bad_quantization_values_are_named():
    with pytest.raises(ConfigError, match="quantization.method='awq' is unknown: choose one of none, rtn, gptq"):
        QuantizationConfig(method="awq")
    with pytest.raises(ConfigError, match="quantization.bits=16"):
        QuantizationConfig(bits=16)


def test_pipeline_quantizes_saves_packed_and_loads_with_transformers(tmp_path, smollm2_tokenizer):
    from transformers import AutoModelForCausalLM

    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"token{i % 89} says more {i}" for i in range(3000)))
    model = tiny_llama(layers=2, hidden=128, vocab=len(smollm2_tokenizer))
    settings = RunSettings(pruning=PruningConfig(method="sparsegpt", sparsity=0.5),
                           calibration=CalibrationConfig(sources=[str(text)], num_samples=4, seqlen=32),
                           evaluation=EvaluationConfig(datasets=[], dense_baseline=False),
                           output=OutputConfig(dir=str(tmp_path / "out"), plots=False),
                           quantization=QuantizationConfig(method="gptq", group_size=64))
    report = compress(settings, "cpu", progress=False, model_and_tokenizer=(model, smollm2_tokenizer))
    q = report["quantization"]
    assert q["method"] == "gptq" and q["bits"] == 4
    assert q["bits_per_weight"]["total"] == pytest.approx(2.0 + 1.0 + 20 / 64, abs=0.01)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model")
    masks = load_file(tmp_path / "out" / "masks.safetensors")
    packed = load_file(tmp_path / "out" / "quantized.safetensors")
    params = dict(loaded.named_parameters())
    for name, mask in masks.items():
        layer = {k[len(name) + 1:]: v for k, v in packed.items() if k.startswith(name + ".")}
        deq, mask2 = unpack_layer(layer, 64)
        assert torch.equal(mask2, mask)
        assert torch.equal(params[name + ".weight"].detach(), deq)  # the saved model is the packed one


def test_clip_search_never_rounds_worse_than_min_max():
    w, mask, h = pruned_layer(seed=3)
    w[0, 5] = 0.5 if mask[0, 5] else w[0, 5]  # an outlier widens one group's range
    plain = ((quantize_rtn(w, mask, 4, 128).dequantized - w) * mask).square().sum(1)
    clipped = ((quantize_rtn(w, mask, 4, 128, clip=True).dequantized - w) * mask).square().sum(1)
    assert torch.all(clipped <= plain + 1e-12) and clipped.sum() < plain.sum()
    q = quantize_gptq(w, h, mask, 4, 128, clip=True)
    assert torch.all(q.dequantized[~mask] == 0)


def test_groups_whose_kept_weights_share_one_sign_are_not_clipped():
    w = torch.tensor([[0.02, 0.03, 0.025, 0.0], [-0.5, -0.4, -0.45, 0.0]])
    mask = w != 0
    q = quantize_rtn(w, mask, 4, 4)
    step = q.scales.max().item()
    assert torch.all((q.dequantized - w).abs() <= 0.5 * step + 1e-6)


def test_blocksize_must_hold_whole_groups():
    with pytest.raises(ConfigError, match="blocksize=96 must be a multiple of group_size=64"):
        QuantizationConfig(blocksize=96, group_size=64)


def dense_layer(rows=48, cols=256, seed=0):
    w, _, h = pruned_layer(rows, cols, sparsity=0.0, seed=seed)
    return w, h


def test_joint_sweep_without_pruning_is_gptq():
    # both take static grids from the weights as they enter (pruning nothing leaves them as they are)
    w, h = dense_layer()
    (joint,) = sparsegpt_gptq_shared([w], h, 0.0, QuantizationConfig(method="gptq", act_order=True))
    alone = quantize_gptq(w, h, torch.ones_like(w, dtype=torch.bool), 4, 128, act_order=True, clip=True)
    assert torch.equal(joint.codes, alone.codes) and torch.equal(joint.scales, alone.scales)
    assert torch.equal(joint.dequantized, alone.dequantized)


@pytest.mark.parametrize("act_order", [False, True])
def test_joint_sweep_prunes_to_the_target_on_the_grid(act_order):
    w, h = dense_layer(seed=2)
    cfg = QuantizationConfig(method="gptq", group_size=64, act_order=act_order)
    # two weights stacked, each with its own sparsity
    (a, b) = sparsegpt_gptq_shared([w[:16], w[16:]], h, [0.5, 0.75], cfg)
    order = torch.argsort(torch.diag(h), descending=True, stable=True) if act_order else torch.arange(w.shape[1])
    for q, s in ((a, 0.5), (b, 0.75)):
        assert torch.all(q.dequantized[~q.mask] == 0) and torch.all(q.codes[~q.mask] == 0)
        for start in range(0, w.shape[1], 128):  # SparseGPT's count per block of 128 columns in the sweep's order
            assert (~q.mask[:, order[start:start + 128]]).sum() == round(q.mask.shape[0] * 128 * s)
        cols = torch.arange(w.shape[1]) // 64
        assert torch.equal((q.codes.float() - q.zeros[:, cols]) * q.scales[:, cols] * q.mask, q.dequantized)


def test_joint_sweep_errs_less_than_quantizing_after_pruning_on_real_layers(smollm2, shared_data):
    # a SmolLM2 block on WikiText-2: one sweep for pruning and rounding against SparseGPT (same column order)
    # followed by GPTQ with the masks fixed, summed over the block's layers (single layers can go either way)
    from compressor.models.adapters import ModelAdapter
    from compressor.pruning.statistics import BlockStatistics
    from compressor.sequential import capture_block_inputs, run_block

    model, tok = smollm2
    text = (shared_data / "wikitext-2" / "wiki.valid.tokens").read_text()[:200_000]
    ids = tok(text, return_tensors="pt").input_ids[0]
    calib = ids[: 8 * 512].reshape(8, 512)
    adapter = ModelAdapter(model)
    cpu = torch.device("cpu")
    stream = capture_block_inputs(model, adapter, calib, 4, cpu, cpu)
    for block in adapter.blocks[:3]:
        stream.batches = run_block(block, stream, cpu)
    layers = adapter.linears(adapter.blocks[3])
    with torch.no_grad(), BlockStatistics(layers, gram=True) as stats:
        run_block(adapter.blocks[3], stream, cpu, on_batch=stats.end_batch, keep=False)
    cfg = QuantizationConfig(method="gptq")
    joint = after = 0.0
    for name, layer in layers.items():
        w, h = layer.weight.detach().float(), stats.of(name).hessian
        (j,) = sparsegpt_gptq_shared([w], h, 0.5, cfg)
        (pruned, mask), = sparsegpt_prune_shared([w], h, 0.5, act_order=True)
        seq = quantize_gptq(pruned, h, mask, 4, 128, clip=True, act_order=True)
        joint += output_error(w, j.dequantized, h)
        after += output_error(w, seq.dequantized, h)
    assert joint < 0.98 * after, (joint, after)


def test_act_order_pruning_keeps_the_count_and_errs_less():
    errors = {False: 0.0, True: 0.0}
    for seed in range(4):
        w, h = dense_layer(seed=seed)
        for act_order in errors:
            (pruned, mask), = sparsegpt_prune_shared([w], h, 0.5, act_order=act_order)
            assert (~mask).sum() == w.numel() // 2 and torch.all(pruned[~mask] == 0)
            errors[act_order] += output_error(w, pruned, h)
    assert errors[True] < errors[False], errors
    with pytest.raises(ConfigError, match="pruning.act_order=true needs unstructured pruning.*'2:4'"):
        PruningConfig(pattern="2:4", act_order=True)
    with pytest.raises(ConfigError, match="method='wanda' has no sweep"):
        PruningConfig(method="wanda", act_order=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs of the GPTQ column loop need a CUDA GPU")
def test_graphed_column_loop_equals_the_plain_loop_on_a_gpu(monkeypatch):
    import compressor.quant.int4 as int4

    w, h = dense_layer(rows=300, cols=320, seed=4)  # a last block narrower than the others: two graphs
    w, h = w.cuda(), h.cuda()
    cfg = QuantizationConfig(method="gptq", group_size=64)
    graphed = sparsegpt_gptq_shared([w[:100], w[100:]], h, [0.5, 0.6], cfg)
    mask = torch.rand(w.shape, generator=torch.Generator().manual_seed(0)).cuda() > 0.5
    graphed_gptq = quantize_gptq(w, h, mask, 4, 64, act_order=True, clip=True)
    monkeypatch.setattr(int4, "_GraphedSweep", lambda: None)  # the plain loop
    plain = sparsegpt_gptq_shared([w[:100], w[100:]], h, [0.5, 0.6], cfg)
    plain_gptq = quantize_gptq(w, h, mask, 4, 64, act_order=True, clip=True)
    for a, b in [*zip(graphed, plain), (graphed_gptq, plain_gptq)]:
        assert torch.equal(a.codes, b.codes) and torch.equal(a.mask, b.mask)
        assert torch.equal(a.dequantized, b.dequantized)


@pytest.mark.parametrize("method", ["rtn", "gptq", "gptq-act-order", "joint"])
def test_symmetric_grids_fix_the_zero_point_at_eight(method):
    w, mask, h = pruned_layer(cols=256)
    if method == "rtn":
        q = quantize_rtn(w, mask, 4, 128, symmetric=True)
    elif method == "joint":
        (q,) = sparsegpt_gptq_shared([w], h, 0.5, QuantizationConfig(method="gptq", symmetric=True))
        mask = q.mask
    else:
        q = quantize_gptq(w, h, mask, 4, 128, act_order=method == "gptq-act-order", symmetric=True)
    group = torch.arange(256) // 128
    assert (q.zeros == 8).all() and int(q.codes.max()) <= 15
    assert torch.equal(q.dequantized, (q.codes.float() - 8) * q.scales[:, group] * mask)  # codes -8..7 around 0
    assert torch.equal(q.scales, q.scales.half().float())  # stored as fp16
    deq, unpacked_mask = unpack_layer(pack_layer(q.codes, mask, q.scales, q.zeros), 128)
    assert torch.equal(deq, q.dequantized) and torch.equal(unpacked_mask, mask)
    if method == "rtn":  # scale = 2 max|w| / 15 per group; every kept weight within half a step (+ the scale's
        # fp16 rounding, up to 2^-11 relative, times the 7.5 steps of the largest weight)
        amax = torch.stack([(w[:, g * 128:(g + 1) * 128].abs() * mask[:, g * 128:(g + 1) * 128]).amax(1)
                            for g in range(2)], 1)
        assert torch.allclose(q.scales, 2 * amax / 15, rtol=1e-3)
        err = (w - q.dequantized).abs()[mask]
        assert (err <= q.scales[:, group][mask] * (0.5 + 7.5 * 2**-11)).all()


def test_gptq_honours_the_symmetric_grid_and_beats_rtn_on_it():
    w, mask, h = pruned_layer()
    rtn = output_error(w, quantize_rtn(w, mask, 4, 128, symmetric=True).dequantized, h)
    gptq = output_error(w, quantize_gptq(w, h, mask, 4, 128, act_order=True, symmetric=True).dequantized, h)
    asym = output_error(w, quantize_gptq(w, h, mask, 4, 128, act_order=True).dequantized, h)
    assert gptq < 0.7 * rtn
    assert asym < gptq  # the fixed zero point costs accuracy: symmetric is an opt-in for engines that need it
