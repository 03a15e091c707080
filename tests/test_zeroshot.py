"""Zero-shot tasks through lm-evaluation-harness: our task files reproduce the harness's official ones on the
staged data, the numbers are the harness's, offline, and the pipeline reports them."""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import socket
from pathlib import Path

import pytest
import torch

from compressor.config import CalibrationConfig, ConfigError, EvaluationConfig, OutputConfig, PruningConfig
from compressor.zeroshot import known_tasks, task_configs, zeroshot_accuracy
from compressor.zeroshot.tasks import resolve_data_dir
from conftest import SHARED_DATA, tiny_llama

pytest.importorskip("lm_eval")
ZEROSHOT = SHARED_DATA / "zeroshot"
ALL = ["boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa", "lambada_openai", "piqa",
       "copa"]


@pytest.fixture(scope="module")
def zeroshot_data() -> Path:
    if not (ZEROSHOT / "README.md").is_file():
        pytest.skip(f"the staged zero-shot data is absent (expected beside the checkout at {ZEROSHOT})")
    return ZEROSHOT


def byte_tokenizer():
    """A byte-level tokenizer (256 byte tokens + end of text) made here: nothing downloaded, tiny vocabulary."""
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def official(task: str, data: Path, local: dict) -> dict:
    """The harness's own task config (its YAML in lm_eval/tasks, functions resolved), reading our local file;
    ``local`` maps a staged record to the hub schema the official task reads, where the two differ."""
    import lm_eval
    from lm_eval.tasks._yaml_loader import load_yaml

    path = {"boolq": "super_glue/boolq/default.yaml", "rte": "super_glue/rte/default.yaml",
            "winogrande": "winogrande/default.yaml", "arc_easy": "arc/arc_easy.yaml",
            "arc_challenge": "arc/arc_challenge.yaml", "openbookqa": "openbookqa/openbookqa.yaml",
            "lambada_openai": "lambada/lambada_openai.yaml", "piqa": "piqa/piqa.yaml",
            "copa": "super_glue/copa/default.yaml"}[task]
    cfg = load_yaml(Path(lm_eval.__file__).parent / "tasks" / path, resolve_func=True)
    ours = task_configs([task], str(data))[0]
    cfg = {k: v for k, v in cfg.items() if k not in ("tag", "include", "training_split")}
    split = next(iter(ours["dataset_kwargs"]["data_files"]))
    cfg.update(task=f"official_{task}", dataset_path="json", dataset_name=None,
               dataset_kwargs=ours["dataset_kwargs"], validation_split=split if split == "validation" else None,
               test_split=split if split == "test" else None, num_fewshot=0)
    if task in local:
        cfg["process_docs"] = lambda ds, f=local[task]: ds.map(f)
    return cfg


LOCAL_TO_HUB = {  # the official tasks read the hub copies: same values, other field names or label types
    "boolq": lambda d: {"label": int(d["label"])},
    "rte": lambda d: {"label": 0 if d["label"] == "entailment" else 1},
    "openbookqa": lambda d: {"question_stem": d["question"]["stem"],
                             "choices": {"text": [c["text"] for c in d["question"]["choices"]],
                                         "label": [c["label"] for c in d["question"]["choices"]]}},
}


def build(cfg: dict):
    from lm_eval.api.task import ConfigurableTask

    return ConfigurableTask(config=copy.deepcopy(cfg))


@pytest.mark.parametrize("task", [t for t in ALL if t != "hellaswag"])
def test_task_files_give_the_official_prompts_choices_and_gold(task, zeroshot_data):
    ours = build(task_configs([task], str(zeroshot_data))[0])
    theirs = build(official(task, zeroshot_data, LOCAL_TO_HUB))
    docs, ref = list(ours.eval_docs), list(theirs.eval_docs)
    assert len(docs) == len(ref) > 0
    for i in list(range(0, len(docs), max(1, len(docs) // 40))):  # about 40 documents spread over the split
        a, b = docs[i], ref[i]
        assert ours.doc_to_text(a) == theirs.doc_to_text(b), i
        if ours.config.output_type == "multiple_choice":
            choices = ours.doc_to_choice(a)
            assert choices == theirs.doc_to_choice(b), i
            gold, ref_gold = ours.doc_to_target(a), theirs.doc_to_target(b)
            if ours.multiple_input:  # winogrande: the text is the gold option's index, the target is shared
                assert gold == ref_gold, i
            else:
                ref_gold = ref_gold if isinstance(ref_gold, int) else choices.index(ref_gold)
                assert gold == ref_gold and 0 <= gold < len(choices), i
        else:
            assert ours.doc_to_target(a) == theirs.doc_to_target(b), i
    assert [m["metric"] for m in ours.config.metric_list] == [m["metric"] for m in theirs.config.metric_list]


def test_hellaswag_derived_file_gets_the_harness_text_clean_up(zeroshot_data):
    import lm_eval

    spec = importlib.util.spec_from_file_location("hs_utils", Path(lm_eval.__file__).parent / "tasks/hellaswag/utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    task = build(task_configs(["hellaswag"], str(zeroshot_data))[0])
    docs = list(task.eval_docs)
    assert len(docs) == 10042
    tagged = [d for d in docs if "[" in d["query"] + "".join(d["endings"])]
    for d in docs[:50] + tagged:
        assert task.doc_to_text(d) == utils.preprocess(d["query"])
        assert task.doc_to_choice(d) == [utils.preprocess(e) for e in d["endings"]]
        assert task.doc_to_target(d) == d["label"]


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_two_tasks_with_limit_are_scored_by_the_harness_offline(zeroshot_data, no_network):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tok = byte_tokenizer()
    model = tiny_llama(layers=2, hidden=64, vocab=len(tok), seed=1)
    model.config.max_position_embeddings = 4096
    ours = zeroshot_accuracy(model, tok, ["copa", "arc_easy"], str(zeroshot_data), limit=12, batch_size=4)
    assert set(ours) == {"copa", "arc_easy"}
    assert ours["copa"]["n"] == ours["arc_easy"]["n"] == 12
    assert ours["copa"]["split_size"] == 100 and ours["arc_easy"]["split_size"] == 2376
    assert "acc_norm" in ours["arc_easy"] and "acc_norm" not in ours["copa"]
    # the harness itself, with its official task definitions, on the same documents
    lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tok), batch_size=4)
    ref = simple_evaluate(lm, tasks=[official(t, zeroshot_data, {}) for t in ("copa", "arc_easy")],
                          task_manager=TaskManager(include_defaults=False), limit=12, log_samples=False,
                          bootstrap_iters=0)["results"]
    assert ours["copa"]["acc"] == ref["official_copa"]["acc,none"]
    assert ours["arc_easy"]["acc"] == ref["official_arc_easy"]["acc,none"]
    assert ours["arc_easy"]["acc_norm"] == ref["official_arc_easy"]["acc_norm,none"]
    for rec in ours.values():  # accuracies of 12 documents
        assert (rec["acc"] * 12) == pytest.approx(round(rec["acc"] * 12))
        assert rec["acc_stderr"] == pytest.approx((rec["acc"] * (1 - rec["acc"]) / 11) ** 0.5)


def test_unknown_task_and_missing_file_fail_at_parse_time(tmp_path, zeroshot_data):
    with pytest.raises(ConfigError, match="'squad' is not a known zero-shot task: choose from .*boolq"):
        EvaluationConfig(datasets=[], tasks=["squad"])
    (tmp_path / "copa.jsonl").write_text((zeroshot_data / "copa.jsonl").read_text())
    EvaluationConfig(datasets=[], tasks=["copa"], tasks_dir=str(tmp_path))
    with pytest.raises(ConfigError, match=r"task 'piqa' needs piqa.jsonl \(validation split\) in "
                                          r"evaluation.tasks_dir=" + re.escape(repr(str(tmp_path)))):
        EvaluationConfig(datasets=[], tasks=["copa", "piqa"], tasks_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="task 'hellaswag' needs derived/hellaswag_llamacpp.jsonl"):
        EvaluationConfig(datasets=[], tasks=["hellaswag"], tasks_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="tasks_limit=0 must be >= 1"):
        EvaluationConfig(datasets=[], tasks=["copa"], tasks_dir=str(tmp_path), tasks_limit=0)
    assert sorted(known_tasks()) == sorted(ALL)


def test_default_folder_resolves_beside_the_checkout(zeroshot_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the checkout: the default is then found beside the checkout
    assert resolve_data_dir("../shared/data/zeroshot") == zeroshot_data.resolve()


def test_pipeline_reports_dense_and_compressed_accuracy(zeroshot_data, tmp_path, capsys, monkeypatch):
    from compressor.pipeline import RunSettings, compress, validate
    from compressor.config import ModelConfig

    tok = byte_tokenizer()
    model = tiny_llama(layers=2, hidden=64, vocab=len(tok), seed=2)
    model.config.max_position_embeddings = 4096
    monkeypatch.setenv("COLUMNS", "200")  # the summary table unwrapped
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"word{i % 89} says more {i}." for i in range(2000)))
    ev = EvaluationConfig(datasets=[], tasks=["copa", "rte"], tasks_limit=6, tasks_batch_size=4,
                          tasks_dir=str(zeroshot_data))
    settings = RunSettings(pruning=PruningConfig(method="wanda", sparsity=0.5),
                           calibration=CalibrationConfig(sources=[str(text)], num_samples=2, seqlen=64),
                           evaluation=ev, output=OutputConfig(dir=str(tmp_path / "out"), plots=False))
    report = compress(settings, "cpu", progress=False, model_and_tokenizer=(model, tok))
    zs = json.loads((tmp_path / "out" / "report.json").read_text())["zeroshot"]
    assert zs == json.loads(json.dumps(report["zeroshot"]))
    assert zs["tasks"] == ["copa", "rte"] and zs["limit"] == 6 and zs["harness"].startswith("lm-eval 0.4.")
    for which in ("dense", "compressed"):
        assert {t: r["n"] for t, r in zs[which].items()} == {"copa": 6, "rte": 6}
        assert zs["mean_acc"][which] == pytest.approx((zs[which]["copa"]["acc"] + zs[which]["rte"]["acc"]) / 2)
    out = capsys.readouterr().out
    assert "zero-shot acc: copa, first 6 docs" in out and "zero-shot mean acc (2 tasks)" in out
    # the saved model measured again by validate gives the compressed figures
    val = validate(ModelConfig(name_or_path=str(tmp_path / "out" / "model")), ev, settings.calibration,
                   str(tmp_path / "val"), "cpu", progress=False)
    assert {t: r["acc"] for t, r in val["zeroshot"]["model"].items()} == {
        t: r["acc"] for t, r in zs["compressed"].items()}
