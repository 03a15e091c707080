"""Block-wise reconstruction: masks stay fixed, each mode trains toward the right targets, CR windows."""

import copy

import pytest
import torch

import compressor.sequential as sequential
from compressor.config import ConfigError, PruningConfig, RuntimeConfig
from compressor.models.adapters import weight_of
from compressor.reconstruction.module import ReconstructionConfig
from compressor.sequential import SequentialPruner
from conftest import tiny_llama

LAYERS = 3


def prune(model, mode, ids, epochs=3, lr=1e-3, method="sparsegpt", pattern="unstructured"):
    cfg = ReconstructionConfig(mode=mode, epochs=epochs, lr=lr, batch_size=4)
    pruner = SequentialPruner(model, PruningConfig(method=method, pattern=pattern), RuntimeConfig(batch_size=4),
                              "cpu", reconstruction=cfg, accelerator="cpu")
    return pruner, pruner.run(ids, ids[:4], progress=False)


@pytest.fixture
def recorded_fits(monkeypatch):
    calls = []
    real = sequential.fit_window

    def spy(blocks, masked, kwargs, inputs, targets, cfg, name, *args, **kw):
        calls.append({"name": name, "inputs": torch.cat(inputs).clone(), "targets": torch.cat(targets).clone()})
        return real(blocks, masked, kwargs, inputs, targets, cfg, name, *args, **kw)

    monkeypatch.setattr(sequential, "fit_window", spy)
    return calls


def hidden_states(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, output_hidden_states=True).hidden_states


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_masked_weights_stay_exactly_zero_after_training(pattern):
    model = tiny_llama(layers=LAYERS)
    ids = torch.randint(0, 256, (8, 32))
    pruner, reports = prune(model, "br+gp", ids, epochs=5, lr=1e-2, pattern=pattern)
    changed = 0
    for name, mask in pruner.masks.items():
        w = weight_of(model.get_submodule(name))
        assert (w[~mask] == 0).all(), name
        changed += int((w[mask] == 0).sum() == 0)
    assert changed == len(pruner.masks)  # kept weights are alive
    assert all(r.training for r in reports)


def test_br_targets_are_the_dense_block_on_the_sparse_input(recorded_fits):
    torch.manual_seed(0)
    model = tiny_llama(layers=LAYERS)
    dense = copy.deepcopy(model)
    ids = torch.randint(0, 256, (8, 16))
    prune(model, "br", ids)
    final = hidden_states(model, ids)
    assert [c["name"] for c in recorded_fits] == ["block_000", "block_001", "block_002"]
    for i, call in enumerate(recorded_fits):
        assert torch.allclose(call["inputs"], final[i], atol=1e-5)  # the sparse stream
        with torch.no_grad():
            expected = dense.model.layers[i](call["inputs"], position_embeddings=dense.model.rotary_emb(
                call["inputs"], torch.arange(16).unsqueeze(0)), attention_mask=None)
        expected = expected[0] if isinstance(expected, tuple) else expected
        assert torch.allclose(call["targets"], expected, atol=1e-5)


def test_gp_targets_are_the_dense_models_activations(recorded_fits):
    torch.manual_seed(1)
    model = tiny_llama(layers=LAYERS)
    ids = torch.randint(0, 256, (8, 16))
    dense_states = hidden_states(copy.deepcopy(model), ids)
    prune(model, "br+gp", ids)
    final = hidden_states(model, ids)
    for i, call in enumerate(recorded_fits[:-1]):  # the last dense hidden state is after the final norm
        assert torch.allclose(call["inputs"], final[i], atol=1e-5)
        assert torch.allclose(call["targets"], dense_states[i + 1], atol=1e-5)


def test_cr_windows_cover_the_blocks_and_carry_only_the_first_output(recorded_fits):
    torch.manual_seed(2)
    model = tiny_llama(layers=4)
    ids = torch.randint(0, 256, (8, 16))
    dense_states = hidden_states(copy.deepcopy(model), ids)
    _, reports = prune(model, "br+gp+cr", ids)
    names = [c["name"] for c in recorded_fits]
    assert names == ["block_000", "block_000-001", "block_001-002", "block_002-003", "block_003"]
    assert [t["window"] for r in reports for t in r.training] == [[0], [0, 1], [1, 2], [2, 3], [3]]
    final = hidden_states(model, ids)
    # window (i-1, i) starts from the final sparse input of block i-1 and aims at the dense output of block i
    for call, first in zip(recorded_fits[1:3], (0, 1)):
        assert torch.allclose(call["inputs"], final[first], atol=1e-5)
        assert torch.allclose(call["targets"], dense_states[first + 2], atol=1e-5)


def test_reconstruction_lowers_calibration_error():
    torch.manual_seed(3)
    base = tiny_llama(layers=LAYERS)
    ids = torch.randint(0, 256, (16, 32))
    errors = {}
    for mode in ("lr", "br+gp"):
        _, reports = prune(copy.deepcopy(base), mode, ids, epochs=10, lr=1e-3)
        errors[mode] = reports[-1].calib_rel_error
    assert errors["br+gp"] < 0.7 * errors["lr"]


def test_unknown_mode_is_named():
    with pytest.raises(ConfigError, match="reconstruction.mode='gp' is unknown: choose one of lr, br, br\\+gp"):
        ReconstructionConfig(mode="gp")


def test_unknown_gradient_allreduce_dtype_is_named():
    with pytest.raises(ConfigError, match="reconstruction.gradient_allreduce='float16': choose float32 or bfloat16"):
        ReconstructionConfig(gradient_allreduce="float16")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_reconstruct_on_an_fp32_master_copy(dtype):
    torch.manual_seed(4)
    model = tiny_llama(layers=2).to(dtype)
    ids = torch.randint(0, 256, (16, 32))
    pruner, reports = prune(model, "br", ids, epochs=5, lr=1e-3)
    for name, mask in pruner.masks.items():
        w = weight_of(model.get_submodule(name))
        assert w.dtype == dtype and (w[~mask] == 0).all(), name  # stored back in its own dtype, masks held
    assert all(p.dtype == dtype for p in model.parameters())
    for r in reports:
        loss = r.training[0]["last_epoch_loss"]
        assert loss is not None and loss == loss  # finite (not NaN)
        # BR lowers the block's error against the dense model below what pruning alone left
        assert r.calib_rel_error < r.calib_rel_error_pruned, r.index


def test_pure_fp16_training_is_refused_by_name():
    with pytest.raises(ConfigError, match="reconstruction.precision='16-true' trains in fp16.*bf16-mixed"):
        ReconstructionConfig(mode="br", precision="16-true")


def test_logs_hold_every_step_and_the_epoch_mean_over_rows(tmp_path):
    import csv

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.manual_seed(5)
    model = tiny_llama(layers=1)
    ids = torch.randint(0, 256, (7, 16))  # 7 windows, batch 2: each epoch ends with a batch of one row
    pruner = SequentialPruner(model, PruningConfig(method="wanda"), RuntimeConfig(batch_size=2), "cpu",
                              reconstruction=ReconstructionConfig(mode="br+gp", epochs=3, batch_size=2),
                              log_dir=tmp_path, accelerator="cpu")
    (report,) = pruner.run(ids, progress=False)
    with open(tmp_path / "block_000" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    steps = [(int(r["epoch"]), int(r["step"]), float(r["train_loss_step"])) for r in rows if r["train_loss_step"]]
    assert [(e, s) for e, s, _ in steps] == [(s // 4, s) for s in range(12)]  # global steps across epochs
    epochs = [(int(r["step"]), float(r["train_loss_epoch"])) for r in rows if r["train_loss_epoch"]]
    assert [s for s, _ in epochs] == [3, 7, 11]
    for e, (_, value) in enumerate(epochs):  # each step's loss is its batch's mean: weigh it by its rows
        losses = [loss for epoch, _, loss in steps if epoch == e]
        assert value == pytest.approx(sum(n * loss for n, loss in zip((2, 2, 2, 1), losses)) / 7, rel=1e-6)
    assert report.training[0]["last_epoch_loss"] == pytest.approx(epochs[-1][1], rel=1e-6)
    tb = EventAccumulator(str(next((tmp_path / "block_000" / "tb").glob("events.*"))))
    tb.Reload()
    assert [e.step for e in tb.Scalars("train_loss_step")] == list(range(12))
    assert [e.step for e in tb.Scalars("train_loss_epoch")] == [3, 7, 11]
    # the trained block is left without gradients (the last step's would travel with it to its home)
    assert all(p.grad is None and not p.requires_grad for p in model.model.layers[0].parameters())
