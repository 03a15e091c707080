"""CushionCache on tiny random models: the prefix as a KV cache, the greedy search, tuning, saving, validate."""

import json

import pytest
import torch
from conftest import tiny_llama

from compressor.config import CalibrationConfig, ConfigError, EvaluationConfig, ModelConfig, OutputConfig
from compressor.cushion.config import CushionConfig
from compressor.cushion.error import LinearInputError, distinct_linear_inputs, row_error
from compressor.cushion.prefix import (
    behind,
    compute_prefix,
    find_prefix,
    generate,
    load_prefix,
    prefixed_inputs,
    save_prefix,
)
from compressor.cushion.search import candidate_errors, draw_texts, greedy_search, text_error
from compressor.cushion.stage import block_input_outliers, run_cushion
from compressor.cushion.tuning import input_error, tune_prefix
from compressor.evaluation import perplexity

VOCAB = 64


def tiny_tokenizer(vocab: int = VOCAB):
    """A word-level tokenizer over 'w0'..'w<vocab-1>' with a BOS '<s>' (id ``vocab``), built in memory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(vocab)} | {"<s>": vocab, "<unk>": vocab + 1}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", unk_token="<unk>", eos_token="<unk>")


def model_and_tokenizer(seed: int = 0):
    return tiny_llama(layers=2, hidden=64, vocab=VOCAB + 2, seed=seed), tiny_tokenizer()


def saved_tiny_model(tmp_path, words: int = 2000):
    """The tiny model and tokenizer saved as a folder, and a text file of ``words`` random words; (folder, text)."""
    model, tok = model_and_tokenizer()
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    text = tmp_path / "text.txt"
    g = torch.Generator().manual_seed(7)
    text.write_text(" ".join(f"w{i}" for i in torch.randint(0, VOCAB, (words,), generator=g).tolist()))
    return folder, text


def small_cfg(**kw) -> CushionConfig:
    base = dict(method="greedy", text_len=24, candidate_batch=32, max_prefix_len=3, tau=0.999, tuning_texts=8,
                tuning_batch=4)
    return CushionConfig(**{**base, **kw})


def test_bad_cushion_settings_are_named():
    with pytest.raises(ConfigError, match="cushion.method='beam'"):
        CushionConfig(method="beam")
    with pytest.raises(ConfigError, match="cushion.granularity='none'"):
        CushionConfig(granularity="none")
    with pytest.raises(ConfigError, match="cushion.tau=1.5"):
        CushionConfig(tau=1.5)


def test_a_prefix_of_length_zero_changes_nothing():
    model, _ = model_and_tokenizer()
    empty = compute_prefix(model, [])
    windows = torch.randint(0, VOCAB, (3, 16), generator=torch.Generator().manual_seed(1))
    assert len(empty) == 0 and prefixed_inputs(empty, windows) == {"input_ids": windows}
    assert perplexity(model, windows, "cpu", progress=False, prefix=empty) == perplexity(
        model, windows, "cpu", progress=False)


def test_prefix_as_kv_cache_equals_the_same_tokens_run_as_text():
    model, _ = model_and_tokenizer()
    prefix = compute_prefix(model, [VOCAB, 5, 17])
    text = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        cached = model(**prefixed_inputs(prefix, text)).logits
        full = model(input_ids=torch.cat([prefix.token_ids.expand(2, -1), text], 1)).logits[:, 3:]
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)
    # the padded mask path too: a mask over the text is extended by the prefix's ones
    kwargs = prefixed_inputs(prefix, text, torch.ones_like(text))
    assert kwargs["attention_mask"].shape == (2, 15)
    with torch.no_grad():
        torch.testing.assert_close(model(**kwargs).logits, full, atol=1e-5, rtol=1e-5)


def test_plain_calls_behind_a_prefix_run_after_it_and_only_inside_the_block():
    # what lm-evaluation-harness's wrapper does: model(input_ids).logits, nothing else
    model, _ = model_and_tokenizer()
    prefix = compute_prefix(model, [VOCAB, 9])
    text = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(input_ids=torch.cat([prefix.token_ids.expand(2, -1), text], 1)).logits[:, 2:]
        plain = model(text).logits
        with behind(model, prefix):
            hooked = model(text).logits
            masked = model(text, torch.ones_like(text)).logits
        after = model(text).logits
    torch.testing.assert_close(hooked, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(masked, full, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(plain, full, atol=1e-3)
    torch.testing.assert_close(after, plain)  # the hook is gone


def test_ranges_with_a_prefix_see_the_text_positions_only():
    """Static ranges are calibrated with the prefix as a cache: the linears never see the prefix positions."""
    model, _ = model_and_tokenizer()
    owners = distinct_linear_inputs(model)
    prefix = compute_prefix(model, [VOCAB, 9])
    text = torch.randint(0, VOCAB, (1, 10), generator=torch.Generator().manual_seed(3))
    seen, full = {}, {}
    with torch.no_grad(), LinearInputError(owners, on_input=lambda i, n, x: seen.update({(i, n): x.clone()})):
        model(**prefixed_inputs(prefix, text))
    with torch.no_grad(), LinearInputError(owners, on_input=lambda i, n, x: full.update({(i, n): x.clone()})):
        model(input_ids=torch.cat([prefix.token_ids[None], text], 1))
    assert len(seen) == len(owners) == 8  # 2 blocks x (qkv, o, gate/up, down)
    differs = 0
    for key, x in seen.items():
        assert x.shape[1] == 10
        torch.testing.assert_close(x, full[key][:, 2:], atol=1e-5, rtol=1e-5)
        differs += not torch.allclose(x.amax(), full[key].amax())
    assert differs > 0  # the prefix positions would have widened some ranges


def test_row_error_is_per_candidate():
    x = torch.randn(3, 5, 4)
    x[1, 0, 0] = 100.0  # one outlier widens row 1's range only
    e = row_error(x)
    solo = torch.stack([row_error(x[i : i + 1])[0] for i in range(3)])
    torch.testing.assert_close(e, solo)
    assert e[1] > 10 * max(e[0], e[2])


def test_greedy_search_picks_the_token_that_lowers_the_error_most():
    model, tok = model_and_tokenizer()
    cfg = small_cfg(max_prefix_len=2)
    calib = torch.randint(0, VOCAB, (4, 48), generator=torch.Generator().manual_seed(4))
    prefix, steps = greedy_search(model, tok, calib, cfg)
    (step,) = steps
    assert step.candidates == VOCAB + 2 and step.accepted and len(prefix) == 2
    assert prefix.token_ids.tolist() == [VOCAB, step.token]
    # recomputed without the search machinery: every token run as text after BOS, error over the text only
    text = draw_texts(calib, cfg.text_len, cfg.max_prefix_len, cfg.seed)[1]
    owners = distinct_linear_inputs(model)
    brute = []
    for v in range(VOCAB + 2):
        with torch.no_grad(), LinearInputError(owners, skip=2) as err:
            model(input_ids=torch.cat([torch.tensor([VOCAB, v]), text])[None])
        brute.append(float(err.total[0]))
    assert int(torch.tensor(brute).argmin()) == step.token
    assert brute[step.token] == pytest.approx(step.error_best, rel=1e-4)
    assert step.error_best < cfg.tau * step.error_before
    before = text_error(model, owners, compute_prefix(model, [VOCAB]), text[None], cfg)
    assert float(before[0]) == pytest.approx(step.error_before, rel=1e-5)
    # batched candidates equal candidates one at a time
    some = torch.tensor([0, 7, step.token])
    one_by_one = torch.cat([candidate_errors(model, owners, compute_prefix(model, [VOCAB]), text, some[i : i + 1],
                                             cfg) for i in range(3)])
    torch.testing.assert_close(candidate_errors(model, owners, compute_prefix(model, [VOCAB]), text, some, cfg),
                               one_by_one, rtol=1e-4, atol=1e-6)


def test_greedy_search_stops_when_no_token_halves_the_error():
    model, tok = model_and_tokenizer()
    calib = torch.randint(0, VOCAB, (4, 48), generator=torch.Generator().manual_seed(4))
    prefix, steps = greedy_search(model, tok, calib, small_cfg(tau=0.01, max_prefix_len=4))
    assert len(prefix) == 1 and len(steps) == 1 and not steps[0].accepted


def test_round_gradient_choices():
    x = torch.randn(2, 64, 32, requires_grad=True)
    input_error(x, "per_tensor_dynamic", 8, "zero").backward()
    zero = x.grad.clone()
    assert torch.count_nonzero(zero) > x.numel() // 2  # 2 (x - q(x)) / numel: every entry pulled to its grid point
    x.grad = None
    input_error(x, "per_tensor_dynamic", 8, "ste").backward()
    # straight-through with the tensor's own range: only entries clamped at the range's ends keep a gradient
    assert (x.grad.abs() > 1e-3 * zero.abs().max()).sum() < 0.01 * x.numel()
    assert x.grad.norm() < 0.2 * zero.norm()


def test_tuning_changes_the_prefix_and_lowers_its_loss():
    model, tok = model_and_tokenizer()
    calib = torch.randint(0, VOCAB, (4, 48), generator=torch.Generator().manual_seed(5))
    prefix = compute_prefix(model, [VOCAB, 3])
    weights = [p.detach().clone() for p in model.parameters()]
    cfg = small_cfg(method="tuned", lr=3e-2, epochs=3, lambda_q=1.0)
    tuned, info = tune_prefix(model, prefix, draw_texts(calib, cfg.text_len, 8, 0), cfg, accelerator="cpu")
    loss = lambda h: h["ce"] + cfg.lambda_q * h["lq"]  # noqa: E731
    assert loss(info["after"]) < loss(info["before"])
    assert info["steps"] == 6 and not torch.equal(tuned.keys[0], prefix.keys[0])
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))  # the model stays frozen


def test_saved_prefix_reloads(tmp_path):
    model, _ = model_and_tokenizer()
    prefix = compute_prefix(model, [VOCAB, 4, 8])
    path = save_prefix(prefix, tmp_path / "cushion.safetensors")
    back = load_prefix(path)
    assert back.token_ids.tolist() == [VOCAB, 4, 8] and len(back.keys) == 2
    assert all(torch.equal(a, b) for a, b in zip(back.values, prefix.values))
    assert find_prefix(tmp_path).method == "greedy" and find_prefix(tmp_path / "nowhere") is None


def test_generate_after_the_prefix_equals_generating_after_its_tokens():
    model, tok = model_and_tokenizer()
    prefix = compute_prefix(model, [VOCAB, 11])
    cached = generate(model, tok, "w1 w2 w3", prefix, max_new_tokens=5, do_sample=False)
    ids = torch.tensor([[VOCAB, 11, 1, 2, 3]])
    plain = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                           pad_token_id=VOCAB + 1)
    assert cached == tok.batch_decode(plain[:, 5:], skip_special_tokens=True)


def test_stage_measures_outliers_and_writes_the_prefix(tmp_path):
    model, tok = model_and_tokenizer()
    calib = torch.randint(0, VOCAB, (4, 48), generator=torch.Generator().manual_seed(6))
    prefix, section = run_cushion(model, tok, calib, small_cfg(), tmp_path, "cpu")
    assert section["prefix_len"] == len(prefix) >= 2
    assert len(section["outliers"]["with"]) == 2 and section["search"]["seconds_per_step"] > 0
    assert (tmp_path / "cushion.safetensors").is_file() and (tmp_path / "cushion_outliers.png").is_file()
    stats = block_input_outliers(model, draw_texts(calib, 24, 8, 2), prefix)
    assert stats[-1]["max_to_median"] == pytest.approx(section["last_block_max_to_median"]["with"], rel=1e-5)
    # a rerun resumes from the search checkpoint instead of searching again
    again, section2 = run_cushion(model, tok, calib, small_cfg(), tmp_path, "cpu")
    assert again.token_ids.tolist() == prefix.token_ids.tolist() and section2["search"] == section["search"]
    base, info = run_cushion(model, tok, calib, small_cfg(method="outlier_tokens"), tmp_path / "o", "cpu")
    assert base.token_ids[0] == VOCAB and "outlier_positions_per_text" in info["outlier_tokens"]


def test_run_with_cushion_and_static_w8a8_saves_both_and_validate_reproduces_the_perplexity(tmp_path):
    from compressor.config import PruningConfig
    from compressor.pipeline import RunSettings, compress, validate
    from compressor.quant.activations import ActivationQuantConfig

    folder, text = saved_tiny_model(tmp_path)
    model_cfg = ModelConfig(name_or_path=str(folder))
    calibration = CalibrationConfig(sources=[str(text)], num_samples=4, seqlen=48)
    evaluation = EvaluationConfig(datasets=[str(text)], heldout_samples=0, max_windows=4)
    out = tmp_path / "run"
    settings = RunSettings(model=model_cfg, pruning=PruningConfig(method="magnitude", sparsity=0.3),
                           calibration=calibration, evaluation=evaluation,
                           output=OutputConfig(dir=str(out), plots=False, keep_checkpoints=True, overwrite=True),
                           cushion=small_cfg(),
                           activations=ActivationQuantConfig(granularity="per_tensor_static"))
    report = compress(settings, "cpu", progress=False)
    assert report["stages"] == ["prune", "cushion", "activations"]
    assert report["cushion"]["prefix_len"] >= 2 and not report["cushion"]["resumed"]
    assert (out / "model" / "cushion.safetensors").is_file() and (out / "model" / "activations.safetensors").is_file()
    validated = validate(ModelConfig(name_or_path=str(out / "model")), evaluation, calibration,
                         str(out), "cpu", progress=False)
    assert validated["cushion_prefix_len"] == report["cushion"]["prefix_len"]
    (corpus, ppl), = validated["perplexity"].items()
    assert ppl == pytest.approx(report["perplexity"]["compressed"][corpus], rel=1e-5)
    assert json.loads((out / "report.json").read_text())["cushion"]["tokens"][0] == "<s>"
    # an unchanged run redone (overwrite, checkpoints kept) loads the finished cushion stage instead of searching
    again = compress(settings, "cpu", progress=False)
    assert again["cushion"]["resumed"] and again["cushion"]["token_ids"] == report["cushion"]["token_ids"]
    assert again["perplexity"]["compressed"][corpus] == pytest.approx(ppl, rel=1e-5)


def test_static_w8a8_ranges_calibrated_after_a_prefix_ignore_its_positions():
    from compressor.quant.activations import ActivationQuantConfig, range_params
    from compressor.quant.w8a8 import calibrate

    model, _ = model_and_tokenizer()
    prefix = compute_prefix(model, [VOCAB, 9])
    windows = torch.randint(0, VOCAB, (5, 10), generator=torch.Generator().manual_seed(8))
    full = {}
    owners = [(i, n, m) for i, n, m in distinct_linear_inputs(model) if i == 0]  # block 0: before any quantizer

    def grab(i, name, x):
        full.setdefault(name, []).append(x.clone())

    with torch.no_grad(), LinearInputError(owners, on_input=grab):
        model(input_ids=torch.cat([prefix.token_ids.expand(5, -1), windows], 1))
    state = calibrate(model, windows, ActivationQuantConfig(granularity="per_tensor_static", weight_bits=0),
                      torch.device("cpu"), batch_size=3, prefix=prefix)  # batches of 3 and 2
    differs = 0
    for name, (x,) in full.items():
        q = state.inputs[f"model.layers.0.{name}"]
        text_only = range_params(x[:, 2:].min(), x[:, 2:].max())
        torch.testing.assert_close(q.scale, text_only[0], rtol=1e-5, atol=0)
        differs += not torch.allclose(q.scale, range_params(x.min(), x.max())[0], rtol=1e-5, atol=0)
    assert differs > 0  # with the prefix positions counted, some range would be wider


def test_on_smollm2_a_bos_prefix_removes_the_attention_sink_outlier(smollm2, shared_data):
    """The premise on the real model: without a prefix each window's first token is the attention sink, with
    activations thousands of times the median from block 12 on; behind a BOS prefix the text has none."""
    from compressor.data.text import source_text, tokenize

    model, tok = smollm2
    ids = tokenize(tok, source_text(str(shared_data / "wikitext-2" / "wiki.valid.tokens"), "train", "text"))
    texts = torch.stack([ids[5000:5128], ids[90000:90128]])
    without = block_input_outliers(model, texts)
    behind = block_input_outliers(model, texts, compute_prefix(model, [tok.bos_token_id]))
    assert without[-1]["max_to_median"] > 10 * behind[-1]["max_to_median"]
    assert max(s["max_to_median"] for s in without[12:]) > 5000 > 100 > max(s["max_to_median"] for s in behind[12:])
    owners = distinct_linear_inputs(model)
    cfg = CushionConfig(text_len=128)
    assert text_error(model, owners, compute_prefix(model, [tok.bos_token_id]), texts[:1], cfg) < 0.5 * text_error(
        model, owners, None, texts[:1], cfg)


def test_prune_moe_cushion_and_w8a8_in_one_run_and_validate_reproduces_it(tmp_path):
    # the MoE FFN's linears see the input's own [batch, seq, d] shape, so the cushion's per-row errors and the
    # W8A8 quantizers hooked on them work on a converted model too
    from compressor.config import PruningConfig
    from compressor.moe.config import MoEConfig
    from compressor.pipeline import RunSettings, compress, validate
    from compressor.quant.activations import ActivationQuantConfig

    folder, text = saved_tiny_model(tmp_path, 3000)
    calibration = CalibrationConfig(sources=[str(text)], num_samples=8, seqlen=48)
    evaluation = EvaluationConfig(datasets=[str(text)], heldout_samples=0, max_windows=4)
    out = tmp_path / "run"
    settings = RunSettings(model=ModelConfig(name_or_path=str(folder)),
                           pruning=PruningConfig(method="sparsegpt", sparsity=0.3), calibration=calibration,
                           evaluation=evaluation, output=OutputConfig(dir=str(out), plots=False),
                           moe=MoEConfig(enabled=True, experts=8, k=6, epochs=2, batch_size=32, router_tokens=0),
                           cushion=small_cfg(), activations=ActivationQuantConfig(granularity="per_tensor_static"))
    report = compress(settings, "cpu", progress=False)
    assert report["stages"] == ["prune", "moe", "cushion", "activations"]
    assert report["cushion"]["prefix_len"] >= 2 and report["activations"]["quantized_layers"] == 14
    validated = validate(ModelConfig(name_or_path=str(out / "model")), evaluation, calibration, str(out), "cpu",
                         progress=False)
    assert validated["moe"] is not None and validated["activations"] == "per_tensor_static"
    assert validated["cushion_prefix_len"] == report["cushion"]["prefix_len"]
    (corpus, ppl), = validated["perplexity"].items()
    assert ppl == pytest.approx(report["perplexity"]["compressed"][corpus], rel=1e-5)


def test_a_search_text_longer_than_the_windows_is_refused_before_the_model_loads(tmp_path):
    from compressor.pipeline import RunSettings, compress

    folder, text = saved_tiny_model(tmp_path, 300)
    settings = RunSettings(model=ModelConfig(name_or_path=str(folder)),
                           calibration=CalibrationConfig(sources=[str(text)], num_samples=2, seqlen=32),
                           output=OutputConfig(dir=str(tmp_path / "run")), cushion=small_cfg(text_len=64))
    with pytest.raises(ConfigError, match=r"model.cushion.text_len=64 is longer than the calibration windows "
                                          r"\(data.calibration.seqlen=32\): set model.cushion.text_len to at most 32"):
        compress(settings, "cpu", progress=False)
    assert not (tmp_path / "run" / "report.json").exists()


def test_an_interrupted_run_without_a_prune_stage_does_not_count_blocks(tmp_path):
    from compressor.runlog import RunInterrupted

    line = RunInterrupted(0, None, tmp_path / "checkpoints").line("python cli.py fit --config c.yaml")
    assert line == (f"interrupted: finished steps are checkpointed in {tmp_path / 'checkpoints'}; resume with: "
                    "python cli.py fit --config c.yaml")
    assert "before anything was checkpointed" in RunInterrupted(0, None, None).line("x")
