"""The command line: the README's main command, and bad input."""
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch

from conftest import error_of, INPUT, parse_args, read_docs, read_log, ROOT, run, SMALL
import sample
import train_gpt2
from train_gpt2 import GPT2_PROMPT
from machinery.cli import error_text
from machinery.perf import duration
from machinery.settings import check_config, MODELS, samples_prompt, TrainConfig
from machinery.world import LAUNCHER_VARIABLES, maybe_compile


def readme_main_command():
    """The training command of the README's set-up section, as an argument list."""
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    line = next(l for l in readme.splitlines() if l.startswith("pip install torch==2.13.0 -r requirements.txt "))
    install, command = line.split(" && ", 1)
    assert install.endswith(" -c constraints.txt")  # the versions the suite passed with
    return shlex.split(command)


def test_ci_runs_the_readmes_test_command_in_a_virtual_environment_of_its_own():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read().splitlines()
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = f.read().splitlines()
    test_command = next(l for l in readme if l.startswith("pip install ") and "python -m pytest" in l)
    assert test_command == "pip install torch==2.13.0 -r requirements-dev.txt -c constraints.txt && python -m pytest -q tests"
    assert ci[-1] == test_command  # exactly, as the last thing CI does
    # pip installs into a virtual environment made in this run, not into whatever the machine has
    made, activated = ci.index('python3 -m venv "$venv"'), ci.index('source "$venv/bin/activate"')
    assert made < activated < len(ci) - 1 and 'venv="$(mktemp -d)/venv"' in ci
    with open(os.path.join(ROOT, "constraints.txt")) as f:
        pins = dict(l.split("==") for l in f.read().splitlines() if l and not l.startswith("#"))
    assert pins["torch"] == "2.13.0" and {"pytest", "numpy", "tiktoken", "transformers", "datasets"} <= set(pins)


def test_readme_main_command_trains_and_samples(tmp_path):
    cmd = readme_main_command()
    assert cmd[:2] == ["python", "train_gpt2.py"] and "input.txt" in cmd and "--max_steps" in cmd
    # the README's settings for 30 of its steps (the README's own figures are for the whole run)
    out = run(cmd[1:] + ["--max_steps", "30", "--log_dir", str(tmp_path)])
    assert out.returncode == 0, out.stderr
    assert "using device: cpu" in out.stdout  # auto picks the CPU here, and bf16 auto is off on it
    train = [float(loss) for step, kind, loss in read_log(tmp_path) if kind == "train"]
    assert len(train) == 30
    assert train[0] - train[-1] > 1.5, train  # 10.83 -> 7.91 measured: it learns (a broken step stays near 10.8)
    # the samples start from the text's first line, "First Citizen:", then go on on the next line
    samples = re.findall(r"^sample \d: First Citizen:\n(.*)$", out.stdout, re.M)
    assert len(samples) == 4 and all(s.isprintable() for s in samples)


def test_samples_start_from_the_texts_first_line_or_the_lectures_prompt(tmp_path):
    assert samples_prompt(parse_args(["--data", INPUT]), GPT2_PROMPT) == "First Citizen:\n"
    assert samples_prompt(parse_args(["--data", INPUT, "--prompt", "ROMEO:"]), GPT2_PROMPT) == "ROMEO:"
    assert samples_prompt(parse_args(["--data", str(tmp_path)]), GPT2_PROMPT) == "Hello, I'm a language model,"


@pytest.mark.parametrize("args, message", [
    (["--max_steps", "ten"], "argument --max_steps: invalid int value: 'ten'"),
    (["--no_such_flag", "1"], "unrecognized arguments: --no_such_flag"),
    (["--data", "missing.txt"], "data 'missing.txt' not found: run `python fineweb.py`"),
    (["--n_embd", "30", "--n_head", "4"], "--n_embd 30 must be a multiple of --n_head 4"),
    (["--batch_size", "0"], "--batch_size must be at least 1"),
    (["--warmup_steps", "-1"], "--warmup_steps must be at least 0"),
    (["--total_batch_size", "100"], "--total_batch_size 100 is not a multiple of --seq_len x processes = 16 x 1"),
    (["--init_from", "gpt3"], "unknown model 'gpt3'"),
    (["--model", "gpt3"], "--model 'gpt3' is not one of gpt2, gpt2-medium,"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--device", "cuda"], "sees no CUDA GPU"),
])
def test_bad_input_is_an_error_that_says_what_to_do_and_clobbers_nothing(tmp_path, args, message):
    log = tmp_path / "log.txt"
    log.write_text("0 train 10.000000\n")  # an earlier run's log
    error = error_of(train_gpt2.main, [*SMALL, *args, "--log_dir", str(tmp_path)])
    assert error.startswith("error: ") and message in error and "\n" not in error, error
    assert log.read_text() == "0 train 10.000000\n"
    assert os.listdir(tmp_path) == ["log.txt"]


def test_a_bad_input_in_a_real_process_is_one_line_on_stderr_and_exit_code_1(tmp_path):
    out = run(["train_gpt2.py", *SMALL, "--n_embd", "30", "--n_head", "4", "--log_dir", str(tmp_path)])
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr == "error: --n_embd 30 must be a multiple of --n_head 4\n"


def test_each_step_prints_loss_lr_norm_time_throughput_mfu_and_eta(tmp_path):
    out = run(["train_gpt2.py", *SMALL, "--max_steps", "3", "--log_dir", str(tmp_path)])
    assert out.returncode == 0, out.stderr
    steps = re.findall(r"^step +(\d+) \| loss ([0-9.]+) \| lr ([0-9.e+-]+) \| norm ([0-9.]+) "
                       r"\| dt ([0-9.]+)ms \| tok/sec ([0-9.]+) \| mfu ([0-9.]+)% \| eta (\w+)$", out.stdout, re.M)
    assert [int(s[0]) for s in steps] == [0, 1, 2]
    # printed once: the peak MFU is a share of (a CPU's is measured), and the model's FLOPs per token
    peak = float(re.search(r"^MFU is measured against this device's measured fp32 matmul peak: ([0-9.]+) TFLOP/s$",
                           out.stdout, re.M).group(1))
    n_params = int(re.search(r"^model: ([0-9,]+) parameters$", out.stdout, re.M).group(1).replace(",", ""))
    flops = 6 * n_params + 12 * 2 * 16 * 32  # 2 layers, T=16, 32 channels
    logged = [float(loss) for _, kind, loss in read_log(tmp_path) if kind == "train"]
    for (step, loss, lr, norm, dt, tps, mfu, eta), log_loss in zip(steps, logged):
        assert float(loss) == log_loss
        assert float(norm) > 0
        assert abs(float(tps) - 2 * 16 / (float(dt) / 1000)) / float(tps) < 0.01  # B*T*accum / dt
        assert abs(float(mfu) - 100 * float(tps) * flops / (peak * 1e12)) <= 0.05 + 0.01 * float(mfu)
    assert steps[-1][-1] == "0s"  # nothing left after the last step
    assert [duration(s) for s in (0, 42.4, 307, 10920, 86399)] == ["0s", "42s", "5m07s", "3h02m", "23h59m"]


def test_help_lists_every_flag_with_its_default():
    out = run(["train_gpt2.py", "--help"])
    assert out.returncode == 0, out.stderr
    # each option's text, its wrapped lines joined
    options = {flag: " ".join(text.split()) for flag, text in
               re.findall(r"^  --(\w+) [A-Z_0-9]+\s+(.*?)(?=^  -|\Z)", out.stdout, re.M | re.S)}
    assert list(options) == [
        "data", "shuffle_shards", "model", "init_from", "n_layer", "n_head", "n_embd", "total_batch_size", "batch_size",
        "seq_len", "max_steps", "warmup_steps", "max_lr", "min_lr", "weight_decay", "eval_every", "val_steps",
        "val_batch_size", "hellaswag", "hellaswag_file", "sample_every", "prompt", "log_dir", "checkpoint_every", "checkpoint_minutes",
        "sharded_checkpoints", "resume", "seed",
        "device", "bf16", "compile", "compile_mode", "fsdp", "fsdp_bf16", "activation_checkpointing", "loss_chunks",
        "dry_run"]
    for flag, default in (("data", "edu_fineweb10B"), ("max_steps", "19073 for gpt2; other models set their own"),
                          ("log_dir", "log"), ("bf16", "auto"), ("compile", "True"), ("resume", "")):
        assert options[flag].endswith(f"(default: {default})"), (flag, options[flag])
    assert options["n_embd"] == "channels (scratch only) (default: 768 for gpt2; other models set their own)"


def test_a_model_sets_its_shape_and_recipe_and_explicit_flags_win():
    assert parse_args([]) == parse_args(["--model", "gpt2"]) == TrainConfig(**train_gpt2.RECIPE)  # the lesson's recipe
    # the val batches: 64 sequences whatever the micro-batch, unless given
    assert [parse_args(a).val_batch_size for a in ([], ["--batch_size", "8"], ["--batch_size", "auto"],
            ["--model", "gpt2-xl"], ["--batch_size", "8", "--val_batch_size", "3"])] == [64, 64, 64, 64, 3]
    assert (parse_args([]).total_batch_size, parse_args([]).max_steps, parse_args([]).max_lr) == (524288, 19073, 6e-4)
    c = parse_args(["--model", "gpt3-xl"])  # GPT-3 XL: 24 layers of 2048, 1M tokens a step, lr 2e-4, context 2048
    assert (c.n_layer, c.n_head, c.n_embd, c.seq_len, c.total_batch_size) == (24, 16, 2048, 2048, 2**20)
    assert (c.max_lr, c.min_lr, c.warmup_steps, c.max_steps) == (2e-4, 2e-5, 358, 9537)  # 375M and 10B tokens
    assert (parse_args(["--model", "gpt3-13b"]).n_embd, parse_args(["--model", "gpt3-175b"]).total_batch_size) == (5120, 3145728)
    c = parse_args(["--model", "gpt2-medium"])  # GPT-2's shape, the 124M recipe
    assert (c.n_layer, c.n_head, c.n_embd, c.seq_len, c.max_lr, c.warmup_steps) == (24, 16, 1024, 1024, 6e-4, 715)
    c = parse_args(["--max_lr", "1e-3", "--model", "gpt3-medium", "--seq_len", "1024", "--n_layer", "2"])
    assert (c.max_lr, c.min_lr, c.seq_len, c.n_layer, c.n_embd) == (1e-3, 3e-5, 1024, 2, 1024)


def test_the_sizes_guide_lists_every_model_as_the_trainer_resolves_it():
    rows = re.findall(r"^\| `([\w.-]+)`(?: \(default\))? \| ([\d,]+)M \|(.*)\|$", read_docs("sizes.md"), re.M)
    assert [name for name, _, _ in rows] == list(MODELS)
    for name, millions, rest in rows:
        c = parse_args(["--model", name])
        V, T, L, C = 50304, c.seq_len, c.n_layer, c.n_embd
        assert int(millions.replace(",", "")) == round((V * C + T * C + L * (12 * C * C + 13 * C) + 2 * C) / 1e6), name
        cells = [cell.strip().replace(",", "") for cell in rest.split("|")]
        assert cells[:5] == [str(v) for v in (L, c.n_head, C, T, c.total_batch_size)], name
        assert [float(x) for x in cells[5].split(" / ")] == [c.max_lr, c.min_lr], name
        assert cells[6:] == [str(v) for v in (c.warmup_steps, c.max_steps, c.batch_size)], name


def help_of(script):
    """What `python script --help` prints, from the script's main() in this process."""
    import contextlib, importlib, io
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
        importlib.import_module(script[:-3]).main(["--help"])
    assert e.value.code == 0
    return out.getvalue()


def test_every_command_in_the_readme_and_docs_names_real_scripts_and_flags():
    readme = read_docs()  # the README and every guide in docs/
    helps = {}
    for script, args in re.findall(r"python (\w+\.py)([^`\n|#]*)", readme):
        assert os.path.isfile(os.path.join(ROOT, script)), script
        if script not in helps:
            helps[script] = help_of(script)
        for name in re.findall(r"(--\w+)", args):
            assert name in helps[script], f"{script} has no {name}"
    assert {"train_gpt2.py", "fineweb.py", "bench.py", "sample.py", "export_hf.py", "hellaswag.py", "gpu_check.py"} <= set(helps)


def test_an_exception_becomes_one_line_even_when_it_says_nothing(monkeypatch, capsys):
    import torch
    assert error_text(ValueError("first\nsecond")) == "first"
    assert error_text(RuntimeError()) == "RuntimeError"  # str(e) is '': no IndexError
    assert error_text(OSError("  \n")) == "OSError"

    monkeypatch.setattr(torch._dynamo, "is_dynamo_supported", lambda: False)  # a Python torch.compile does not support
    model = torch.nn.Linear(2, 2)
    assert maybe_compile(model, True, "cuda") is model
    assert re.fullmatch(r"compile: unavailable on Python 3\.\d+\.\d+\S* with torch \S+: running eager; pass --compile 0\n",
                        capsys.readouterr().out)


@pytest.mark.parametrize("where, message", [
    ("file", "--log_dir {d}/file is a file: pass a directory"),
    ("file/sub", "--log_dir {d}/file/sub cannot be written (Not a directory): pass a writable directory"),
])
def test_an_unusable_log_dir_is_refused_before_any_work(tmp_path, capsys, where, message):
    (tmp_path / "file").write_text("mine\n")
    assert error_of(train_gpt2.main, [*SMALL, "--log_dir", str(tmp_path / where)]) == "error: " + message.format(d=tmp_path)
    assert "input.txt (train)" not in capsys.readouterr().out  # refused before tokenizing
    assert (tmp_path / "file").read_text() == "mine\n" and os.listdir(tmp_path) == ["file"]


def test_a_second_run_in_the_same_log_dir_is_refused_and_a_killed_run_leaves_no_lock(tmp_path):
    import signal, time
    first = subprocess.Popen([sys.executable, "train_gpt2.py", *SMALL, "--max_steps", "100000", "--log_dir", str(tmp_path)],
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "log.txt").exists() and time.time() < deadline:
            time.sleep(0.05)
        lines = (tmp_path / "log.txt").read_text()
        second = error_of(train_gpt2.main, [*SMALL, "--max_steps", "5", "--log_dir", str(tmp_path)])
        assert second.startswith(f"error: --log_dir {tmp_path} is in use by another run (pid {first.pid} on ")
        assert second.endswith("wait for it to end, or use another --log_dir")
        assert (tmp_path / "log.txt").read_text().startswith(lines)  # the first run's log goes on, untouched
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert (tmp_path / "run.lock").exists()  # kill -9 leaves the file, but the OS released the lock
    third = error_of(train_gpt2.main, [*SMALL, "--max_steps", "5", "--log_dir", str(tmp_path)])
    assert "log.txt exists: continue that run with --resume auto" in third  # past the lock
    assert not (tmp_path / "run.lock").exists()


@pytest.mark.parametrize("args, message", [
    (["--max_steps", "ten"], "argument --max_steps: invalid int value: 'ten' (see --help)"),
    (["--max_steps"], "argument --max_steps: expected one argument (see --help)"),
    (["--compile", "yes"], "argument --compile: expected 1 or 0, got 'yes' (see --help)"),
    (["--bf16", "2"], "argument --bf16: expected auto, 1 or 0, got '2' (see --help)"),
    (["--max", "5"], "unrecognized arguments: --max 5 (see --help)"),  # no guessing which --max_ flag was meant
    (["input.txt"], "unrecognized arguments: input.txt (see --help)"),
])
def test_a_bad_flag_is_an_error_that_names_it(args, message):
    with pytest.raises(ValueError) as e:
        parse_args(args)
    assert str(e.value) == message


def test_on_off_flags_take_1_and_0_and_bf16_takes_auto_too():
    assert parse_args(["--bf16", "auto", "--compile", "0"]).compile is False
    assert (parse_args(["--compile", "1"]).compile, parse_args(["--bf16", "auto"]).bf16) == (True, "auto")


@pytest.mark.parametrize("args, message", [
    (["--max_steps", "10", "--warmup_steps", "11"], "--warmup_steps 11 is longer than the run (--max_steps 10)"),
    (["--weight_decay", "-0.1"], "--weight_decay must be at least 0, got -0.1"),
    (["--max_lr", "0"], "--max_lr must be above 0 and finite, got 0.0"),
    (["--max_lr=-1e-3"], "--max_lr must be above 0 and finite, got -0.001"),
    (["--max_lr", "nan"], "--max_lr must be above 0 and finite, got nan"),
    (["--max_lr", "inf"], "--max_lr must be above 0 and finite, got inf"),
    (["--min_lr", "1e-3", "--max_lr", "6e-4"], "--min_lr must be from 0 to --max_lr 0.0006, got 0.001"),
    (["--total_batch_size", "0"], "--total_batch_size must be at least 1, got 0"),
    (["--total_batch_size", "-524288"], "--total_batch_size must be at least 1, got -524288"),
    (["--checkpoint_minutes", "-1"], "--checkpoint_minutes must be at least 0 (0: never), got -1.0"),
    (["--sharded_checkpoints", "1"], "--sharded_checkpoints 1 saves the shards FSDP makes: pass --fsdp 1 too"),
    (["--fsdp_bf16", "1"], "--fsdp_bf16 1 sets what FSDP sends: pass --fsdp 1 too"),
    (["--seed", "-1"], "--seed must be at least 0, got -1"),
    (["--sharded_checkpoints", "yes"], "argument --sharded_checkpoints: expected auto, 1 or 0, got 'yes'"),
])
def test_settings_that_make_no_sense_are_refused(args, message):
    with pytest.raises(ValueError) as e:
        check_config(parse_args(args))
    assert str(e.value).startswith(message)
    check_config(parse_args([]))  # the defaults are sound


@pytest.mark.parametrize("args, message", [
    (["sample.py", "-m", "x.pt", "--num_samples", "0"], "--num_samples must be at least 1 and --max_new_tokens at least 0"),
    (["sample.py", "-m", "x.pt", "--max_new_tokens", "-5"], "--num_samples must be at least 1 and --max_new_tokens at least 0, got 4 and -5"),
    (["eval_hellaswag.py", "-m", "x.pt", "--batch_tokens", "0"], "--batch_tokens must be at least 1, got 0"),
    (["bench.py", "--steps", "0"], "--steps must be at least 1, got 0"),
    (["bench.py", "--n_embd", "30", "--n_head", "4"], "--n_embd 30 must be a multiple of --n_head 4"),
    (["bench.py", "--device", "tpu"], "unknown device 'tpu'"),
])
def test_the_small_scripts_refuse_nonsense_in_one_line(args, message):
    import importlib
    error = error_of(importlib.import_module(args[0][:-3]).main, args[1:])
    assert error.startswith("error: ") and message in error and "\n" not in error, error


def test_every_script_answers_a_bad_or_missing_flag_in_one_line_as_the_trainer_does():
    import importlib
    for script in ("sample.py", "eval_hellaswag.py", "hellaswag.py", "export_hf.py", "bench.py", "fineweb.py",
                   "gpu_check.py"):
        main = importlib.import_module(script[:-3]).main
        required = {"sample.py": ["-m", "gpt2"], "export_hf.py": ["a.pt", "out"]}.get(script, [])
        assert error_of(main, [*required, "--no_such_flag", "1"]) == \
            "error: unrecognized arguments: --no_such_flag 1 (see --help)", script
    assert error_of(importlib.import_module("sample").main, []) == \
        "error: the following arguments are required: -m/--model (see --help)"
    assert error_of(importlib.import_module("bench").main, ["--steps", "many"]) == \
        "error: argument --steps: invalid int value: 'many' (see --help)"
    out = run(["sample.py", "--num_samples"])  # in a real process: one line on stderr, exit code 1, not 2
    assert (out.returncode, out.stderr) == (1, "error: argument --num_samples: expected one argument (see --help)\n")


@pytest.mark.parametrize("script", ["fineweb.py", "hellaswag.py", "eval_hellaswag.py", "sample.py", "export_hf.py",
                                    "bench.py", "gpu_check.py", "train_gpt2.py"])
def test_every_script_ends_a_ctrl_c_with_one_line_and_code_130(script, monkeypatch, capsys):
    import argparse, runpy
    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt  # as if pressed while the script reads its command line
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", ctrl_c)  # parse_args goes through it too
    monkeypatch.setattr(sys, "argv", [script])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(os.path.join(ROOT, script), run_name="__main__")  # the script as `python script` runs it
    err = capsys.readouterr().err
    assert e.value.code == 130 and err.startswith("interrupted") and err.count("\n") == 1, err


def test_a_dry_run_prints_every_models_exact_size_and_plans_memory_without_training(tmp_path, monkeypatch, capsys):
    import numpy as np
    for i, n in enumerate((1000, 3000), start=1):  # shards of 1,000 and 3,000 tokens: only their headers are read
        np.save(tmp_path / f"edufineweb_train_{i:06d}.npy", np.arange(n, dtype=np.uint16))
    def no_loader(*args, **kwargs):
        raise AssertionError("a dry run reads no data")
    monkeypatch.setattr(train_gpt2, "DataLoaderLite", no_loader)
    for name in MODELS:
        cfg = parse_args(["--model", name])
        V, T, L, C = 50304, cfg.seq_len, cfg.n_layer, cfg.n_embd
        expected = V * C + T * C + L * (12 * C * C + 13 * C) + 2 * C
        assert train_gpt2.main(["--model", name, "--dry_run", "1", "--log_dir", str(tmp_path / "log")]) is None
        out = capsys.readouterr().out
        assert f"model: {expected:,} parameters\n" in out, name
        assert f"  --model {name}\n  --init_from scratch\n  --n_layer {L}\n" in out and "  --hellaswag_file ''\n" in out
    assert "model: 174,604,836,864 parameters" in out  # GPT-3 175B, shapes only: no memory was allocated
    assert not (tmp_path / "log").exists()  # nothing written, no log_dir claimed
    monkeypatch.setenv("WORLD_SIZE", "8")  # the world size to plan for, as torchrun would set it
    train_gpt2.main(["--model", "gpt3-6.7b", "--dry_run", "1", "--data", str(tmp_path)])
    out = capsys.readouterr().out
    assert "total batch 2,097,152 tokens = 64 micro-batches of 2 x 2048 on each of 8 processes" in out
    assert "data: 4,000 train tokens in 2 shards: the run reads 2499805.18 epochs" in out
    # a 31-hour run on 8 H100s: 4,768 steps, none a multiple of 5000; the checkpoints come by the hour
    assert ("checkpoints: 79.9 GB each (one file; 12 bytes a parameter), 80 s to write at 1 GB/s; every 5000 steps "
            "(0 in 4,768), every 60 minutes (each replacing the one before), and at the end\n") in out
    # under FSDP a checkpoint that big is saved sharded: rank 0's host need not hold 80 GB whole
    train_gpt2.main(["--model", "gpt3-6.7b", "--fsdp", "1", "--dry_run", "1", "--data", str(tmp_path)])
    assert "checkpoints: 79.9 GB each (sharded: a directory of each rank's shards; " in capsys.readouterr().out
    train_gpt2.main(["--model", "gpt3-2.7b", "--fsdp", "1", "--dry_run", "1", "--data", str(tmp_path)])
    assert "checkpoints: 31.8 GB each (one file; " in capsys.readouterr().out
    rows = {line.split()[0]: [float(x) for x in line.split()[1:]] for line in out.splitlines()[-2:]}
    ddp, fsdp = rows["DDP"], rows["FSDP"]  # weights, gradients, optimizer, activations, logits, total (GiB)
    n = 6_658_596_864
    assert abs(ddp[2] - 8 * n / 2**30) < 0.01 and abs(fsdp[2] - 8 * n / 8 / 2**30) < 0.01  # AdamW: 8 bytes, sharded 8 ways
    assert ddp[3:5] == fsdp[3:5] and abs(sum(ddp[:5]) - ddp[5]) < 0.03 and fsdp[5] < 0.5 * ddp[5]


TORCHRUN_ENV = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


@pytest.mark.parametrize("env, message", [
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE is set but RANK is not: torchrun sets them all; start the run with torchrun "
                          "--nproc_per_node=N, or unset WORLD_SIZE"),
    ({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}, "RANK is set but MASTER_ADDR is not: torchrun sets them all; "
     "start the run with torchrun --nproc_per_node=N, or unset RANK, LOCAL_RANK, WORLD_SIZE"),
    ({"RANK": "2", "LOCAL_RANK": "0", "WORLD_SIZE": "2", **TORCHRUN_ENV},
     "RANK=2, LOCAL_RANK=0 and WORLD_SIZE=2 do not fit together: start the run with torchrun"),
    ({"RANK": "0", "LOCAL_RANK": "abc", "WORLD_SIZE": "1", **TORCHRUN_ENV},
     "LOCAL_RANK='abc' is not a whole number: unset it, or start the run with torchrun"),
])
def test_launcher_variables_set_by_hand_or_by_half_are_one_line_that_names_one(tmp_path, monkeypatch, env, message):
    # WORLD_SIZE=2 alone used to train as process 0 of 2: half the batch, every other chunk, half the val loss
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert error_of(train_gpt2.main, [*SMALL, "--log_dir", str(tmp_path / "log")]) == f"error: {message}"
    assert not (tmp_path / "log").exists()


def test_a_dry_run_of_the_default_recipe_on_16_processes_halves_the_micro_batch(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "16")  # a planning input: no launcher needed for a dry run
    train_gpt2.main(["--dry_run", "1"])
    out = capsys.readouterr().out
    assert out.startswith("--batch_size 64 does not divide the 32 sequences each of 16 processes adds up in a "
                          "step: using 32\n")
    assert "  --batch_size 32\n" in out and "total batch 524,288 tokens = 1 micro-batches of 32 x 1024 on each of " \
                                          "16 processes\n" in out


def dry_run_memory(argv, capsys):
    """The DDP row of a dry run's memory table, in GiB: weights, gradients, optimizer, activations, logits, total."""
    train_gpt2.main([*argv, "--dry_run", "1"])
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("  DDP "))
    return [float(x) for x in row.split()[1:]], out


def test_the_dry_run_plans_41_65_gib_compiled_and_53_93_eager_for_the_recipe_within_15_percent_of_the_h200(monkeypatch,
                                                                                                          capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    # torch.cuda.max_memory_allocated on one H200 (2026-11-30): 41.16 GiB compiled (the whole run), 52.97 eager
    compiled, out = dry_run_memory([], capsys)
    assert "flash attention, compiled;" in out and abs(compiled[5] / 41.16 - 1) < 0.15, compiled
    eager, out = dry_run_memory(["--compile", "0"], capsys)
    assert "flash attention, eager;" in out and abs(eager[5] / 52.97 - 1) < 0.10, eager
    assert eager[:4] == compiled[:4] and eager[4] > compiled[4]  # compile changes only what the loss keeps
    assert (compiled[5], eager[5]) == (41.65, 53.93)


def test_the_dry_run_says_how_long_the_run_takes_on_1_and_8_gpus_and_from_what(monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    _, out = dry_run_memory([], capsys)
    # 19,073 steps x 524,288 tokens at 0.86 GFLOP a token, at 44.7% of 989 TFLOP/s: 5.4 h, as measured (1.02 s a step)
    assert ("time, estimated: the MFU measured on one H200, GPT-2 124M, 2026-11-30 (44.7%, compiled) at each GPU's "
            "datasheet bf16 peak; on 8, 95% of 8 times one's speed:\n"
            "  A100 (312 TFLOP/s): 17h07m on 1, 2h15m on 8\n"
            "  H100 (989 TFLOP/s): 5h24m on 1, 42m40s on 8\n"
            "  H200 (989 TFLOP/s): 5h24m on 1, 42m40s on 8\n") in out
    _, out = dry_run_memory(["--compile", "0", "--max_steps", "1000", "--warmup_steps", "10"], capsys)
    # the ladder measured 414,337 tok/s eager: 1,265 s
    assert "(36.0%, eager)" in out and "  H200 (989 TFLOP/s): 21m07s on 1, 2m47s on 8\n" in out


def test_a_prompt_that_would_be_mangled_is_refused_and_a_sequence_longer_than_the_data_says_what_to_change(tmp_path):
    # a prompt in another encoding reaches Python as lone surrogates: it used to become U+FFFD in the samples
    latin1 = b"caf\xe9".decode("utf-8", "surrogateescape")  # what a Latin-1 terminal's argv turns into
    assert error_of(train_gpt2.main, [*SMALL, "--prompt", latin1, "--log_dir", str(tmp_path)]) == \
        "error: --prompt is not UTF-8 text: pass it in UTF-8"
    assert error_of(sample.main, ["-m", "gpt2", "--prompt", latin1]) == \
        "error: --prompt is not UTF-8 text: pass it in UTF-8"
    # a sequence longer than the data: what to change
    error = error_of(train_gpt2.main, [*SMALL, "--seq_len", "1024", "--batch_size", "64", "--total_batch_size",
                                       "65536", "--log_dir", str(tmp_path)])
    assert error.endswith(": pass a smaller --batch_size or --seq_len, or more data"), error
    assert os.listdir(tmp_path) == []


def test_an_empty_master_addr_and_more_processes_than_gpus_are_one_line_each(tmp_path, monkeypatch):
    from machinery.world import init_device
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", ""),
                        ("MASTER_PORT", "29500")):
        monkeypatch.setenv(name, value)
    assert error_of(train_gpt2.main, [*SMALL, "--log_dir", str(tmp_path / "log")]) == (
        "error: MASTER_ADDR is empty: it names the machine of rank 0 (torchrun sets it; under Slurm, the job's "
        "first node)")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a machine of 2 GPUs, its third process
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError) as e:
        init_device("cuda", local_rank=2)
    assert str(e.value) == ("LOCAL_RANK=2, but this machine has 2 GPUs: start at most 2 processes a node "
                            "(--nproc_per_node)")
    assert not (tmp_path / "log").exists()


def test_resuming_another_directorys_older_checkpoint_over_a_newer_one_and_exporting_nowhere_are_refused(tmp_path):
    import export_hf
    args = [*SMALL, "--max_steps", "4", "--checkpoint_every", "2", "--eval_every", "1000", "--val_steps", "2"]
    train_gpt2.main([*args, "--log_dir", str(tmp_path / "a")])  # model_00001.pt, model_00003.pt
    train_gpt2.main([*args, "--max_steps", "2", "--log_dir", str(tmp_path / "b")])
    before = sorted(os.listdir(tmp_path / "a"))
    error = error_of(train_gpt2.main, [*args, "--resume", str(tmp_path / "b" / "model_00001.pt"),
                                       "--log_dir", str(tmp_path / "a")])
    assert error == (f"error: --resume {tmp_path / 'b' / 'model_00001.pt'} is older than {tmp_path / 'a' / 'model_00003.pt'}"
                     f" in --log_dir {tmp_path / 'a'}, which this run would overwrite: resume that one (--resume auto), "
                     "or pass another --log_dir")
    assert sorted(os.listdir(tmp_path / "a")) == before
    assert error_of(export_hf.main, [str(tmp_path / "a" / "model_00003.pt"), str(tmp_path / "no" / "such" / "hf")]) == (
        f"error: {tmp_path / 'no' / 'such'} does not exist: make it first, or choose another place for the export")
