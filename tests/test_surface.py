"""What a new user meets: one-line errors, Ctrl-C, a help that fits, honest summaries, tidy outputs and logs."""

import io
import json
import os
import shlex
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from compressor.cli import main
from compressor.config import CalibrationConfig, ConfigError, EvaluationConfig, OutputConfig, PruningConfig
from compressor.pipeline import RunSettings, compress
from conftest import tiny_llama, word_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def config_only_model(tmp_path_factory):
    """A folder with a tiny Llama's config.json and a tokenizer, no weights: every mistake below is refused before
    weights are read (a folder without a tokenizer would be refused first, for that reason)."""
    from transformers import LlamaConfig

    folder = tmp_path_factory.mktemp("config-only")
    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=256, max_position_embeddings=8192).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer):
    """A tiny random Llama (6 blocks) saved with the real SmolLM2 tokenizer."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(smollm2_tokenizer), max_position_embeddings=512)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    smollm2_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(" ".join(f"word{i % 97} and more text {i}" for i in range(3000)))
    return path


def cli(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "cli.py"), *args]


MISTAKES = {  # name: (arguments after `fit`, what the one line must say)
    "not a GGUF file": (["--model.source.name_or_path", "{tmp}/renamed.gguf"], "is not a GGUF file"),
    "output folder in /proc": (["--output.dir", "/proc/compressor-out"], "output.dir='/proc/compressor-out' cannot be"),
    "output folder under a file": (["--output.dir", "{tmp}/a-file/out"], "which is a file"),
    "GPU without one": (["--trainer.accelerator", "gpu"], "no GPU is visible"),
    "several devices": (["--trainer.devices", "4"], "trainer.devices=4: several devices need trainer.strategy=ddp"),
    "an optimizer": (["--optimizer", "SGD"], "unrecognized arguments: --optimizer SGD"),
    "a Trainer knob that does not apply": (["--trainer.max_epochs", "3"], "unrecognized arguments"),
    "a value of the wrong type": (["--model.pruning.sparsity", "abc"], "model.pruning.sparsity: Expected a float"),
    "a Lightning checkpoint": (["--ckpt_path", "epoch=3.ckpt"], "only 'last' is supported"),
}


@pytest.fixture(scope="module")
def mistakes(tmp_path_factory, config_only_model):
    """Every mistake run as a real `python cli.py fit` subprocess, all started at once (start-up dominates)."""
    tmp = tmp_path_factory.mktemp("mistakes")
    (tmp / "renamed.gguf").write_text("this is a text file, not a GGUF model\n")
    (tmp / "a-file").write_text("")
    procs = {}
    for name, (args, _) in MISTAKES.items():
        args = [a.format(tmp=tmp) for a in args]
        base = ["fit", "--model.source.name_or_path", str(config_only_model), "--output.dir", str(tmp / "out"),
                "--data.evaluation.datasets", "[]"]
        procs[name] = subprocess.Popen(cli(*base, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                       cwd=tmp, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return {name: (p.wait(), *p.communicate()) for name, p in procs.items()}


@pytest.mark.parametrize("name", list(MISTAKES))
def test_a_users_mistake_is_one_line_with_exit_code_2(mistakes, name):
    if name == "GPU without one" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    rc, out, err = mistakes[name]
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, err
    assert "Traceback" not in err and "usage:" not in err
    assert len(lines) == 1 and lines[0].startswith("error: ") and MISTAKES[name][1] in lines[0], err


def test_help_lists_what_applies(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    fit = capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["validate", "--help"])
    val = capsys.readouterr().out
    for key in ("--trainer.accelerator", "--trainer.devices", "--trainer.precision", "--trainer.strategy",
                "--model.pruning.method", "--data.calibration.sources", "--output.keep_checkpoints", "--ckpt_path"):
        assert key in fit
    for key in ("--trainer.max_epochs", "--trainer.callbacks", "--optimizer", "--lr_scheduler", "--seed_everything"):
        assert key not in fit and key not in val
    assert "'last' only" in fit
    assert len(fit.splitlines()) < 700  # was 899, with the usage block alone 126 lines (609 with W8A8 and cushion)
    assert fit.splitlines()[0].startswith("usage: python cli.py fit [--config FILE]")
    for key in ("--model.pruning", "--model.reconstruction", "--model.schedule", "--model.quantization",
                "--ckpt_path", "--output.keep_checkpoints", "--data.recon_calibration"):
        assert key not in val
    assert "--model.source.name_or_path" in val and "--data.evaluation.datasets" in val and "validate.json" in val
    assert len(val.splitlines()) < 200


def test_ctrl_c_stops_cleanly_and_the_printed_command_resumes(tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "out"
    args = ["fit", "--trainer.accelerator", "cpu", "--model.source.name_or_path", str(tiny_model_dir),
            "--model.pruning.method", "wanda", "--model.reconstruction.mode", "br",
            "--model.reconstruction.epochs", "3", "--model.reconstruction.batch_size", "2",
            "--data.calibration.sources", f"[{text_file}]", "--data.calibration.num_samples", "8",
            "--data.calibration.seqlen", "32", "--data.evaluation.datasets", "[]", "--output.plots", "false",
            "--output.dir", str(out)]
    proc = subprocess.Popen(cli(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    manifest = out / "checkpoints" / "manifest.json"
    while proc.poll() is None and not (manifest.is_file() and json.loads(manifest.read_text())["blocks_done"]):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate()
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    said = [line for line in stderr.splitlines() if "interrupted" in line]
    done = json.loads(manifest.read_text())["blocks_done"]
    assert len(said) == 1 and said[0].startswith(f"interrupted: {done} of 6 blocks checkpointed in "), stderr[-3000:]
    command = shlex.split(said[0].split("resume with: ", 1)[1])
    assert command[0] == "python" and command[1].endswith("cli.py") and command[2:] == args
    resumed = subprocess.run([sys.executable, *command[1:]], capture_output=True, text=True, cwd=ROOT,
                             env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"})  # a wide table
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming: {done} of 6 blocks done" in resumed.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["resumed_blocks"] == done
    row = next(line for line in resumed.stdout.splitlines() if "blocks resumed from checkpoints" in line)
    assert f"{done} of 6" in row
    log = (out / "compress.log").read_text()
    assert log.count("===== run ") == 2 and "interrupted (Ctrl-C)" in log and "INFO compressor: finished in" in log
    # a finished run's checkpoints are removed by default, their size stated
    assert not (out / "checkpoints").exists() and report["checkpoints"]["bytes"] > 0
    assert "checkpoints removed (" in resumed.stdout


def tiny_settings(out, text_file, **output):
    return RunSettings(pruning=PruningConfig(method="magnitude", sparsity=0.5),
                       calibration=CalibrationConfig(sources=[str(text_file)], num_samples=2, seqlen=32),
                       evaluation=EvaluationConfig(datasets=[str(text_file)], max_windows=2, heldout_samples=2),
                       output=OutputConfig(dir=str(out), plots=False, **output))


def test_rerunning_a_finished_run_does_nothing_unless_overwrite(tmp_path, text_file, smollm2_tokenizer, capsys):
    def run(**output):
        model = tiny_llama(layers=2, vocab=len(smollm2_tokenizer))
        return compress(tiny_settings(tmp_path / "out", text_file, **output), "cpu", progress=False,
                        model_and_tokenizer=(model, smollm2_tokenizer))

    first = run(keep_checkpoints=True)
    assert "checkpoints kept in" in capsys.readouterr().out and (tmp_path / "out" / "checkpoints").is_dir()
    weights = tmp_path / "out" / "model" / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    again = run()
    said = capsys.readouterr().out
    assert "already holds this run" in said and "nothing done" in said and "evaluation and saving only" in said
    assert again["date"] == first["date"] and weights.stat().st_mtime_ns == mtime
    redone = run(overwrite=True)
    assert redone["resumed_blocks"] == 2 and "redoes evaluation and saving only" in capsys.readouterr().out
    with pytest.raises(ConfigError, match=r"holds a finished run of other settings \(pruning.sparsity: 0.5 -> 0.6"):
        settings = tiny_settings(tmp_path / "out", text_file)
        settings.pruning = PruningConfig(method="magnitude", sparsity=0.6)
        compress(settings, "cpu", progress=False, model_and_tokenizer=(tiny_llama(layers=2), smollm2_tokenizer))
    log = (tmp_path / "out" / "compress.log").read_text()
    assert log.count("===== run ") == 3 and "already complete: nothing done" in log


def test_a_finished_run_is_not_taken_for_one_whose_model_or_calibration_text_changed_in_place(
        tmp_path, text_file, smollm2_tokenizer, capsys):
    settings = tiny_settings(tmp_path / "out", text_file)

    def run(model):
        return compress(settings, "cpu", progress=False, model_and_tokenizer=(model, smollm2_tokenizer))

    first = run(tiny_llama(layers=2, vocab=len(smollm2_tokenizer)))
    assert first["calibration"]["fingerprint"]
    assert run(tiny_llama(layers=2, vocab=len(smollm2_tokenizer)))["date"] == first["date"]  # same weights, same text
    assert "nothing done" in capsys.readouterr().out
    tuned = tiny_llama(layers=2, vocab=len(smollm2_tokenizer))
    with torch.no_grad():  # the same path, other weights (say, fine-tuned further in place)
        tuned.model.layers[1].mlp.down_proj.weight.add_(0.01)
    with pytest.raises(ConfigError, match=r"holds a finished run of another model: the weights at .* changed"):
        run(tuned)
    text_file.write_text(text_file.read_text()[::-1])  # the calibration file rewritten in place
    with pytest.raises(ConfigError, match=r"holds a finished run of other calibration windows"):
        run(tiny_llama(layers=2, vocab=len(smollm2_tokenizer)))
    assert "ERROR compressor: error: output.dir=" in (tmp_path / "out" / "compress.log").read_text()


def test_errors_are_recorded_in_the_run_log(tmp_path, smollm2_tokenizer):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    settings = tiny_settings(tmp_path / "out", short)
    with pytest.raises(Exception, match="tokens"):
        compress(settings, "cpu", progress=False, model_and_tokenizer=(tiny_llama(layers=2), smollm2_tokenizer))
    log = (tmp_path / "out" / "compress.log").read_text()
    assert "===== run " in log and "ERROR compressor: error: source" in log


def test_summary_dense_column_shows_an_already_sparse_input(tmp_path, text_file, smollm2_tokenizer):
    from rich.console import Console

    from compressor.report import summary_table

    model = tiny_llama(layers=2, vocab=len(smollm2_tokenizer))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name:
                module.weight[torch.rand(module.weight.shape, generator=g) < 0.3] = 0
    nonzero = sum(int((p != 0).sum()) for p in model.parameters())
    report = compress(tiny_settings(tmp_path / "out", text_file), "cpu", progress=False,
                      model_and_tokenizer=(model, smollm2_tokenizer))
    assert report["model"]["dense_nonzero"] == nonzero < report["model"]["parameters"]
    assert report["sparsity"]["dense"] == pytest.approx(0.3, abs=0.01)
    console = Console(file=io.StringIO(), width=200)
    console.print(summary_table(report))
    table = console.file.getvalue()
    row = next(line for line in table.splitlines() if "sparsity of pruned linears" in line)
    assert f"{report['sparsity']['dense']:.4f}" in row and "0.5000 (target 0.5000)" in row
    assert f"{nonzero:,}" in next(line for line in table.splitlines() if "nonzero parameters" in line)


def test_outputs_have_the_usual_permissions(tmp_path, text_file, smollm2_tokenizer):
    from compressor.io import atomic_write_dir

    old = os.umask(0o022)
    try:
        def private_writer(tmp: Path) -> None:  # as some writers do: a 0600 temporary file renamed into place
            (tmp / "sub").mkdir(mode=0o700)
            fd = os.open(tmp / "sub" / "weights.bin", os.O_WRONLY | os.O_CREAT, 0o600)
            os.close(fd)

        folder = atomic_write_dir(tmp_path / "dir", private_writer)
        assert stat.S_IMODE((folder / "sub" / "weights.bin").stat().st_mode) == 0o644
        assert stat.S_IMODE((folder / "sub").stat().st_mode) == 0o755
        compress(tiny_settings(tmp_path / "out", text_file), "cpu", progress=False,
                 model_and_tokenizer=(tiny_llama(layers=2, vocab=len(smollm2_tokenizer)), smollm2_tokenizer))
        out = tmp_path / "out"
        for f in ("model/model.safetensors", "model/config.json", "model/tokenizer.json", "masks.safetensors",
                  "report.json", "compress.log"):
            assert stat.S_IMODE((out / f).stat().st_mode) == 0o644, f
        assert stat.S_IMODE((out / "model").stat().st_mode) == 0o755
    finally:
        os.umask(old)


def test_validate_writes_validate_json_where_it_says(tmp_path, text_file, smollm2_tokenizer, capsys):
    compress(tiny_settings(tmp_path / "out", text_file), "cpu", progress=False,
             model_and_tokenizer=(tiny_llama(layers=2, vocab=len(smollm2_tokenizer)), smollm2_tokenizer))
    capsys.readouterr()
    rc = main(["validate", "--trainer.accelerator", "cpu",
               "--model.source.name_or_path", str(tmp_path / "out" / "model"), "--data.calibration.seqlen", "32",
               "--data.evaluation.datasets", f"[{text_file}]",
               "--data.evaluation.max_windows", "2"])
    assert rc == 0
    assert f"written {tmp_path / 'out' / 'validate.json'}" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "validate.json").read_text())["linear_sparsity"] == pytest.approx(0.5, 1e-3)


def test_saved_tokenizer_and_config_agree_and_chat_generation_stops_at_the_end_of_turn(smollm2, tmp_path):
    """The packaged GGUF says EOS = PAD = <|im_end|> (2), BOS = <|im_start|> (1); transformers' tokenizer conversion
    made EOS <|im_start|> (1): loading aligns the tokenizer, and the saved folder agrees with itself."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from compressor.io import atomic_write_dir

    model, tokenizer = smollm2

    def fill(folder: Path) -> None:  # what save_outputs writes, less the 540 MB of weights
        model.config.save_pretrained(folder)
        model.generation_config.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    folder = atomic_write_dir(tmp_path / "model", fill)
    tok = AutoTokenizer.from_pretrained(folder)
    config, gen = AutoConfig.from_pretrained(folder), GenerationConfig.from_pretrained(folder)
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 2)
    assert (tok.bos_token, tok.bos_token_id) == ("<|im_start|>", 1)
    assert tok.eos_token_id == config.eos_token_id == gen.eos_token_id
    assert tok.bos_token_id == config.bos_token_id and tok.pad_token_id == config.pad_token_id == 2
    assert json.loads((folder / "tokenizer_config.json").read_text())["clean_up_tokenization_spaces"] is False
    chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   add_generation_prompt=True, return_tensors="pt")
    ids = chat["input_ids"] if hasattr(chat, "keys") else chat
    out = model.generate(ids, generation_config=gen, max_new_tokens=48, do_sample=False)
    new = out[0, ids.shape[1]:].tolist()
    assert new[-1] == tok.eos_token_id and len(new) < 48  # stopped at the end of its turn, not at the limit
    assert "Paris" in tok.decode(new, skip_special_tokens=True)
