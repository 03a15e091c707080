"""Every block runs as the model runs it: its own mask (sliding or full) and rotary table (local or global), for the
driver's streams, reconstruction and the schedule's dense pass."""

import copy

import pytest
import torch
import transformers as tf
from transformers import AutoModelForCausalLM

import compressor.sequential as sequential
from compressor.config import PruningConfig, RuntimeConfig
from compressor.engine import advance, capture_block_inputs, run_block
from compressor.models.adapters import BLOCK_PATHS, ModelAdapter
from compressor.reconstruction.module import BlockReconstruction, ReconstructionConfig
from compressor.schedule.allocate import ScheduleConfig
from compressor.schedule.schedule import dense_estimates
from compressor.streaming import DiskHome
from test_adapters import FAMILIES

WINDOW, SEQLEN = 8, 24  # sequences longer than the sliding window
MIXED_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=128, max_position_embeddings=128)
# configs whose layers differ (or all slide): per-layer masks, and for Gemma-3 per-layer rotary tables
MIXED = {
    "gemma2-alternating": lambda: tf.Gemma2Config(**MIXED_COMMON, head_dim=16, sliding_window=WINDOW),
    "gemma3_text-local-global": lambda: tf.Gemma3TextConfig(
        **MIXED_COMMON, head_dim=16, sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    "qwen2-sliding-above-1": lambda: tf.Qwen2Config(**MIXED_COMMON, use_sliding_window=True, sliding_window=WINDOW,
                                                    max_window_layers=1),
    "qwen3-sliding-above-2": lambda: tf.Qwen3Config(**MIXED_COMMON, head_dim=16, use_sliding_window=True,
                                                    sliding_window=WINDOW, max_window_layers=2),
    "mistral-sliding": lambda: tf.MistralConfig(**MIXED_COMMON, sliding_window=WINDOW),
    "phi3-sliding": lambda: tf.Phi3Config(**MIXED_COMMON, sliding_window=WINDOW, pad_token_id=0, bos_token_id=0,
                                          eos_token_id=0),
}
CONFIGS = {**FAMILIES, **MIXED}


def build(name: str):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(CONFIGS[name]()).eval()


def ids(n: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (n, SEQLEN), generator=torch.Generator().manual_seed(seed))


def block_outputs(model, tokens: torch.Tensor) -> list[torch.Tensor]:
    """The model's own output of every block: ``output_hidden_states`` for all but the last block, whose entry
    usually has the final norm applied; the last block's own output is taken by a hook on it."""
    blocks = ModelAdapter(model).blocks
    last = []
    handle = blocks[-1].register_forward_hook(lambda m, a, out: last.append(out[0] if isinstance(out, tuple) else out))
    try:
        with torch.no_grad():
            hidden = model(input_ids=tokens, output_hidden_states=True, use_cache=False).hidden_states
    finally:
        handle.remove()
    return list(hidden[1:len(blocks)]) + [last[0]]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_every_supported_family_and_the_mixed_ones_are_covered():
    assert set(BLOCK_PATHS) <= set(CONFIGS)
    for name in ("gemma2-alternating", "gemma3_text-local-global", "qwen2-sliding-above-1", "qwen3-sliding-above-2"):
        assert len(set(CONFIGS[name]().layer_types)) == 2, name


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_dense_stream_equals_the_models_own_hidden_states_after_every_block(name):
    model = build(name)
    adapter = ModelAdapter(model)
    tokens = ids()
    reference = block_outputs(model, tokens)
    # batch 4 then a remainder of 2: the smaller batch reuses the larger one's arguments, cut to size
    stream = capture_block_inputs(model, adapter, tokens, 4, "cpu", "cpu")
    assert [tuple(b.shape[:2]) for b in stream.batches] == [(4, SEQLEN), (2, SEQLEN)]
    for i, block in enumerate(adapter.blocks):
        advance(block, stream, "cpu")
        assert relative(torch.cat(stream.batches), reference[i]) < 1e-5, f"block {i}"


def test_blocks_of_one_layer_type_share_their_mask_tensor():
    model = build("gemma3_text-local-global")
    adapter = ModelAdapter(model)
    stream = capture_block_inputs(model, adapter, ids(4), 4, "cpu", "cpu")
    masks = [stream.kwargs.of(b, (4, SEQLEN))["attention_mask"] for b in adapter.blocks]
    rotary = [stream.kwargs.of(b, (4, SEQLEN))["position_embeddings"][0] for b in adapter.blocks]
    assert masks[0] is masks[2] and rotary[0] is rotary[2]  # the two sliding layers: one tensor each
    assert masks[0] is not None and masks[1] is not masks[0]  # full attention: causal only (None under SDPA)
    assert not torch.equal(rotary[0], rotary[1])  # local vs global rotary theta


def test_capture_needs_no_block_weights_on_the_device(tmp_path):
    model = build("gemma2-alternating")
    adapter = ModelAdapter(model)
    tokens = ids(4)
    reference = block_outputs(model, tokens)
    home = DiskHome(tmp_path)
    for i, block in enumerate(adapter.blocks):
        home.offload(i, block)  # weights on disk, the module on the meta device
    stream = capture_block_inputs(model, adapter, tokens, 4, "cpu", "cpu")
    for i, block in enumerate(adapter.blocks):
        home.fetch(i, block, torch.device("cpu"))
        advance(block, stream, "cpu")
        home.release(i, block)
        assert relative(stream.batches[0], reference[i]) < 1e-5, f"block {i}"


def test_a_copy_of_a_block_is_refused_by_name():
    model = build("llama")
    adapter = ModelAdapter(model)
    stream = capture_block_inputs(model, adapter, ids(2), 2, "cpu", "cpu")
    with pytest.raises(KeyError, match="not one of the decoder blocks"):
        run_block(copy.deepcopy(adapter.blocks[0]), stream, "cpu")


def test_reconstruction_windows_run_each_block_with_its_own_inputs():
    """A window's forward (what BR/GP/CR train) equals the model's own blocks, across sliding and full layers."""
    model = build("gemma3_text-local-global")
    adapter = ModelAdapter(model)
    tokens = ids(4)
    reference = block_outputs(model, tokens)
    stream = capture_block_inputs(model, adapter, tokens, 4, "cpu", "cpu")
    blocks = adapter.blocks
    cfg = ReconstructionConfig(mode="br+gp+cr")
    with torch.no_grad():
        one = BlockReconstruction([blocks[0]], [], stream.kwargs, cfg, 1)(stream.batches[0])
        assert relative(one, reference[0]) < 1e-5
        window = BlockReconstruction([blocks[1], blocks[2]], [], stream.kwargs, cfg, 1)(one)
        assert relative(window, reference[2]) < 1e-5


def test_global_reconstruction_targets_are_the_models_own_hidden_states(monkeypatch):
    model = build("gemma2-alternating")
    tokens = ids(4)
    reference = block_outputs(model, tokens)
    targets = []
    real = sequential.fit_window

    def spy(blocks, masked, kwargs, inputs, tgt, *args, **kw):
        targets.append(torch.cat(tgt).clone())
        return real(blocks, masked, kwargs, inputs, tgt, *args, **kw)

    monkeypatch.setattr(sequential, "fit_window", spy)
    pruner = sequential.SequentialPruner(model, PruningConfig(), RuntimeConfig(batch_size=4), "cpu",
                                         reconstruction=ReconstructionConfig(mode="br+gp", epochs=1, batch_size=4),
                                         accelerator="cpu")
    pruner.run(tokens, progress=False)
    assert len(targets) == 3
    for i, t in enumerate(targets):
        assert relative(t, reference[i]) < 1e-5, f"block {i}"


def test_schedule_dense_pass_walks_the_models_own_hidden_states():
    model = build("qwen2-sliding-above-1")
    tokens = ids(4)
    with torch.no_grad():
        hidden = model(input_ids=tokens, output_hidden_states=True, use_cache=False).hidden_states
    adapter = ModelAdapter(model)
    est = dense_estimates(model, tokens, lambda b: {"mlp.down_proj": b.mlp.down_proj}, ScheduleConfig(), 0.01, 4,
                          torch.device("cpu"), torch.device("cpu"), progress=False)
    for i in range(len(adapter.blocks)):
        expected = hidden[i].float().square().sum().item() / (tokens.numel())
        assert est[f"{adapter.block_path}.{i}.mlp.down_proj"].input_energy == pytest.approx(expected, rel=1e-5)
