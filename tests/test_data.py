import json

import pytest
import torch

from compressor.config import CalibrationConfig, ConfigError, GenerationConfig
from compressor.data.calibration import calibration_windows, evaluation_windows
from compressor.data.generated import cached_generated, in_language
from compressor.data.text import DataError, consecutive_windows, hub_text, local_text, random_windows, split_counts


def test_random_windows_follow_the_protocol_draw():
    ids = torch.arange(10_000)
    got = random_windows(ids, 5, 100, torch.Generator().manual_seed(0), "x")
    starts = torch.randint(0, 10_000 - 100 - 1, (5,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(got, torch.stack([ids[s : s + 100] for s in starts]))


def test_too_short_source_says_how_many_tokens_it_has():
    with pytest.raises(DataError, match="has 50 tokens: windows of 100 tokens need at least 102"):
        random_windows(torch.arange(50), 1, 100, torch.Generator(), "tiny.txt")


def test_consecutive_windows_drop_the_tail():
    w = consecutive_windows(torch.arange(1050), 100)
    assert w.shape == (10, 100) and w[-1, -1] == 999
    assert consecutive_windows(torch.arange(1050), 100, max_windows=3).shape == (3, 100)


def test_split_counts_keep_the_total():
    assert split_counts(10, [1, 1, 1]) == [4, 3, 3]
    assert sum(split_counts(128, [0.7, 0.3])) == 128


def test_local_files_folders_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("alpha beta")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "gamma"}) + "\n" + json.dumps({"text": "delta"}) + "\n")
    (tmp_path / "skip.bin").write_bytes(b"\x00")
    assert local_text(str(tmp_path / "a.txt")) == "alpha beta"
    assert local_text(str(tmp_path / "b.jsonl")) == "gamma\n\ndelta"
    assert local_text(str(tmp_path)) == "alpha beta\n\ngamma\n\ndelta"
    with pytest.raises(DataError, match="no field 'body'"):
        local_text(str(tmp_path / "b.jsonl"), text_field="body")


def test_hub_dataset_unreachable_gives_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="could not load dataset 'wikitext2'.*local text file"):
        hub_text("wikitext2", "test")


def test_missing_source_file_is_a_config_error():
    with pytest.raises(ConfigError, match="'no/such.txt' is neither a known dataset"):
        CalibrationConfig(sources=["no/such.txt"])


def test_language_filter():
    assert in_language("The history of", "en")
    assert not in_language("日本の歴史", "en")
    assert in_language("日本の歴史", "any")


def test_protocol_calibration_on_real_text(smollm2_tokenizer, shared_data):
    cfg = CalibrationConfig(sources=[str(shared_data / "wikitext-2" / "wiki.valid.tokens")], num_samples=4, seqlen=64)
    windows = calibration_windows(cfg, None, smollm2_tokenizer, "smollm2")
    ids = smollm2_tokenizer(open(cfg.sources[0]).read(), return_tensors="pt").input_ids[0]
    starts = torch.randint(0, ids.numel() - 64 - 1, (4,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(windows, torch.stack([ids[s : s + 64] for s in starts]))


def test_mixture_of_sources(smollm2_tokenizer, shared_data, tmp_path):
    jsonl = tmp_path / "mine.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": "A sentence about pruning models. " * 40}) for _ in range(5)))
    cfg = CalibrationConfig(sources=[str(shared_data / "wikitext-2-raw" / "wiki.test.raw"), str(jsonl)],
                            weights=[3, 1], num_samples=8, seqlen=32)
    windows = calibration_windows(cfg, None, smollm2_tokenizer, "smollm2")
    assert windows.shape == (8, 32)
    pruning_ids = set(smollm2_tokenizer(" pruning").input_ids)
    assert all(set(w.tolist()) & pruning_ids for w in windows[6:])  # the last 2 come from the JSONL


def test_evaluation_windows_of_the_real_test_split(smollm2_tokenizer, shared_data):
    w = evaluation_windows(str(shared_data / "wikitext-2-raw" / "wiki.test.raw"), 2048, smollm2_tokenizer)
    assert w.shape == (301_948 // 2048, 2048)  # the protocol's 147 windows


def test_generated_samples_are_cached_and_reused(smollm2, tmp_path):
    model, tok = smollm2
    cfg = GenerationConfig(batch_size=2, cache_dir=str(tmp_path))
    a = cached_generated(model, tok, "smollm2", 2, 12, cfg, seed=0)
    assert a.shape == (2, 12)
    assert all(in_language(t, "en") for t in tok.batch_decode(a[:, :5]))
    assert len(list(tmp_path.glob("*.pt"))) == 1
    assert torch.equal(cached_generated(model, tok, "smollm2", 2, 12, cfg, seed=0), a)
    (next(tmp_path.glob("*.pt"))).write_bytes(b"half a file")  # a damaged cache is regenerated, not trusted
    assert torch.equal(cached_generated(model, tok, "smollm2", 2, 12, cfg, seed=0), a)


# --- BOS per window (data.calibration.bos / data.evaluation.bos) ---------------------------------------------------

def test_protocol_evaluation_windows_are_unchanged_by_the_bos_setting(smollm2_tokenizer, shared_data):
    # SmolLM2's tokenizer adds no BOS: auto cuts the windows exactly as the classic protocol does
    path = str(shared_data / "wikitext-2-raw" / "wiki.test.raw")
    ids = smollm2_tokenizer(open(path).read(), return_tensors="pt").input_ids[0]
    classic = ids[: (ids.numel() // 2048) * 2048].view(-1, 2048)
    for mode in ("auto", "never"):
        assert torch.equal(evaluation_windows(path, 2048, smollm2_tokenizer, bos=mode), classic)
    cfg = CalibrationConfig(sources=[str(shared_data / "wikitext-2" / "wiki.valid.tokens")], num_samples=4, seqlen=64)
    never = CalibrationConfig(sources=cfg.sources, num_samples=4, seqlen=64, bos="never")
    assert torch.equal(calibration_windows(cfg, None, smollm2_tokenizer, ""),
                       calibration_windows(never, None, smollm2_tokenizer, ""))


def test_windows_start_with_bos_when_the_tokenizer_adds_it(tmp_path):
    from conftest import word_text, word_tokenizer

    tok, text = word_tokenizer(bos=True), word_text()
    (tmp_path / "t.txt").write_text(text)
    body = tok(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    calib = calibration_windows(CalibrationConfig(sources=[str(tmp_path / "t.txt")], num_samples=6, seqlen=32), None,
                                tok, "")
    assert calib.shape == (6, 32) and (calib[:, 0] == tok.bos_token_id).all()
    assert not (calib[:, 1:] == tok.bos_token_id).any()
    starts = torch.randint(0, body.numel() - 31 - 1, (6,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(calib[:, 1:], torch.stack([body[s : s + 31] for s in starts]))
    ev = evaluation_windows(str(tmp_path / "t.txt"), 32, tok)
    assert ev.shape == (body.numel() // 31, 32) and (ev[:, 0] == tok.bos_token_id).all()
    assert torch.equal(ev[:, 1:].flatten(), body[: ev.shape[0] * 31])  # every text token predicted once


def test_bos_never_keeps_the_classic_windows_and_always_adds_it_anyway(tmp_path):
    from conftest import word_text, word_tokenizer

    (tmp_path / "t.txt").write_text(word_text())
    src = str(tmp_path / "t.txt")
    with_bos = word_tokenizer(bos=True)
    ids = with_bos(word_text(), return_tensors="pt").input_ids[0]  # one BOS at the start of the text
    ev = evaluation_windows(src, 32, with_bos, bos="never")
    assert torch.equal(ev, ids[: (ids.numel() // 32) * 32].view(-1, 32))
    calib = calibration_windows(CalibrationConfig(sources=[src], num_samples=4, seqlen=32, bos="never"), None,
                                with_bos, "")
    assert torch.equal(calib, random_windows(ids, 4, 32, torch.Generator().manual_seed(0), src))

    without = word_tokenizer(bos=False)  # has a BOS token but does not add it
    assert torch.equal(evaluation_windows(src, 32, without), evaluation_windows(src, 32, without, bos="never"))
    always = evaluation_windows(src, 32, without, bos="always")
    assert always.shape[1] == 32 and (always[:, 0] == without.bos_token_id).all()
    without.bos_token = None
    with pytest.raises(DataError, match="evaluation.bos='always' but the tokenizer has no BOS token"):
        evaluation_windows(src, 32, without, bos="always")
    with pytest.raises(ConfigError, match="calibration.bos='sometimes' is not valid: choose one of auto, always, never"):
        CalibrationConfig(sources=[src], bos="sometimes")


def test_generated_windows_start_with_bos_when_the_tokenizer_adds_it(tmp_path):
    from conftest import tiny_llama, word_tokenizer

    model, tok = tiny_llama(vocab=1000), word_tokenizer(bos=True)
    gen = GenerationConfig(language="any", batch_size=2, greedy_tokens=2, cache_dir=str(tmp_path))
    cfg = CalibrationConfig(sources=["generated"], num_samples=3, seqlen=12, generation=gen)
    windows = calibration_windows(cfg, model, tok, "tiny")
    assert windows.shape == (3, 12) and (windows[:, 0] == tok.bos_token_id).all()
    plain = calibration_windows(CalibrationConfig(sources=["generated"], num_samples=3, seqlen=12, generation=gen,
                                                  bos="never"), model, tok, "tiny")
    assert plain.shape == (3, 12) and not (plain[:, 0] == tok.bos_token_id).any()
    assert len(list(tmp_path.glob("*.pt"))) == 2  # cached apart
