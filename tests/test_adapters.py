"""Every supported family, as a tiny random model built from its transformers config, is pruned end to end."""

import pytest
import torch
import transformers as tf
from transformers import AutoModelForCausalLM

from compressor.config import ConfigError, PruningConfig, RuntimeConfig
from compressor.models.adapters import BLOCK_PATHS, ModelAdapter, check_supported, max_context, weight_of
from compressor.sequential import SequentialPruner

H, L, V = 64, 2, 128
COMMON_DECODER = dict(hidden_size=H, intermediate_size=2 * H, num_hidden_layers=L, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=V, max_position_embeddings=128)

FAMILIES = {
    "llama": lambda: tf.LlamaConfig(**COMMON_DECODER),
    "mistral": lambda: tf.MistralConfig(**COMMON_DECODER),
    "qwen2": lambda: tf.Qwen2Config(**COMMON_DECODER),
    "qwen3": lambda: tf.Qwen3Config(**COMMON_DECODER, head_dim=16),
    "phi3": lambda: tf.Phi3Config(**COMMON_DECODER, pad_token_id=0, bos_token_id=0, eos_token_id=0),
    "gemma": lambda: tf.GemmaConfig(**COMMON_DECODER, head_dim=16),
    "gemma2": lambda: tf.Gemma2Config(**COMMON_DECODER, head_dim=16),
    "gemma3_text": lambda: tf.Gemma3TextConfig(**COMMON_DECODER, head_dim=16),
    "phi": lambda: tf.PhiConfig(hidden_size=H, intermediate_size=2 * H, num_hidden_layers=L, num_attention_heads=4,
                                vocab_size=V, max_position_embeddings=128),
    "opt": lambda: tf.OPTConfig(hidden_size=H, ffn_dim=2 * H, num_hidden_layers=L, num_attention_heads=4,
                                vocab_size=V, max_position_embeddings=128, word_embed_proj_dim=H),
    "bloom": lambda: tf.BloomConfig(hidden_size=H, n_layer=L, n_head=4, vocab_size=V),
    "falcon": lambda: tf.FalconConfig(hidden_size=H, num_hidden_layers=L, num_attention_heads=4, vocab_size=V,
                                      new_decoder_architecture=False, multi_query=True),
    "gpt_neox": lambda: tf.GPTNeoXConfig(hidden_size=H, intermediate_size=2 * H, num_hidden_layers=L,
                                         num_attention_heads=4, vocab_size=V, max_position_embeddings=128),
    "gpt2": lambda: tf.GPT2Config(n_embd=H, n_layer=L, n_head=4, vocab_size=V, n_positions=128, bos_token_id=0, eos_token_id=0),
}


def test_every_supported_family_has_a_test():
    assert set(FAMILIES) == set(BLOCK_PATHS)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("method,pattern", [("sparsegpt", "unstructured"), ("wanda", "2:4")])
def test_family_prunes_end_to_end(family, method, pattern):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(FAMILIES[family]()).eval()
    adapter = ModelAdapter(model)
    assert len(adapter.blocks) == L
    ids = torch.randint(0, V, (4, 32))
    with torch.no_grad():
        dense_logits = model(ids).logits
    pruner = SequentialPruner(model, PruningConfig(method=method, pattern=pattern, sparsity=0.5),
                              RuntimeConfig(batch_size=2), "cpu")
    reports = pruner.run(ids, ids[:2], progress=False)
    linears = list(adapter.iter_linears())
    assert linears and len(pruner.masks) == len(linears)
    for name, module in linears:
        w = weight_of(module)
        assert (w[~pruner.masks[name]] == 0).all(), name
        assert (w == 0).float().mean().item() >= 0.5 - 1e-6, name
    for r in reports:
        assert r.calib_rel_error is not None and 0 < r.calib_rel_error < 10
        assert all(s == pytest.approx(0.5, abs=1e-3) for s in r.sparsity.values())
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all() and not torch.equal(logits, dense_logits)


def test_llama_family_shares_one_hessian_per_distinct_input():
    model = AutoModelForCausalLM.from_config(FAMILIES["llama"]()).eval()
    pruner = SequentialPruner(model, PruningConfig(), RuntimeConfig(), "cpu")
    groups = pruner.run(torch.randint(0, V, (2, 16)), progress=False)[0].shared_inputs
    assert sorted(map(sorted, groups.values())) == [
        ["mlp.down_proj"], ["mlp.gate_proj", "mlp.up_proj"], ["self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"]]


def test_unsupported_family_is_named():
    with pytest.raises(ConfigError, match="'bert' is not supported.*llama"):
        check_supported("bert")


def test_context_limits():
    assert max_context(FAMILIES["gpt2"]()) == 128
    assert max_context(FAMILIES["llama"]()) == 128
    assert max_context(FAMILIES["bloom"]()) is None
