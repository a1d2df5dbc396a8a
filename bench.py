"""Throughput of train_gpt2.py's model: training tokens/s, MFU and peak memory for one setting, or
HellaSwag examples/s, or sampling tokens/s with and without the KV cache.

    python bench.py --n_layer 12 --n_head 12 --n_embd 768 --batch_size 16 --seq_len 1024
    python bench.py --hellaswag tests/fixtures/hellaswag_val_every50.jsonl --device cpu --n_layer 4 --n_head 4 --n_embd 128
    python bench.py --generate 256 --batch_size 4 --device cpu

It times whole training steps (forward, backward, clipping, AdamW) on random tokens made on the
device, so data loading is not measured (--host plain: copied from the host each micro-step, as the
trainer does; --host async: as the async_host candidate would). MFU is achieved FLOP/s over the device's peak: the peak is measured
here with a large matmul in the step's precision, and also taken from the datasheet where the
device is a GPU this file knows. With --hellaswag it times scoring that file instead, with
hellaswag.predict and with a plain loop that scores one example at a time, on the same model. With
--generate N it times GPT.generate making N tokens after a one-token prompt for --batch_size rows,
with each layer's keys and values cached and without (the whole prefix again for every token).
"""
import argparse
import os
import platform
import resource
import statistics
import time

import torch
from torch.nn import functional as F
from torch.profiler import ProfilerActivity, profile

import hellaswag
from machinery.cli import auto_on_off, on_off, one_line_errors, one_line_flag_errors, run_script
from machinery.perf import datasheet_tflops, flops_per_token, measured_tflops, mfu, peak_memory_gib
from machinery.world import bf16_fast, device_type, init_device, maybe_compile, synchronize
from tokenizer import GPT2_VOCAB_SIZE, gpt2_encoding
from train_gpt2 import GPT, PADDED_VOCAB_SIZE, GPTConfig, clip_and_step, pick_device

def machine_name(device):
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


def bench_hellaswag(model, examples, path, device, use_bf16):
    """Examples/s of hellaswag.predict and of the plain loop, on the same model and examples."""
    scorers = {"plain loop, an example a pass": lambda ex: hellaswag.plain_predictions(lambda x: model(x)[0], ex, device,
                                                                                        use_bf16),
               "hellaswag.predict": lambda ex: hellaswag.predict(model, ex, device, use_bf16=use_bf16)}
    seconds, preds = {}, {}
    for name, score in scorers.items():
        score(examples[:4])  # warm-up: the allocator, the kernels' first calls
        synchronize(device)
        t0 = time.time()
        preds[name] = score(examples)
        synchronize(device)
        seconds[name] = time.time() - t0
    print(f"hellaswag: {len(examples)} examples of {path}, bf16={int(use_bf16)}")
    plain = seconds["plain loop, an example a pass"]
    for name, s in seconds.items():
        print(f"{name:30s} {s:8.2f} s | {len(examples) / s:8.1f} examples/s | {plain / s:.2f}x the plain loop")
    same = sum(a == b for a, b in zip(*preds.values()))
    print(f"same predictions: {same} of {len(examples)}")


def bench_generate(model, rows, new_tokens, device, use_bf16):
    """Sampling tokens/s of GPT.generate with the KV cache and without, from the same seed; and whether they agree."""
    idx = torch.full((rows, 1), gpt2_encoding().eot_token, device=device)  # a document's start
    out, seconds = {}, {}
    for cached in (True, False):
        model.generate(idx, 2, kv_cache=cached)  # warm-up
        synchronize(device)
        t0 = time.time()
        with torch.autocast(device_type=device_type(device), dtype=torch.bfloat16, enabled=use_bf16):
            out[cached] = model.generate(idx, new_tokens, generator=torch.Generator(device).manual_seed(42),
                                         kv_cache=cached)
        synchronize(device)
        seconds[cached] = time.time() - t0
    print(f"sampling: {rows} rows x {new_tokens} new tokens, top-k 50, bf16={int(use_bf16)}")
    for cached, name in ((True, "with the KV cache"), (False, "without (the prefix again)")):
        print(f"{name:28s} {seconds[cached]:8.2f} s | {rows * new_tokens / seconds[cached]:10.1f} tokens/s | "
              f"{seconds[False] / seconds[cached]:.2f}x the uncached")
    print(f"same tokens: {torch.equal(out[True], out[False])}")


def to_device(batch, device, pinned=False):
    """A batch's tensors on the device, as the trainer copies them (pinned False), or as the async_host candidate does
    (CUDA): copied from page-locked memory without blocking, so the host
    goes on queueing the forward pass; a plain copy from pageable memory waits until the GPU has drained its queue."""
    if pinned and device.startswith("cuda"):
        return tuple(t.pin_memory().to(device, non_blocking=True) for t in batch)
    return tuple(t.to(device) for t in batch)


def compile_update(update, optimizer):
    """compile_step, a candidate: update (clipping and AdamW's step) as one compiled graph, beside the compiled model. Its
    learning rates become tensors, which the loop changes in place: a float would be a constant in the graph, and each
    new one would compile it again. AdamW runs its foreach code, which compile fuses; its fused kernel is opaque."""
    for group in optimizer.param_groups:
        group["lr"] = torch.tensor(float(group["lr"]))
        group["fused"], group["foreach"] = False, None  # None: foreach wherever AdamW can
    return torch.compile(update)


def time_training(model, B, T, device, compile=True, bf16=True, steps=20, warmup=3, fused=True, tf32=True, profiler=None,
                  compile_mode="default", accum=1, compile_step=False, host=None):
    """Seconds of each timed training step (forward, backward, clipping, AdamW) of model on one batch of random
    tokens, after warmup untimed ones, and every step's loss. fused: AdamW's one-launch CUDA kernel; tf32: fp32
    matmuls on tensor cores (else full fp32, the lecture's first rung); profiler: a torch.profiler.profile that
    records the timed steps only; accum: micro-batches of B a step, their gradients added up (the same batch of
    B * accum rows as one micro-batch of that size); compile_step: clipping and AdamW compiled too (a candidate).
    host: the batch starts on the host and each micro-batch is copied to the device, "plain" as the trainer does it
    (a pageable copy, and the loss read before the update, for the trainer's inf/nan check: two waits for the GPU a
    step) or "async" (the async_host candidate: pinned, non-blocking copies, the loss read once the step is done);
    None: the batch is made on the device, the step alone is timed."""
    kind = device_type(device)
    optimizer = model.configure_optimizers(weight_decay=0.1, learning_rate=6e-4, device_type=kind)
    for group in optimizer.param_groups:  # fused=False: the lecture's rung before the fused kernel
        group["fused"] = group["fused"] and fused
    step_model = maybe_compile(model, compile, kind, mode=compile_mode)
    update = compile_update(clip_and_step, optimizer) if compile_step else clip_and_step
    where = "cpu" if host else device
    g = torch.Generator(where).manual_seed(1337)  # the same batch for every setting
    x = torch.randint(0, min(model.config.vocab_size, GPT2_VOCAB_SIZE), (B * accum, T + 1), device=where, generator=g)
    batches = [(rows[:, :-1].contiguous(), rows[:, 1:].contiguous()) for rows in x.split(B)]
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    times, losses = [], []
    try:
        for step in range(warmup + steps):
            if profiler is not None and step == warmup:
                profiler.start()
            t0 = time.time()
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for x, y in batches:
                if host:
                    x, y = to_device((x, y), device, pinned=host == "async")
                with torch.autocast(device_type=kind, dtype=torch.bfloat16, enabled=bf16):
                    loss = step_model(x, y)[1] / accum
                loss.backward()
                total += loss.detach()
            if host == "plain":
                torch.isfinite(total).item()  # the trainer's check before the update: the host waits for the GPU
            update(model, optimizer)
            synchronize(device)
            losses.append(float(total))
            if step >= warmup:
                times.append(time.time() - t0)
    finally:
        torch.set_float32_matmul_precision(precision)
        if profiler is not None and len(losses) > warmup:
            profiler.stop()
    return times, losses


# what a kernel (GPU) or an operator (CPU) is, from words in its name, first match wins; the rest is elementwise
KINDS = (("matmul", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "aten::mm", "aten::addmm", "aten::bmm", "aten::linear")),
         ("attention", ("flash", "fmha", "attention", "cudnn")),
         ("loss", ("log_softmax", "nll_loss", "cross_entropy")),
         ("optimizer", ("adam", "multi_tensor")),
         ("memset", ("memset",)))


def kind_of(name):
    name = name.lower()
    return next((kind for kind, words in KINDS if any(w in name for w in words)), "elementwise and other")


def profile_report(prof, steps, on_gpu, top=12):
    """Where the profiled steps' time went: each kind's share, and the top kernels (GPU) or operators (CPU)."""
    events = [e for e in prof.key_averages() if (e.device_type.name == "CUDA") == on_gpu]
    if not on_gpu:  # the CPU's own time, without the aten:: calls that only wrap others
        events = [e for e in events if e.self_cpu_time_total > 0]
    own = {e.key: (e.self_device_time_total if on_gpu else e.self_cpu_time_total, e.count) for e in events}
    total = sum(t for t, _ in own.values()) or 1
    shares = {}
    for name, (t, _) in own.items():
        shares[kind_of(name)] = shares.get(kind_of(name), 0) + t
    print(f"profile: {steps} steps, {total / 1000:.1f} ms of {'GPU kernel' if on_gpu else 'CPU operator'} time")
    print("  " + " | ".join(f"{kind} {100 * t / total:.1f}%" for kind, t in sorted(shares.items(), key=lambda kv: -kv[1])))
    print(f"  top {top} by time:")
    for name, (t, count) in sorted(own.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"  {100 * t / total:5.1f}% {t / 1000:9.2f} ms {count:6d}x  {kind_of(name):10s}  {name[:90]}")
    return {kind: t / total for kind, t in shares.items()}


def peak_memory(device):
    held = peak_memory_gib(device)
    if held is not None:
        return f"{held:.2f} GiB (max allocated)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process max RSS)"


def main(argv=None):
    p = one_line_flag_errors(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    p.add_argument("--n_layer", type=int, default=12)
    p.add_argument("--n_head", type=int, default=12)
    p.add_argument("--n_embd", type=int, default=768)
    p.add_argument("--vocab_size", type=int, default=PADDED_VOCAB_SIZE)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--seq_len", type=int, default=1024)
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", type=on_off, default=True)
    p.add_argument("--bf16", type=auto_on_off, default="auto", help="auto: on for CUDA GPUs with bf16, off elsewhere")
    p.add_argument("--tf32", type=on_off, default=True, help="fp32 matmuls on tensor cores (0: full fp32)")
    p.add_argument("--compile_step", type=on_off, default=False, help="a candidate: also compile clipping and AdamW, "
                                                                        "into one graph beside the model's")
    p.add_argument("--host", choices=("none", "plain", "async"), default="none",
                   help="where the batches start: none (made on the device: the step alone), plain (copied from the "
                        "host each micro-step, the loss read before the update: as the trainer does), async (a "
                        "candidate: pinned, non-blocking copies, the loss read once the step is done)")
    p.add_argument("--loss_chunks", type=int, default=1, help="the output layer and the loss in this many pieces")
    p.add_argument("--fused_adamw", type=on_off, default=True, help="AdamW's fused CUDA kernel (0: the loop of kernels)")
    p.add_argument("--profile", type=on_off, default=False, help="then profile 3 more steps: each kind's share of the "
                                                                   "time (matmul, attention, loss, ...) and the top kernels")
    p.add_argument("--steps", type=int, default=20, help="timed steps (after --warmup untimed ones)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first: compilation, allocator warm-up")
    p.add_argument("--hellaswag", default="", help="a HellaSwag jsonl: time scoring it instead of training")
    p.add_argument("--generate", type=int, default=0, help="time sampling this many tokens (--batch_size rows) "
                                                           "with and without the KV cache, instead of training")
    args = p.parse_args(argv)
    with one_line_errors():
        for name in ("n_layer", "n_head", "n_embd", "vocab_size", "batch_size", "seq_len", "steps", "loss_chunks"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}")
        if args.warmup < 0 or args.generate < 0:
            raise ValueError(f"--warmup and --generate must be at least 0, got {args.warmup} and {args.generate}")
        if args.generate >= max(1024, args.seq_len):  # the cache holds one context: past it, nothing to compare
            raise ValueError(f"--generate {args.generate} must be shorter than the context, {max(1024, args.seq_len)}")
        if args.n_embd % args.n_head:
            raise ValueError(f"--n_embd {args.n_embd} must be a multiple of --n_head {args.n_head}")
        device = init_device(pick_device(args.device))
        use_bf16 = bf16_fast(device) if args.bf16 == "auto" else args.bf16
        if args.hellaswag and not os.path.isfile(args.hellaswag):
            raise ValueError(f"--hellaswag {args.hellaswag!r} not found: it takes a HellaSwag jsonl file")
        if args.hellaswag and args.vocab_size < GPT2_VOCAB_SIZE:  # the examples are GPT-2's tokens
            raise ValueError(f"--hellaswag scores GPT-2's tokens: --vocab_size must be at least {GPT2_VOCAB_SIZE}, "
                             f"got {args.vocab_size}")
        examples = list(hellaswag.iterate_examples(args.hellaswag)) if args.hellaswag else None
    on_gpu = device_type(device) == "cuda"
    if examples is None and not args.generate:
        # the peak first, on an idle device (compile workers and the allocator not yet busy)
        peak = measured_tflops(device, torch.bfloat16 if use_bf16 else torch.float32, n=4096 if on_gpu else 2048)
    torch.manual_seed(1337)
    B, T = args.batch_size, args.seq_len
    config = GPTConfig(block_size=max(1024, T), vocab_size=args.vocab_size,
                       n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
    model = GPT(config).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    flops = flops_per_token(n_params, config, T)
    print(f"machine: {machine_name(device)} | torch {torch.__version__}")
    print(f"model: {n_params:,} parameters, {args.n_layer}L {args.n_head}H {args.n_embd}C, vocab {args.vocab_size}"
          + (f", {flops / 1e9:.3f} GFLOP/token" if examples is None and not args.generate else ""))
    if args.generate:
        bench_generate(model.eval(), B, args.generate, device, use_bf16)
        print(f"peak memory: {peak_memory(device)}")
        return
    if examples is not None:
        bench_hellaswag(model.eval(), examples, args.hellaswag, device, use_bf16)
        print(f"peak memory: {peak_memory(device)}")
        return
    model.loss_chunks = args.loss_chunks
    times, _ = time_training(model, B, T, device, args.compile, use_bf16, args.steps, args.warmup,
                             fused=args.fused_adamw, tf32=args.tf32, compile_step=args.compile_step,
                             host=None if args.host == "none" else args.host)
    dt = statistics.median(times)
    tok_s = B * T / dt
    sheet = datasheet_tflops(device)
    print(f"setting: B={B} T={T} device={device} compile={int(args.compile)} bf16={int(use_bf16)}"
          + (f" tf32={int(args.tf32)} fused_adamw={int(args.fused_adamw)}" if on_gpu else ""))
    print(f"step: {dt * 1000:.1f} ms (median of {len(times)}) | {tok_s:,.0f} tok/s | {tok_s * flops / 1e12:.3f} TFLOP/s")
    print(f"MFU: {100 * mfu(tok_s, flops, peak):.1f}% of the measured matmul peak {peak:.3f} TFLOP/s"
          + (f" | {100 * mfu(tok_s, flops, sheet):.1f}% of the datasheet bf16 peak {sheet} TFLOP/s" if sheet else ""))
    print(f"peak memory: {peak_memory(device)}")
    if args.profile:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
        prof = profile(activities=activities)
        time_training(model, B, T, device, args.compile, use_bf16, steps=3, warmup=1, fused=args.fused_adamw,
                      tf32=args.tf32, profiler=prof, compile_step=args.compile_step,
                      host=None if args.host == "none" else args.host)
        profile_report(prof, 3, on_gpu)


if __name__ == "__main__":
    run_script(main)
