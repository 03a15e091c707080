"""Resuming an interrupted compression: checkpoints, refusal on changed config, the SIGKILL fault test."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from compressor.config import CalibrationConfig, ConfigError, EvaluationConfig, OutputConfig, PruningConfig
from compressor.pipeline import RunSettings, compress
from conftest import tiny_llama

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(" ".join(f"word{i % 97} and more text {i}" for i in range(3000)))
    return path


def settings(out, text_file, sparsity=0.5):
    return RunSettings(pruning=PruningConfig(method="sparsegpt", sparsity=sparsity),
                       calibration=CalibrationConfig(sources=[str(text_file)], num_samples=4, seqlen=32),
                       evaluation=EvaluationConfig(datasets=[], dense_baseline=False),
                       output=OutputConfig(dir=str(out), plots=False, overwrite=True, keep_checkpoints=True))


def run(out, text_file, tokenizer, sparsity=0.5, seed=0):
    model = tiny_llama(layers=3, vocab=len(tokenizer), seed=seed)
    model.config.model_type = "llama"
    return compress(settings(out, text_file, sparsity), "cpu", progress=False, model_and_tokenizer=(model, tokenizer))


def test_checkpoints_resume_and_skip_finished_blocks(tmp_path, text_file, smollm2_tokenizer, monkeypatch):
    first = run(tmp_path / "a", text_file, smollm2_tokenizer)
    manifest = json.loads((tmp_path / "a" / "checkpoints" / "manifest.json").read_text())
    assert manifest["blocks_done"] == 3 and first["resumed_blocks"] == 0
    masks_before = load_file(tmp_path / "a" / "masks.safetensors")
    # rerun: every block is loaded, none pruned again
    import compressor.sequential as seq

    monkeypatch.setattr(seq, "prune_shared", lambda *a, **k: pytest.fail("a finished block was pruned again"))
    second = run(tmp_path / "a", text_file, smollm2_tokenizer)
    assert second["resumed_blocks"] == 3
    masks_after = load_file(tmp_path / "a" / "masks.safetensors")
    assert masks_after.keys() == masks_before.keys()
    assert all(torch.equal(masks_before[k], v) for k, v in masks_after.items())


def test_resume_with_changed_config_is_refused_naming_the_change(tmp_path, text_file, smollm2_tokenizer):
    run(tmp_path / "a", text_file, smollm2_tokenizer)
    with pytest.raises(ConfigError, match=r"pruning.sparsity: 0.5 -> 0.6.*output.start_over=true"):
        run(tmp_path / "a", text_file, smollm2_tokenizer, sparsity=0.6)


def test_checkpoints_of_an_earlier_version_resume_when_a_new_setting_is_left_at_its_default(tmp_path, text_file,
                                                                                            smollm2_tokenizer):
    """A manifest written before a setting existed (here: without reconstruction.gradient_allreduce) still resumes
    while that setting keeps its default; set otherwise, the change is named."""
    run(tmp_path / "a", text_file, smollm2_tokenizer)
    path = tmp_path / "a" / "checkpoints" / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["config"]["reconstruction"]["gradient_allreduce"]
    manifest["config_hash"] = "written-by-an-earlier-version"
    path.write_text(json.dumps(manifest))
    assert run(tmp_path / "a", text_file, smollm2_tokenizer)["resumed_blocks"] == 3
    path.write_text(json.dumps(manifest))
    from dataclasses import replace

    from compressor.reconstruction.module import ReconstructionConfig

    model = tiny_llama(layers=3, vocab=len(smollm2_tokenizer))
    model.config.model_type = "llama"
    changed = replace(settings(tmp_path / "a", text_file),
                      reconstruction=ReconstructionConfig(gradient_allreduce="bfloat16"))
    with pytest.raises(ConfigError, match=r"reconstruction.gradient_allreduce: None -> 'bfloat16'"):
        compress(changed, "cpu", progress=False, model_and_tokenizer=(model, smollm2_tokenizer))


def test_a_finished_run_of_an_earlier_version_is_still_recognised(tmp_path, text_file):
    """report.json written before a setting existed: the same run (that setting at its default), not another one."""
    from dataclasses import asdict, replace

    from compressor.pipeline import finished_run
    from compressor.reconstruction.module import ReconstructionConfig

    run_settings = settings(tmp_path, text_file)
    old = json.loads(json.dumps(asdict(run_settings), default=str))
    del old["reconstruction"]["gradient_allreduce"]
    (tmp_path / "report.json").write_text(json.dumps({"settings": old, "date": "earlier"}))
    assert finished_run(run_settings, tmp_path)["date"] == "earlier"
    other = replace(run_settings, reconstruction=ReconstructionConfig(gradient_allreduce="bfloat16"),
                    output=OutputConfig(dir=str(tmp_path)))
    with pytest.raises(ConfigError, match=r"reconstruction.gradient_allreduce: None -> 'bfloat16'"):
        finished_run(other, tmp_path)


def test_damaged_checkpoint_is_not_trusted(tmp_path, text_file, smollm2_tokenizer):
    run(tmp_path / "a", text_file, smollm2_tokenizer)
    (tmp_path / "a" / "checkpoints" / "block_001.safetensors").write_bytes(b"torn")
    again = run(tmp_path / "a", text_file, smollm2_tokenizer)
    assert again["resumed_blocks"] == 1  # block 0 loaded; 1 and 2 redone


def test_sigkill_fault_test_small_scale(tmp_path, shared_data, smollm2_tokenizer):
    """A small fault test (bench/fault.py runs 20 kills): 3 kills on 4 blocks, 16 windows, 2 epochs. Its time limit is
    relative to this machine's speed now: a multiple of what one command-line process takes to start (a busy 2-core
    machine is many times slower than a quiet one)."""
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import compressor.cli"], check=True, cwd=ROOT)
    startup = time.perf_counter() - t
    out = tmp_path / "fault.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "fault.py"), "--kills", "3", "--blocks", "4",
                           "--samples", "16", "--epochs", "2", "--workdir", str(tmp_path / "w"), "--out", str(out),
                           "--calib", str(shared_data / "wikitext-2" / "wiki.valid.tokens")],
                          capture_output=True, text=True, timeout=max(300.0, 60 * startup))
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["kills"] == 3 and result["identical"] is True
    assert result["untrustworthy_checkpoints_seen"] == 0


def test_insufficient_disk_space_is_refused(tmp_path, monkeypatch):
    import shutil as sh

    from compressor.config import OutputConfig
    from compressor.pipeline import check_disk_space

    model = tiny_llama(layers=2)
    base = check_disk_space(model, OutputConfig(), tmp_path)
    assert base > 0
    # cross-block windows keep up to three in-window states: a block's weights (fp32) and masks, and GPTQ's Hessians
    block = model.model.layers[0]
    block_bytes = sum(p.numel() * 4 for p in block.parameters())
    mask_bytes = sum(m.weight.numel() for m in block.modules() if isinstance(m, torch.nn.Linear))
    assert check_disk_space(model, OutputConfig(), tmp_path, cross_block=True) == base + 3 * (block_bytes + mask_bytes)
    assert check_disk_space(model, OutputConfig(), tmp_path, cross_block=True, quantized=True) > \
        base + 3 * (block_bytes + mask_bytes)
    monkeypatch.setattr(sh, "disk_usage", lambda p: sh._ntuple_diskusage(10, 10, 0))
    with pytest.raises(ConfigError, match="has 0.00 GB free; the outputs need about"):
        check_disk_space(model, OutputConfig(), tmp_path)


def test_non_finite_activations_stop_before_checkpointing():
    from compressor.sequential import check_finite

    check_finite(0, [torch.ones(2, 3)])
    with pytest.raises(FloatingPointError, match="block 4 produced NaN/Inf activations"):
        check_finite(4, [torch.ones(2, 3), torch.tensor([[float("nan")]])])


@pytest.mark.parametrize("mode,quant,damage", [("br+gp+cr", "none", False), ("br+gp+cr", "gptq", False),
                                             ("br+gp", "gptq", False), ("br+gp+cr", "none", True),
                                             ("lr", "gptq", False)])
def test_interrupted_reconstruction_resumes_bit_identical(tmp_path, text_file, smollm2_tokenizer, monkeypatch, mode,
                                                          quant, damage):
    """Stop after the second block checkpoint (cross-block windows save the next block's in-window state beside
    it); the resumed run's model equals the uninterrupted one's bit for bit, and no block is pruned twice."""
    from compressor.checkpoint import BlockCheckpoints
    from compressor.quant.int4 import QuantizationConfig
    from compressor.reconstruction.module import ReconstructionConfig

    def go(out):
        s = settings(out, text_file)
        s.reconstruction = ReconstructionConfig(mode=mode, epochs=1, batch_size=2)
        s.quantization = QuantizationConfig(method=quant, group_size=32)
        model = tiny_llama(layers=4, vocab=len(smollm2_tokenizer))
        compress(s, "cpu", progress=False, model_and_tokenizer=(model, smollm2_tokenizer))
        return {k: v.clone() for k, v in model.state_dict().items()}

    reference = go(tmp_path / "ref")
    save = BlockCheckpoints.save

    def save_then_stop(self, index, *args, **kwargs):
        save(self, index, *args, **kwargs)
        if index == 1:
            raise KeyboardInterrupt("simulated interruption after block 1 was checkpointed")

    monkeypatch.setattr(BlockCheckpoints, "save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        go(tmp_path / "run")
    monkeypatch.setattr(BlockCheckpoints, "save", save)
    manifest = json.loads((tmp_path / "run" / "checkpoints" / "manifest.json").read_text())
    assert manifest["blocks_done"] == 2
    assert ("pending_report" in manifest["blocks"][-1]) == mode.endswith("cr")
    if mode.endswith("cr"):  # the in-window state lives in its own file, checked like the block files
        pending = tmp_path / "run" / "checkpoints" / manifest["blocks"][-1]["pending_file"]
        assert pending.is_file()
        if damage:  # a torn in-window state: the resume steps back one block and uses the one before
            pending.write_bytes(b"torn")
    import compressor.sequential as seq

    pruned = []
    real_prune, real_joint = seq.prune_shared, seq.sparsegpt_gptq_shared  # without reconstruction GPTQ prunes too
    monkeypatch.setattr(seq, "prune_shared", lambda *a, **k: pruned.extend(a[0]) or real_prune(*a, **k))
    monkeypatch.setattr(seq, "sparsegpt_gptq_shared", lambda *a, **k: pruned.extend(a[0]) or real_joint(*a, **k))
    resumed = go(tmp_path / "run")
    # blocks 0-1 are loaded; with CR block 2 comes back from its in-window state, so only block 3 is pruned
    assert len(pruned) == 7 * (1 if mode.endswith("cr") and not damage else 2)
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)
