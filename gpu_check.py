"""One command for whoever holds a CUDA GPU: the GPU tests, the lecture's speed ladder, same-math candidates beside the
default step, --batch_size auto, and the default recipe for 30 steps with HellaSwag in the loop; then one table.

    python gpu_check.py                      # 8 to 10 minutes on an H100 or H200
    python gpu_check.py --skip tests,ladder  # only what is left
    python gpu_check.py --rehearse 1         # every part with a 2-layer model, on the CPU too: a minute

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
from machinery.cli import on_off, one_line_errors, run_script
from machinery.memory import choose_batch_size
from machinery.perf import datasheet_tflops, flops_per_token
from machinery.settings import parse_args
from machinery.shards import write_manifest, write_shard
from machinery.world import World, init_device
from train_gpt2 import GPT, GPTConfig, PADDED_VOCAB_SIZE, load_text_tokens

ROOT = os.path.dirname(os.path.abspath(__file__))
PARTS = ("tests", "ladder", "candidates", "auto", "recipe")
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


def make_shards(out):
    """input.txt's tokens tiled into a val shard of 2M tokens and a train shard of 10M, with fineweb.py's manifest."""
    path = os.path.join(out, "shards")
    os.makedirs(path, exist_ok=True)
    tokens = load_text_tokens(os.path.join(ROOT, "input.txt"))
    records = [write_shard(path, i, np.resize(tokens, n)) for i, n in enumerate((2_000_000, 10_000_000))]
    write_manifest(path, {"source": "input.txt, tiled (gpu_check.py)"}, records)
    return path


def free():
    gc.collect()
    torch._dynamo.reset()  # each rung compiles afresh: no graphs or guards carried from the one before
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --rehearse 1: a 2-layer model, short sequences, few steps: the whole command checked in a minute, on any device
REHEARSAL = dict(n_layer=2, n_head=2, n_embd=64)
REHEARSAL_RECIPE = ["--n_layer", "2", "--n_head", "2", "--n_embd", "64", "--seq_len", "128", "--batch_size", "16",
                    "--total_batch_size", "4096", "--max_steps", "4", "--warmup_steps", "1", "--eval_every", "2",
                    "--sample_every", "2", "--checkpoint_every", "2", "--val_steps", "2"]


def step_figures(model, B, T, device, flops, steps=10, **setting):
    """ms/step, tok/s, MFU (of the datasheet bf16 peak) and peak GiB of one training step, and its first losses."""
    accum = setting.get("accum", 1)
    on_gpu = device.startswith("cuda")
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = bench.time_training(model, B, T, device, steps=steps, warmup=3 if on_gpu else 1, **setting)
    ms = statistics.median(times) * 1000
    tok_s = B * accum * T / ms * 1000
    return dict(ms=ms, tok_s=tok_s, mfu=tok_s * flops / (datasheet_tflops(device) or float("nan")) / 1e12,
                peak=torch.cuda.max_memory_allocated(device) / 2**30 if on_gpu else float("nan"), losses=losses)


def run_ladder(device, rows, rehearse):
    shape, T = (REHEARSAL, 128) if rehearse else ({}, 1024)
    for name, B, vocab, bf16, compile, fused, tf32 in LADDER:
        torch.manual_seed(1337)
        model = GPT(GPTConfig(block_size=T, vocab_size=vocab, **shape)).to(device)
        flops = flops_per_token(sum(p.numel() for p in model.parameters()), model.config, T)
        bf16, compile = bf16 and device.startswith("cuda"), compile and device.startswith("cuda")  # a CPU: fp32, eager
        f = step_figures(model, B, T, device, flops, steps=2 if rehearse else 10, bf16=bf16, compile=compile,
                         fused=fused, tf32=tf32)
        rows.append((f"ladder: {name}", B, f"{f['ms']:.1f}", f"{f['tok_s']:,.0f}", f"{100 * f['mfu']:.1f}%",
                     f"{f['peak']:.2f}", ""))
        print(f"  {rows[-1]}", flush=True)
        del model
        free()


# same-math candidates, each measured beside the default compiled step of the default recipe (B=64, bf16): a name, the
# micro-batch, what it sets on the model, and how the step is run (bench.time_training's options); a candidate becomes a default only once a GPU
# measured it faster. --async_host changes the trainer's loop, not the step: it is measured with the recipe (part 5)
SEQUENCES = 128  # a candidate's step: 2 micro-batches of 64 sequences, or 1 of 128
CANDIDATES = [
    ("default: compiled, B=64", 64, {}, {}),
    ("--batch_size 128", 128, {}, {}),
    ("--loss_chunks 8", 64, {"loss_chunks": 8}, {}),
    ("--loss_chunks 8 --batch_size 128", 128, {"loss_chunks": 8}, {}),
    ("--compile_step 1", 64, {}, {"compile_step": True}),
    ("--compile_mode max-autotune-no-cudagraphs", 64, {}, {"compile_mode": "max-autotune-no-cudagraphs"}),
]


def run_candidates(device, rows, rehearse):
    """Each candidate's ms/step, tok/s, MFU and peak memory beside the default's, its first losses beside the
    default's (the same math: within bf16 noise), and which of them are faster."""
    shape, T = (REHEARSAL, 128) if rehearse else ({}, 1024)
    on_gpu = device.startswith("cuda")
    figures = {}
    for name, B, changes, step in CANDIDATES:
        torch.manual_seed(1337)
        model = GPT(GPTConfig(block_size=T, vocab_size=PADDED_VOCAB_SIZE, **shape)).to(device)
        for attribute, value in changes.items():
            setattr(model, attribute, value)
        flops = flops_per_token(sum(p.numel() for p in model.parameters()), model.config, T)
        scale = 16 if rehearse else 1  # the rehearsal's steps: 8 sequences
        B, t0, f = B // scale, time.time(), None
        try:  # each step: the same sequences, in micro-batches of B
            f = figures[name] = step_figures(model, B, T, device, flops, steps=2 if rehearse else 10, bf16=on_gpu,
                                             compile=on_gpu, accum=SEQUENCES // scale // B, **step)
        except torch.OutOfMemoryError:
            pass
        del model
        free()
        if f is None:
            rows.append((f"candidate: {name}", B, "", "", "", "", "out of memory on this GPU"))
            continue
        base = figures[CANDIDATES[0][0]]
        drift = max(abs(a - b) for a, b in zip(f["losses"], base["losses"]))
        rows.append((f"candidate: {name}", B, f"{f['ms']:.1f}", f"{f['tok_s']:,.0f}", f"{100 * f['mfu']:.1f}%",
                     f"{f['peak']:.2f}", f"{base['ms'] / f['ms']:.3f}x the default; {time.time() - t0:.0f} s with "
                     f"compiling; losses within {drift:.1e} of its: " + " ".join(f"{x:.4f}" for x in f["losses"][:10])))
        print(f"  {rows[-1]}", flush=True)
    faster = [name for name, *_ in CANDIDATES[1:] if name in figures and figures[name]["ms"] < figures[CANDIDATES[0][0]]["ms"]]
    rows.append(("candidates to make default", "", "", "", "", "", ", ".join(faster) or "none: the default is fastest"))


def run_auto(device, rows, rehearse):
    on_gpu = device.startswith("cuda")
    cfg = parse_args(["--batch_size", "auto", "--bf16", str(int(on_gpu)), "--compile", str(int(on_gpu))] +
                     (REHEARSAL_RECIPE if rehearse else []))  # the default recipe: GPT-2 124M, compiled
    torch.manual_seed(1337)
    model = GPT(GPTConfig(block_size=cfg.seq_len, vocab_size=PADDED_VOCAB_SIZE, n_layer=cfg.n_layer,
                          n_head=cfg.n_head, n_embd=cfg.n_embd))
    t0 = time.time()
    chosen = choose_batch_size(cfg, World(device=device), model)
    rows.append(("--batch_size auto, the default recipe", chosen, "", "", "", "", f"chosen in {time.time() - t0:.0f} s"))
    del model
    free()


def run_recipe(out, shards, hellaswag_file, rows, device, rehearse):
    """The default recipe for 30 steps, as the H200 measurements ran it, in a process of its own."""
    log_dir = os.path.join(out, "recipe_log")
    for old in (log_dir, os.path.join(out, "async_log")):  # this command's own runs of before: a run starts afresh
        shutil.rmtree(old, ignore_errors=True)
    on_gpu = device.startswith("cuda")
    memory = torch.cuda.get_device_properties(device).total_memory / 2**30 if on_gpu else 0
    batch = [] if memory > 48 or rehearse else ["--batch_size", "32"]  # B=64 peaks at 41 GiB compiled
    if rehearse:
        batch = REHEARSAL_RECIPE + ([] if on_gpu else ["--device", "cpu", "--compile", "0"])
    cmd = [sys.executable, os.path.join(ROOT, "train_gpt2.py"), "--data", shards, "--max_steps", "30",
           "--warmup_steps", "10", "--eval_every", "15", "--sample_every", "15", "--checkpoint_every", "20",
           "--hellaswag_file", hellaswag_file, "--log_dir", log_dir, *batch]
    print("  " + " ".join(cmd[1:]), flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True)
    with open(os.path.join(out, "recipe_stdout.txt"), "w") as f:
        f.write(done.stdout + done.stderr)
    if done.returncode != 0:
        rows.append(("default recipe, 30 steps", "", "", "", "", "", f"failed: {done.stderr.strip()[-300:]}"))
        return
    steps = re.findall(r"^step +(\d+) \| loss ([\d.]+) .*?\| dt ([\d.]+)ms \| tok/sec ([\d.]+) \| mfu ([\d.]+)% "
                       r"\| eta \S+(?: \| mem ([\d.]+) GiB)?$", done.stdout, re.M)
    timed = [s for s in steps if int(s[0]) > 0]  # step 0 compiles
    hella = re.findall(r"HellaSwag accuracy: ([\d.]+) over (\d+) examples \(([\d.]+) s\)", done.stdout)
    default_ms = statistics.median(float(s[2]) for s in timed)
    rows.append((f"default recipe, {len(steps)} steps", batch[batch.index("--batch_size") + 1] if batch else 64, f"{statistics.median(float(s[2]) for s in timed):.1f}",
                 f"{statistics.median(float(s[3]) for s in timed):,.0f}", f"{statistics.median(float(s[4]) for s in timed):.1f}%",
                 f"{max(float(s[5] or 'nan') for s in steps):.2f}",
                 f"step 0 {float(steps[0][2]) / 1000:.1f} s; loss {steps[0][1]} -> {steps[-1][1]}; HellaSwag over "
                 f"{hella[0][1] if hella else 0} examples: " + ", ".join(f"{h[2]} s" for h in hella)))
    # --async_host, the candidate that changes the loop: the same recipe's first 12 steps, no evaluation in between
    quiet = ["--max_steps", "3" if rehearse else "12", "--hellaswag", "0", "--eval_every", "1000", "--val_steps", "1", "--sample_every", "1000",
             "--log_dir", os.path.join(out, "async_log"), "--async_host", "1"]
    done = subprocess.run(cmd + quiet, capture_output=True, text=True)  # later flags win over the recipe's
    candidate = re.findall(r"^step +(\d+) \| loss ([\d.]+) .*?\| dt ([\d.]+)ms \| tok/sec ([\d.]+) \| mfu ([\d.]+)% ",
                           done.stdout, re.M)
    if done.returncode != 0 or len(candidate) < 2:
        rows.append(("candidate: --async_host 1", "", "", "", "", "", f"failed: {done.stderr.strip()[-300:]}"))
        return
    ms = statistics.median(float(s[2]) for s in candidate[1:])
    warmup = 1 if rehearse else 10  # the steps whose learning rate does not depend on --max_steps
    drift = max(abs(float(a[1]) - float(b[1])) for a, b in zip(candidate[:warmup], steps[:warmup]))
    rows.append((f"candidate: --async_host 1 (the trainer, {len(candidate)} steps)", rows[-1][1], f"{ms:.1f}",
                 f"{statistics.median(float(s[3]) for s in candidate[1:]):,.0f}",
                 f"{statistics.median(float(s[4]) for s in candidate[1:]):.1f}%", "",
                 f"{default_ms / ms:.3f}x the recipe's steps ({'faster: make it default' if ms < default_ms else 'not faster'}); "
                 f"the {warmup} warmup steps' losses within {drift:.1e} of the recipe's: "
                 + " ".join(s[1] for s in candidate[:warmup])))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="gpu_check_out", help="where the shards, the run's log and the table go")
    p.add_argument("--hellaswag_file", default="", help="a HellaSwag jsonl (default: the downloaded val set, else "
                                                         "tests/fixtures/hellaswag_val_every50.jsonl)")
    p.add_argument("--rehearse", type=on_off, default=False, help="every part with a 2-layer model and a few steps, "
                                                                    "on the GPU or the CPU: the command checked end to end")
    p.add_argument("--skip", default="", help=f"parts to leave out, comma-separated: {', '.join(PARTS)}")
    args = p.parse_args(argv)
    with one_line_errors():
        skip = set(filter(None, args.skip.split(",")))
        if skip - set(PARTS):
            raise ValueError(f"--skip {args.skip!r}: the parts are {', '.join(PARTS)}")
        if not torch.cuda.is_available() and not args.rehearse:
            raise ValueError("no CUDA GPU here: this command measures one (--rehearse 1 checks it on the CPU)")
        device = init_device("cuda" if torch.cuda.is_available() else "cpu")
        cached = os.path.join(hellaswag.DATA_CACHE_DIR, "hellaswag_val.jsonl")
        hellaswag_file = args.hellaswag_file or (cached if os.path.isfile(cached) else
                                                 os.path.join(ROOT, "tests", "fixtures", "hellaswag_val_every50.jsonl"))
        if not os.path.isfile(hellaswag_file):
            raise ValueError(f"--hellaswag_file {hellaswag_file!r} not found")
        os.makedirs(args.out, exist_ok=True)
    t_start, rows = time.time(), []
    title = (f"{bench.machine_name(device)}" + (f" ({torch.cuda.get_device_properties(device).total_memory / 2**30:.1f} GiB)"
             if device.startswith("cuda") else "") + f", torch {torch.__version__}, CUDA {torch.version.cuda}, "
             f"{time.strftime('%Y-%m-%d')}" + (", a rehearsal (2-layer model)" if args.rehearse else ""))
    print(f"gpu check: {title}", flush=True)
    if "tests" not in skip:
        print("1. the GPU tests (pytest -m gpu)", flush=True)
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", os.path.join(ROOT, "tests", "test_gpu.py")],
                              capture_output=True, text=True, cwd=ROOT)
        summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr.strip()[-200:]
        with open(os.path.join(args.out, "tests_stdout.txt"), "w") as f:
            f.write(done.stdout + done.stderr)
        rows.append(("GPU tests (tests/test_gpu.py)", "", "", "", "", "", summary))
        print(f"  {summary}", flush=True)
    if "ladder" not in skip:
        print("2. the speed ladder: one training step of GPT-2 124M at T=1024", flush=True)
        run_ladder(device, rows, args.rehearse)
    if "candidates" not in skip:
        print("3. same-math candidates beside the default step", flush=True)
        run_candidates(device, rows, args.rehearse)
    if "auto" not in skip:
        print("4. --batch_size auto for the default recipe", flush=True)
        run_auto(device, rows, args.rehearse)
    if "recipe" not in skip:
        print("5. the default recipe, 30 steps, HellaSwag in the loop", flush=True)
        run_recipe(args.out, make_shards(args.out), hellaswag_file, rows, device, args.rehearse)
    table = [f"GPU check: {title}; {time.time() - t_start:.0f} s in all", "",
             "| what | B | ms/step | tok/s | MFU (datasheet bf16) | peak GiB | notes |", "|---|---|---|---|---|---|---|"]
    table += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    print("\n" + "\n".join(table))
    with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
        f.write("\n".join(table) + "\n")


if __name__ == "__main__":
    run_script(main)
