"""G-MoEfication (compressor.moe): experts, the converted FFN's two forwards, routers, files, the run's step."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM
from conftest import word_tokenizer
from test_adapters import FAMILIES

from compressor.config import ConfigError
from compressor.evaluation import perplexity
from compressor.models.adapters import ModelAdapter
from compressor.moe import MoEConfig, attach_moe, save_moe, set_moe
from compressor.moe.convert import check_model, convert_model, split_rows
from compressor.moe.ffn import FFN_SPECS, activation, ffn_module, ffn_spec
from compressor.moe.module import MoEFFN
from compressor.moe.split import balanced_split
from compressor.moe.stats import expert_targets, target_recall

FFN_FAMILIES = ["llama", "phi3", "gemma", "phi", "gpt2", "falcon", "gpt_neox", "bloom"]


def tiny(family: str, seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(FAMILIES[family]()).eval()


def converted_ffn(family: str, experts: int, k: int, variant: str = "mean", mu=None):
    """Block 0's FFN of a tiny ``family`` model as a MoEFFN with a random router, and the dense FFN."""
    model = tiny(family)
    spec = ffn_spec(model.config.model_type)
    ffn = ffn_module(ModelAdapter(model).blocks[0], spec)
    rows = split_rows(ffn, spec)
    assignment, centroids = balanced_split(rows, experts, seed=0)
    d_ff, d = rows.shape
    mu = torch.randn(d_ff) if mu is None else mu
    gen = torch.Generator().manual_seed(1)
    moe = MoEFFN(ffn, spec, assignment, mu, torch.randn(experts, d, generator=gen),
                 torch.randn(experts, experts, generator=gen), k, variant)
    return ffn, moe, spec


def run_ffn(module, spec, x):
    return module(x, torch.zeros_like(x)) if spec.residual else module(x)


def test_every_ffn_family_is_covered():
    assert set(FFN_SPECS) == set(FAMILIES) - {"opt"}
    with pytest.raises(ConfigError, match="'opt' has no FFN adapter"):
        check_model(tiny("opt"), MoEConfig())


def test_balanced_split_gives_equal_experts_covering_every_neuron_once():
    w = torch.randn(96, 16, generator=torch.Generator().manual_seed(0))
    assignment, centroids = balanced_split(w, 8, seed=3)
    assert assignment.shape == (96,) and centroids.shape == (8, 16)
    assert torch.bincount(assignment, minlength=8).tolist() == [12] * 8
    assert torch.equal(assignment, balanced_split(w, 8, seed=3)[0])  # seeded
    # each centroid is the mean of its expert's normalised rows
    normed = torch.nn.functional.normalize(w, dim=1)
    assert torch.allclose(centroids[assignment[0]], normed[assignment == assignment[0]].mean(0), atol=1e-5)


def test_clustering_groups_similar_rows():
    base = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
    w = base.repeat_interleave(6, 0) + 0.01 * torch.randn(24, 32, generator=torch.Generator().manual_seed(1))
    assignment, _ = balanced_split(w, 4, seed=0)
    assert all(len(set(assignment[6 * i:6 * i + 6].tolist())) == 1 for i in range(4))


def test_experts_must_divide_the_ffn_width_named():
    with pytest.raises(ConfigError, match=r"experts=5 does not divide the FFN width 128 of model.layers.0.mlp.down_pr"):
        check_model(tiny("llama"), MoEConfig(experts=5, k=2))


@pytest.mark.parametrize("kwargs,message", [
    ({"variant": "max"}, "moe.variant='max' is unknown"),
    ({"k": 65}, "moe.k=65 in [1, experts]"),
    ({"holdout": 1.0}, "moe.holdout=1.0 must be in (0, 1)"),
    ({"router_tokens": 100}, "moe.router_tokens=100"),
    ({"lr": 0.0}, "lr (0.0) > 0"),
])
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ConfigError) as info:
        MoEConfig(**kwargs)
    assert message in str(info.value)


@pytest.mark.parametrize("family", FFN_FAMILIES)
def test_all_experts_selected_equals_the_dense_ffn(family):
    ffn, moe, spec = converted_ffn(family, experts=16, k=16)
    x = torch.randn(3, 5, ffn_module_width(ffn, spec))
    with torch.no_grad():
        dense = run_ffn(ffn, spec, x)
        for expert_compute in (False, True):
            moe.expert_compute = expert_compute
            assert torch.allclose(run_ffn(moe, spec, x), dense, atol=1e-5, rtol=1e-5), expert_compute


def ffn_module_width(ffn, spec):
    from compressor.moe.ffn import neuron_weights

    return neuron_weights(ffn, spec).w_in.shape[1]


@pytest.mark.parametrize("family", ["llama", "gpt2", "bloom"])
def test_mean_replacement_equals_dense_when_unselected_neurons_sit_at_their_mean(family):
    ffn, _, spec = converted_ffn(family, experts=8, k=2)
    x = torch.randn(1, ffn_module_width(ffn, spec))
    with torch.no_grad():
        a = activation(ffn, spec, x)[0]  # the token's own activation taken as every neuron's mean
        _, moe, _ = converted_ffn(family, experts=8, k=2, mu=a)
        dense = run_ffn(ffn, spec, x)
        for expert_compute in (False, True):
            moe.expert_compute = expert_compute
            assert torch.allclose(run_ffn(moe, spec, x), dense, atol=1e-5), expert_compute
        moe.variant = "zero"  # zero-out does not have this property
        assert not torch.allclose(run_ffn(moe, spec, x), dense, atol=1e-3)


@pytest.mark.parametrize("family", FFN_FAMILIES)
@pytest.mark.parametrize("variant", ["mean", "zero", "random"])
def test_expert_compute_equals_the_masked_form(family, variant):
    ffn, moe, spec = converted_ffn(family, experts=32, k=9, variant=variant)  # 4 neurons per expert: padded to 8
    x = torch.randn(2, 7, ffn_module_width(ffn, spec))
    with torch.no_grad():
        moe.reset_random()
        masked = run_ffn(moe, spec, x)
        moe.expert_compute = True
        moe.reset_random()
        experts = run_ffn(moe, spec, x)
        assert torch.allclose(experts, masked, atol=1e-5, rtol=1e-4)
        if variant != "random":
            assert not torch.allclose(masked, run_ffn(ffn, spec, x), atol=1e-3)  # k < E changes the output


def test_targets_and_recall():
    a = torch.tensor([[1.0, 1.0, 5.0, 5.0], [3.0, 3.0, 1.0, 1.0]])
    mu = torch.ones(4)
    s = expert_targets(a, mu, torch.tensor([0, 0, 1, 1]), 2)
    assert torch.equal(s, torch.tensor([[0.0, 32.0], [8.0, 0.0]]))
    assert target_recall(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), s, 0.5) == 1.0
    assert target_recall(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), s, 0.5) == 0.0


def test_router_training_lowers_the_loss_and_beats_chance():
    model = tiny("llama", seed=1)
    ids = torch.randint(0, 128, (8, 64), generator=torch.Generator().manual_seed(0))
    cfg = MoEConfig(enabled=True, experts=8, k=4, epochs=12, lr=0.05, batch_size=64, router_tokens=0)
    reports = convert_model(model, ids, cfg, "cpu")
    chance = math.ceil(cfg.recall_top * cfg.experts) / cfg.experts
    for r in reports:
        info = r["router"]
        assert info["losses"][-1] < info["losses"][0]
        assert info["recall"] > info["recall_init"] and info["recall"] > chance + 0.03
    assert all(isinstance(m, MoEFFN) for m in (ffn_module(b, ffn_spec("llama")) for b in ModelAdapter(model).blocks))


def test_save_load_gives_the_same_perplexity(tmp_path):
    model = tiny("llama")
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    convert_model(model, ids, MoEConfig(enabled=True, experts=8, k=3, epochs=2, batch_size=32, router_tokens=0), "cpu")
    ppl = perplexity(model, ids, "cpu", progress=False)
    model.save_pretrained(tmp_path / "model")
    save_moe(model, tmp_path / "moe.safetensors")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()  # a plain dense model
    dense_ppl = perplexity(loaded, ids, "cpu", progress=False)
    meta = attach_moe(loaded, tmp_path / "moe.safetensors")
    assert meta["k"] == 3 and meta["experts"] == 8
    assert perplexity(loaded, ids, "cpu", progress=False) == pytest.approx(ppl, rel=1e-6)
    assert dense_ppl != pytest.approx(ppl, rel=1e-4)
    set_moe(loaded, k=8)  # all experts: the dense model again
    assert perplexity(loaded, ids, "cpu", progress=False) == pytest.approx(dense_ppl, rel=1e-5)


def test_fit_converts_after_pruning_and_validate_reproduces_it(shared_data, smollm2_tokenizer, tmp_path):
    """The run's MoE step (pipeline.compress) on a tiny Llama with SmolLM2's tokenizer; validate on the output."""
    import json

    from transformers import LlamaConfig

    from compressor.config import CalibrationConfig, EvaluationConfig, OutputConfig, PruningConfig
    from compressor.pipeline import RunSettings, compress, validate

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(smollm2_tokenizer), max_position_embeddings=256)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    wiki = [str(shared_data / "wikitext-2" / "wiki.valid.tokens")]
    test = [str(shared_data / "wikitext-2-raw" / "wiki.test.raw")]
    out = tmp_path / "run"
    model.save_pretrained(tmp_path / "src")  # the run needs a model on disk only for its up-front checks
    smollm2_tokenizer.save_pretrained(tmp_path / "src")
    from compressor.config import ModelConfig

    settings = RunSettings(
        model=ModelConfig(name_or_path=str(tmp_path / "src")),
        pruning=PruningConfig(method="wanda", sparsity=0.5),
        calibration=CalibrationConfig(sources=wiki, num_samples=4, seqlen=64),
        evaluation=EvaluationConfig(datasets=test, max_windows=2, heldout_samples=0),
        output=OutputConfig(dir=str(out), checkpoint=False, plots=False),
        moe=MoEConfig(enabled=True, experts=8, k=4, epochs=2, batch_size=32, router_tokens=0))
    report = compress(settings, progress=False, model_and_tokenizer=(model, smollm2_tokenizer))
    section = report["moe"]
    assert section["k"] == 4 and len(section["blocks"]) == 2
    assert section["ffn_flops_fraction"] > 0.5 and (out / "moe.safetensors").is_file()
    validated = validate(ModelConfig(name_or_path=str(out / "model")), settings.evaluation, settings.calibration,
                         str(out), progress=False)
    assert validated["moe"]["k"] == 4
    (corpus, ppl), = validated["perplexity"].items()
    assert ppl == pytest.approx(report["perplexity"]["compressed"][corpus], rel=1e-5)
    assert json.loads((out / "validate.json").read_text())["moe"]["experts"] == 8
    from compressor.moe import generate, load_moe

    loaded, _, meta = load_moe(out, k=8)  # all experts: the pruned model itself
    assert meta["k"] == 8 and isinstance(ffn_module(ModelAdapter(loaded).blocks[1], ffn_spec("llama")), MoEFFN)
    text = generate(out, "The tower is", max_new_tokens=4, expert_compute=True)
    assert isinstance(text, str)


@pytest.mark.parametrize("args,message", [
    (["--model.moe.enabled", "true", "--model.moe.experts", "7", "--model.moe.k", "4"],
     "moe.experts=7 does not divide the FFN width 128 of model.layers.*.mlp.down_proj"),
    (["--model.moe.variant", "max"], "moe.variant='max' is unknown"),
])
def test_cli_names_bad_moe_settings_before_loading(monkeypatch, capsys, tmp_path, args, message):
    import compressor.pipeline
    from compressor.cli import main

    FAMILIES["llama"]().save_pretrained(tmp_path / "llama")  # config.json only: enough for the up-front checks
    # with a tokenizer: a folder without one is refused before the MoE checks
    word_tokenizer().save_pretrained(tmp_path / "llama")
    monkeypatch.setattr(compressor.pipeline, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    rc = main(["fit", "--trainer.accelerator", "cpu", "--output.dir", str(tmp_path / "out"),
               "--model.source.name_or_path", str(tmp_path / "llama"), *args])
    assert rc == 2 and message in capsys.readouterr().err


def test_mu_is_the_mean_activation_over_every_calibration_token():
    model = tiny("llama", seed=2)
    ids = torch.randint(0, 128, (6, 16), generator=torch.Generator().manual_seed(0))
    blocks = ModelAdapter(model).blocks
    seen = []
    handle = blocks[1].mlp.down_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0].reshape(-1, 128)))
    with torch.no_grad():
        model(ids)
    handle.remove()
    reports = convert_model(model, ids, MoEConfig(enabled=True, experts=8, k=8, train_router=False,
                                                  router_tokens=0), "cpu", batch_size=4)
    assert reports[1]["mu_tokens"] == 96 and reports[1]["router_tokens"] == 96
    assert torch.allclose(blocks[1].mlp.mu, torch.cat(seen).mean(0), atol=1e-6)
