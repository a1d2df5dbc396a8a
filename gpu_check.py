"""What a CUDA GPU shows: its tests, the recipe, same-math candidates, --batch_size auto, the ladder; in one table.

The default recipe runs with HellaSwag in the loop, the candidates beside the default step; the table is kept as it fills.

    python gpu_check.py --skip candidates,auto,ladder --minutes 8    # the core: the GPU tests, then the recipe
    python gpu_check.py --skip tests,recipe,max_autotune,ladder --out gpu_check_out/candidates --minutes 8
    python gpu_check.py --skip tests,recipe,auto,ladder,batch128,loss_chunks,loss_chunks_batch128,compile_step,async_host \
        --out gpu_check_out/autotune --minutes 8                     # max-autotune, which compiles for minutes
    python gpu_check.py --skip tests,recipe,candidates,auto --out gpu_check_out/ladder --minutes 8
    python gpu_check.py --rehearse 1                                 # every part with a 2-layer model, on the CPU too

The parts run in order of value (a short lease gets the most useful rows first); each part, candidate and rung is
guarded on its own: a failure is a row `failed: <one line>` and the command goes on. The table (--out/gpu_check.md)
is rewritten after every row, and the recipe's output streams to --out/recipe_stdout.txt, so a kill at any moment
keeps every finished row. --minutes N skips whatever would start past N minutes by the estimate below (seconds
on one H100, compiling included; an H200 is a little faster) and says so in its row:

    tests 300 | recipe 120 | candidates: default 40 (timed first and last, for the noise), batch128 45, loss_chunks 45,
    loss_chunks_batch128 50, compile_step 60, max_autotune 330, async_host 80 (with the trainer's copies beside it) |
    auto 60 | ladder 120

The commands above: 7.0, 7.0, 6.8 and 2.0 minutes by that estimate. The rehearsal takes about 60 s on 2 CPU cores.
It needs no network: the shards are made from input.txt (tiled to 2M val and 10M train tokens, in fineweb.py's
layout), and HellaSwag is read from a file: the val set if hellaswag.py has downloaded it, else the repo's 201
examples (every 50th). Everything it writes goes to --out. Paste the table into the README with the date.
"""
import argparse
import gc
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

import bench
import hellaswag
from machinery.cli import error_text, on_off, one_line_errors, one_line_flag_errors, run_script
from machinery.memory import choose_batch_size
from machinery.perf import datasheet_tflops, flops_per_token, mfu, peak_memory_gib
from machinery.settings import parse_args
from machinery.shards import write_manifest, write_shard
from machinery.world import World, device_type, init_device
from train_gpt2 import GPT, GPTConfig, PADDED_VOCAB_SIZE, RECIPE, load_text_tokens

ROOT = os.path.dirname(os.path.abspath(__file__))
GPU_TESTS = os.path.join(ROOT, "tests", "test_gpu.py")
PARTS = ("tests", "recipe", "candidates", "auto", "ladder")  # in order of value
# same-math candidates, each measured beside the default compiled step of the default recipe (B=64, bf16): a name for
# --skip, the row's name, the micro-batch, what it sets on the model, and how the step is run (bench.time_training's
# options). A candidate becomes a default only once a GPU measured it faster by more than the noise
CANDIDATES = [
    ("default", "default: compiled, B=64", 64, {}, {}),
    ("batch128", "--batch_size 128", 128, {}, {}),
    ("loss_chunks", "--loss_chunks 8", 64, {"loss_chunks": 8}, {}),
    ("loss_chunks_batch128", "--loss_chunks 8 --batch_size 128", 128, {"loss_chunks": 8}, {}),
    ("compile_step", "--compile_step 1", 64, {}, {"compile_step": True}),
    ("max_autotune", "--compile_mode max-autotune-no-cudagraphs", 64, {}, {"compile_mode": "max-autotune-no-cudagraphs"}),
    # the batches copied from the host in the step, pinned and without blocking, and the loss read at its end: beside the
    # same step copying them as the trainer does (a pageable copy, the loss read before the update)
    ("async_host", "async_host: pinned, non-blocking copies from the host", 64, {}, {"host": "async"}),
]
SEQUENCES = 128  # a candidate's step: 2 micro-batches of 64 sequences, or 1 of 128
# what each item takes on one H100, in seconds, compiling included (see the docstring): what --minutes plans with
ESTIMATES = dict(tests=300, recipe=120, default=40, batch128=45, loss_chunks=45, loss_chunks_batch128=50,
                 compile_step=60, max_autotune=330, async_host=80, auto=60, ladder=120)
SKIPPABLE = (*PARTS, *(name for name, *_ in CANDIDATES[1:]))
# the lecture's rungs, as the H200 measurements of 2026-11-30 ran them: (name, B, vocab, bf16, compile, fused, tf32)
LADDER = [
    ("fp32, TF32 off, eager", 16, PADDED_VOCAB_SIZE, False, False, True, False),
    ("TF32", 16, PADDED_VOCAB_SIZE, False, False, True, True),
    ("bf16 autocast", 16, PADDED_VOCAB_SIZE, True, False, True, True),
    ("bf16, vocabulary 50257 (not padded)", 16, 50257, True, False, True, True),
    ("bf16, AdamW not fused", 16, PADDED_VOCAB_SIZE, True, False, False, True),
    ("bf16 eager", 64, PADDED_VOCAB_SIZE, True, False, True, True),
    ("bf16 + torch.compile", 64, PADDED_VOCAB_SIZE, True, True, True, True),
]
# --rehearse 1: a 2-layer model, short sequences, a 16th of the rows, few steps: the command checked on any device
REHEARSAL = dict(n_layer=2, n_head=2, n_embd=64)
REHEARSAL_SCALE = 16
REHEARSAL_RECIPE = ["--n_layer", "2", "--n_head", "2", "--n_embd", "64", "--seq_len", "128", "--batch_size", "16",
                    "--total_batch_size", "4096", "--max_steps", "4", "--warmup_steps", "1", "--eval_every", "2",
                    "--sample_every", "2", "--checkpoint_every", "2", "--val_steps", "2", "--val_batch_size", "16"]
STEP_LINE = re.compile(r"^step +(\d+) \| loss ([\d.]+) .*?\| dt ([\d.]+)ms \| tok/sec ([\d.]+) \| mfu ([\d.]+)% "
                       r"\| eta \S+(?: \| mem ([\d.]+) GiB)?$", re.M)
HEADER = ["| what | B | ms/step | tok/s | MFU (datasheet bf16) | peak GiB | notes |", "|---|---|---|---|---|---|---|"]


class Table:
    """The rows so far, printed as each comes and written whole to path after every one (a kill keeps them)."""

    def __init__(self, path, title):
        self.path, self.title, self.rows, self.t0 = path, title, [], time.time()

    def add(self, what, B="", ms="", tok_s="", mfu="", peak="", notes=""):
        self.rows.append((what, B, ms, tok_s, mfu, peak, notes))
        print(f"  {' | '.join(str(c) for c in self.rows[-1])}", flush=True)
        self.write()

    def text(self):
        lines = [f"GPU check: {self.title}; {time.time() - self.t0:.0f} s in all", "", *HEADER]
        return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in self.rows]) + "\n"

    def write(self):
        with open(self.path + ".tmp", "w") as f:
            f.write(self.text())
        os.replace(self.path + ".tmp", self.path)  # whole or not at all, whenever the command is killed


class Plan:
    """What runs: not skipped by name, and, under --minutes, not estimated to end past the budget."""

    def __init__(self, skip, minutes, table):
        self.skip, self.budget, self.table, self.t0 = skip, minutes * 60 if minutes else None, table, time.time()

    def runs(self, name, what):
        if name in self.skip:
            return False
        left = self.budget - (time.time() - self.t0) if self.budget is not None else None
        if left is not None and ESTIMATES[name] > left:
            self.table.add(what, notes=f"skipped: estimated {ESTIMATES[name]} s, {max(0, left):.0f} s of --minutes "
                                       f"{self.budget / 60:g} left")
            return False
        return True


def guarded(table, what, measure):
    """measure(), whose failure becomes the row `failed: <one line>`; the command goes on either way. True if it ran."""
    try:
        measure()
        return True
    except Exception as e:  # out of memory, a compile error, a bug in one candidate: the other rows still come
        table.add(what, notes=f"failed: {type(e).__name__}: {error_text(e)}"[:300])
        return False
    finally:
        free()


def free():
    gc.collect()
    torch._dynamo.reset()  # each measurement compiles afresh: no graphs or guards carried from the one before
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def make_shards(out):
    """input.txt's tokens tiled into a val shard of 2M tokens and a train shard of 10M, with fineweb.py's manifest."""
    path = os.path.join(out, "shards")
    os.makedirs(path, exist_ok=True)
    tokens = load_text_tokens(os.path.join(ROOT, "input.txt"))
    records = [write_shard(path, i, np.resize(tokens, n)) for i, n in enumerate((2_000_000, 10_000_000))]
    write_manifest(path, {"source": "input.txt, tiled (gpu_check.py)"}, records)
    return path


def step_figures(model, B, T, device, steps=10, **setting):
    """ms/step, tok/s, MFU (of the datasheet bf16 peak) and peak GiB of one training step, and its first losses."""
    flops = flops_per_token(sum(p.numel() for p in model.parameters()), model.config, T)
    accum = setting.get("accum", 1)
    on_gpu = device_type(device) == "cuda"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = bench.time_training(model, B, T, device, steps=steps, warmup=3 if on_gpu else 1, **setting)
    ms = statistics.median(times) * 1000
    tok_s = B * accum * T / ms * 1000
    held = peak_memory_gib(device)
    return dict(ms=ms, tok_s=tok_s, mfu=mfu(tok_s, flops, datasheet_tflops(device) or float("nan")),
                peak=float("nan") if held is None else held, losses=losses)


def figure_cells(f):
    return f"{f['ms']:.1f}", f"{f['tok_s']:,.0f}", f"{100 * f['mfu']:.1f}%", f"{f['peak']:.2f}"


def run_tests(out, device, table):
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", GPU_TESTS],
                          capture_output=True, text=True, cwd=ROOT)
    with open(os.path.join(out, "tests_stdout.txt"), "w") as f:
        f.write(done.stdout + done.stderr)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else error_text(done.stderr or "no output")
    skipped = re.search(r"(\d+) skipped", summary)
    if done.returncode != 0:
        summary = f"failed: {summary}"
    elif skipped and device.startswith("cuda"):  # on a GPU every GPU test must run: a skip hides what it checks
        summary = f"failed: {skipped.group(1)} GPU tests skipped on a CUDA GPU ({summary})"
    table.add("GPU tests (tests/test_gpu.py)", notes=summary)


def recipe_command(out, hellaswag_file, device, rehearse):
    """The default recipe for 30 steps, as the H200 measurements ran it (B=32 on a GPU of 48 GiB or less), and its B."""
    on_gpu = device.startswith("cuda")
    memory = torch.cuda.get_device_properties(device).total_memory / 2**30 if on_gpu else 0
    B = 64 if memory > 48 else 32  # B=64 peaks at 41 GiB compiled
    batch = ["--batch_size", str(B)]
    if rehearse:
        B, batch = 16, REHEARSAL_RECIPE + ([] if on_gpu else ["--device", "cpu", "--compile", "0"])
    return [sys.executable, os.path.join(ROOT, "train_gpt2.py"), "--data", os.path.join(out, "shards"), "--max_steps",
            "30", "--warmup_steps", "10", "--eval_every", "15", "--sample_every", "15", "--checkpoint_every", "20",
            "--hellaswag_file", hellaswag_file, "--log_dir", os.path.join(out, "recipe_log"), *batch], B


def run_streamed(cmd, path):
    """cmd in a process of its own, its stdout streamed line by line to path (a kill keeps what came), its stderr's
    last line raised as the failure if it fails. The text it printed."""
    with open(path, "w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if done.returncode != 0:
        last = done.stderr.strip().splitlines()[-1:] or ["no message on stderr"]
        raise RuntimeError(f"exit {done.returncode}: {last[0]}")
    with open(path) as f:
        return f.read()


def step_lines(text, what):
    steps = STEP_LINE.findall(text)
    if len(steps) < 2:
        raise RuntimeError(f"{len(steps)} step lines in {what}'s output: expected one a step")
    return steps


def run_recipe(out, cmd, B, table):
    """The shards, then the recipe, whose row has its steps' median speed (step 0 compiles), peak memory, losses and
    HellaSwag's seconds."""
    make_shards(out)
    print("  " + " ".join(cmd[1:]), flush=True)
    text = run_streamed(cmd, os.path.join(out, "recipe_stdout.txt"))
    steps = step_lines(text, "the recipe")
    timed = steps[1:]
    hella = re.findall(r"HellaSwag accuracy: ([\d.]+) over (\d+) examples \(([\d.]+) s\)", text)
    table.add(f"default recipe, {len(steps)} steps", B, f"{statistics.median(float(s[2]) for s in timed):.1f}",
              f"{statistics.median(float(s[3]) for s in timed):,.0f}", f"{statistics.median(float(s[4]) for s in timed):.1f}%",
              f"{max(float(s[5] or 'nan') for s in steps):.2f}",
              f"step 0 {float(steps[0][2]) / 1000:.1f} s; loss {steps[0][1]} -> {steps[-1][1]}; HellaSwag over "
              f"{hella[0][1] if hella else 0} examples: " + ", ".join(f"{h[2]} s" for h in hella))


def shape_of(rehearse):
    return (REHEARSAL, 128, REHEARSAL_SCALE) if rehearse else ({}, 1024, 1)


def run_candidate(what, B, changes, step, device, rehearse, base, table):
    """A candidate's ms/step, tok/s, MFU and peak memory beside the default's (base: its figures, None before it or
    if it failed), and its first losses beside the default's (the same math: within bf16 noise). Its figures."""
    shape, T, scale = shape_of(rehearse)
    on_gpu = device.startswith("cuda")
    torch.manual_seed(1337)
    model = GPT(GPTConfig(block_size=T, vocab_size=PADDED_VOCAB_SIZE, **shape)).to(device)
    for attribute, value in changes.items():
        setattr(model, attribute, value)
    B, t0 = B // scale, time.time()
    settings = dict(steps=2 if rehearse else 10, bf16=on_gpu, compile=on_gpu, accum=SEQUENCES // scale // B)
    against = "the default"
    if "host" in step:  # beside the same step with the batches copied as the trainer copies them
        torch.manual_seed(1337)
        plain = GPT(GPTConfig(block_size=T, vocab_size=PADDED_VOCAB_SIZE, **shape)).to(device)
        base, against = step_figures(plain, B, T, device, **settings, host="plain"), "the trainer's copies"
        del plain
    f = step_figures(model, B, T, device, **settings, **step)
    base = base or f
    drift = max(abs(a - b) for a, b in zip(f["losses"], base["losses"]))
    table.add(f"candidate: {what}", B, *figure_cells(f), f"{base['ms'] / f['ms']:.3f}x {against}; {time.time() - t0:.0f} "
              f"s with compiling; losses within {drift:.1e} of those of {against}: " + " ".join(f"{x:.4f}" for x in f["losses"][:10]))
    return dict(f, speedup=base["ms"] / f["ms"])


def run_candidates(device, rehearse, plan, table):
    """The default step, each candidate, and the default again: the two defaults' difference is the noise a
    candidate must beat to be worth making default."""
    again = ("default", "default again, for the noise", *CANDIDATES[0][2:])
    runs = {}  # each name's figures, run by run
    for name, what, B, changes, step in [*CANDIDATES, again]:
        if plan.runs(name, f"candidate: {what}"):
            base = (runs.get("default") or [None])[0]
            f = []
            if guarded(table, f"candidate: {what}",
                       lambda: f.append(run_candidate(what, B, changes, step, device, rehearse, base, table))):
                runs.setdefault(name, []).extend(f)
    if not runs:
        return  # none ran: each row already says why
    if len(runs.get("default", [])) < 2:
        table.add("candidates to make default", notes="none: the default did not run twice, so the noise is unknown")
        return
    best = min(f["ms"] for f in runs["default"])
    noise = abs(runs["default"][0]["ms"] - runs["default"][1]["ms"]) / best
    margin = max(2 * noise, 0.01)  # faster by more than twice what the same step varies by, and by 1% at least
    speedup = {name: best / f[0]["ms"] if "host" not in step else f[0]["speedup"]
               for (name, what, B, changes, step) in CANDIDATES[1:] for f in [runs.get(name)] if f}
    faster = [what for name, what, *_ in CANDIDATES[1:] if speedup.get(name, 0) > 1 + margin]
    table.add("candidates to make default", notes=f"{', '.join(faster) or 'none'} (faster than the default's better "
                                                 f"time by more than {margin:.1%}; its two times differ by {noise:.1%})")


def run_auto(device, rehearse, table):
    """--batch_size auto for the default recipe, then a few training steps at the B it chose, AdamW included."""
    on_gpu = device.startswith("cuda")
    cfg = parse_args(["--batch_size", "auto", "--bf16", str(int(on_gpu)), "--compile", str(int(on_gpu))] +
                     (REHEARSAL_RECIPE if rehearse else []), RECIPE)  # the default recipe: GPT-2 124M, compiled
    torch.manual_seed(1337)
    model = GPT(GPTConfig(block_size=cfg.seq_len, vocab_size=PADDED_VOCAB_SIZE, n_layer=cfg.n_layer,
                          n_head=cfg.n_head, n_embd=cfg.n_embd))
    t0 = time.time()
    chosen = choose_batch_size(cfg, World(device=device), model, log=lambda line: None)
    chose = time.time() - t0
    free()
    f = step_figures(model.to(device), chosen, cfg.seq_len, device, steps=1 if rehearse else 3, bf16=cfg.bf16,
                     compile=cfg.compile)
    table.add("--batch_size auto, the default recipe", chosen, *figure_cells(f),
              f"chosen in {chose:.0f} s; {len(f['losses'])} steps trained at it, losses " +
              " ".join(f"{x:.4f}" for x in f["losses"]))


def run_rung(rung, device, rehearse, table):
    name, B, vocab, bf16, compile, fused, tf32 = rung
    shape, T, scale = shape_of(rehearse)
    torch.manual_seed(1337)
    model = GPT(GPTConfig(block_size=T, vocab_size=vocab, **shape)).to(device)
    on_gpu = device.startswith("cuda")  # a CPU: fp32, eager
    f = step_figures(model, max(1, B // scale), T, device, steps=2 if rehearse else 10, bf16=bf16 and on_gpu,
                     compile=compile and on_gpu, fused=fused, tf32=tf32)
    table.add(f"ladder: {name}", max(1, B // scale), *figure_cells(f))


def main(argv=None):
    p = one_line_flag_errors(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    p.add_argument("--out", default="gpu_check_out", help="where the shards, the runs' output and the table go")
    p.add_argument("--hellaswag_file", default="", help="a HellaSwag jsonl (default: the downloaded val set, else "
                                                         "tests/fixtures/hellaswag_val_every50.jsonl)")
    p.add_argument("--rehearse", type=on_off, default=False, help="every part with a 2-layer model and a few steps, "
                                                                    "on the GPU or the CPU: the command checked end to end")
    p.add_argument("--skip", default="", help=f"what to leave out, comma-separated: parts ({', '.join(PARTS)}) or "
                                              f"candidates ({', '.join(SKIPPABLE[len(PARTS):])})")
    p.add_argument("--minutes", type=float, default=0, help="skip whatever would start past this many minutes, by "
                                                            "the estimates in this file's docstring (0: no limit)")
    args = p.parse_args(argv)
    with one_line_errors():
        skip = set(filter(None, args.skip.split(",")))
        if skip - set(SKIPPABLE):
            raise ValueError(f"--skip {args.skip!r}: the parts are {', '.join(PARTS)}; the candidates "
                             f"{', '.join(SKIPPABLE[len(PARTS):])}")
        if args.minutes < 0:
            raise ValueError(f"--minutes {args.minutes:g}: pass a number of minutes, or 0 for no limit")
        if not torch.cuda.is_available() and not args.rehearse:
            raise ValueError("no CUDA GPU here: this command measures one (--rehearse 1 checks it on the CPU)")
        device = init_device("cuda" if torch.cuda.is_available() else "cpu")
        cached = os.path.join(hellaswag.DATA_CACHE_DIR, "hellaswag_val.jsonl")
        hellaswag_file = args.hellaswag_file or (cached if os.path.isfile(cached) else
                                                 os.path.join(ROOT, "tests", "fixtures", "hellaswag_val_every50.jsonl"))
        if not os.path.isfile(hellaswag_file):
            raise ValueError(f"--hellaswag_file {hellaswag_file!r} not found")
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            raise ValueError(f"--out {args.out!r} is a file: pass a directory for the check's table and runs")
        os.makedirs(args.out, exist_ok=True)
    title = (f"{bench.machine_name(device)}" + (f" ({torch.cuda.get_device_properties(device).total_memory / 2**30:.1f} GiB)"
             if device.startswith("cuda") else "") + f", torch {torch.__version__}, CUDA {torch.version.cuda}, "
             f"{time.strftime('%Y-%m-%d')}" + (", a rehearsal (2-layer model)" if args.rehearse else ""))
    print(f"gpu check: {title}", flush=True)
    table = Table(os.path.join(args.out, "gpu_check.md"), title)
    table.write()  # the header at once: the file is there from the first second
    plan = Plan(skip, args.minutes, table)
    if plan.runs("tests", "GPU tests (tests/test_gpu.py)"):
        print("1. the GPU tests (pytest -m gpu)", flush=True)
        guarded(table, "GPU tests (tests/test_gpu.py)", lambda: run_tests(args.out, device, table))
    if plan.runs("recipe", "default recipe"):
        print("2. the default recipe, 30 steps, HellaSwag in the loop", flush=True)
        shutil.rmtree(os.path.join(args.out, "recipe_log"), ignore_errors=True)  # this command's run of before: afresh
        cmd, B = recipe_command(args.out, hellaswag_file, device, args.rehearse)
        guarded(table, "default recipe", lambda: run_recipe(args.out, cmd, B, table))
    if "candidates" not in skip:  # each candidate asks the plan itself
        print("3. same-math candidates beside the default step, the default timed twice", flush=True)
        run_candidates(device, args.rehearse, plan, table)
    if plan.runs("auto", "--batch_size auto"):
        print("4. --batch_size auto for the default recipe, and steps at its choice", flush=True)
        guarded(table, "--batch_size auto", lambda: run_auto(device, args.rehearse, table))
    if plan.runs("ladder", "ladder"):
        print("5. the speed ladder: one training step of GPT-2 124M at T=1024", flush=True)
        for rung in LADDER:
            guarded(table, f"ladder: {rung[0]}", lambda: run_rung(rung, device, args.rehearse, table))
    table.write()
    print("\n" + table.text(), end="")


if __name__ == "__main__":
    run_script(main)
