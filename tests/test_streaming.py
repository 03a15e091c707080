"""Layer streaming: blocks kept on disk or created at their turn give the same pruning as blocks in memory."""

import copy

import pytest
import torch

from compressor.config import PruningConfig, RuntimeConfig
from compressor.models.adapters import ModelAdapter
from compressor.pruning.sparsegpt import sparsegpt_prune, sparsegpt_prune_shared
from compressor.sequential import SequentialPruner
from compressor.streaming import DiskHome, RandomHome, block_tensors, is_resident
from conftest import tiny_llama

CALIB = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))


def prune(model, homes=None, keep_masks=True, pattern="unstructured"):
    pruner = SequentialPruner(model, PruningConfig(method="sparsegpt", sparsity=0.5, pattern=pattern),
                              RuntimeConfig(batch_size=2, track_error=False), torch.device("cpu"),
                              homes=homes, keep_masks=keep_masks)
    return pruner, pruner.run(CALIB, progress=False)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_blocks_streamed_from_disk_prune_like_blocks_in_memory(tmp_path, pattern):
    reference = tiny_llama(layers=3)
    streamed = copy.deepcopy(reference)
    ref_pruner, _ = prune(reference, pattern=pattern)

    home = DiskHome(tmp_path / "blocks")
    blocks = ModelAdapter(streamed).blocks
    for i, block in enumerate(blocks):
        home.offload(i, block)
    assert not any(is_resident(b) for b in blocks)  # nothing of the blocks in memory before the run
    pruner, _ = prune(streamed, homes=home, pattern=pattern)
    assert not any(is_resident(b) for b in blocks)  # and nothing after it: the pruned blocks are on disk

    for i, block in enumerate(blocks):
        home.fetch(i, block, torch.device("cpu"))
    for (name, a), (_, b) in zip(reference.state_dict().items(), streamed.state_dict().items()):
        assert torch.equal(a, b), name
    assert ref_pruner.masks.keys() == pruner.masks.keys()
    assert all(torch.equal(ref_pruner.masks[k], pruner.masks[k]) for k in pruner.masks)


def test_random_blocks_are_made_at_their_turn_written_once_and_reproducible(tmp_path):
    def run(folder):
        model = tiny_llama(layers=3)
        blocks = ModelAdapter(model).blocks
        for b in blocks:
            b.to("meta")
        pruner, reports = prune(model, homes=RandomHome(folder, seed=3), keep_masks=False)
        assert not pruner.masks  # finished blocks' masks are not kept: host memory does not grow
        assert not any(is_resident(b) for b in blocks)
        return reports

    reports = run(tmp_path / "a")
    run(tmp_path / "b")
    for i in range(3):
        a = DiskHome(tmp_path / "a")
        block = ModelAdapter(tiny_llama(layers=3)).blocks[i].to("meta")
        a.fetch(i, block, torch.device("cpu"))
        again = ModelAdapter(tiny_llama(layers=3)).blocks[i].to("meta")
        DiskHome(tmp_path / "b").fetch(i, again, torch.device("cpu"))
        for (name, x), (_, y) in zip(block_tensors(block).items(), block_tensors(again).items()):
            assert torch.equal(x, y), name
        # half of every linear is zero, norms are ones: the random block was made, pruned, then written
        assert all(abs(s - 0.5) < 0.01 for s in reports[i].sparsity.values())
        assert float((block.self_attn.q_proj.weight == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
        assert torch.equal(block.input_layernorm.weight, torch.ones_like(block.input_layernorm.weight))


def test_shared_input_layers_pruned_together_equal_one_by_one():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 48, generator=g)
    h = 2 * x.t() @ x / 512
    ws = [torch.randn(rows, 48, generator=g, dtype=torch.float64) for rows in (16, 8, 8)]
    together = sparsegpt_prune_shared(ws, h, [0.5, 0.3, 0.7], blocksize=16)
    for w, s, (new_w, mask) in zip(ws, [0.5, 0.3, 0.7], together):
        alone_w, alone_mask = sparsegpt_prune(w, h, s, blocksize=16)
        assert torch.equal(mask, alone_mask)
        assert torch.allclose(new_w, alone_w, atol=1e-10)
        assert float(1 - mask.double().mean()) == pytest.approx(s, abs=1 / 16)
