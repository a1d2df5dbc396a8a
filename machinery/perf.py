"""How fast a run goes: FLOPs per token, the device's peak, MFU, and durations as a person reads them."""
import time

import torch

from machinery.world import synchronize


def duration(seconds):
    """A duration as a person reads it: 42s, 5m07s, 3h02m."""
    s = round(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def flops_per_token(n_params, config, T):
    """Training FLOPs per token: 6 per parameter (2 in the forward pass, 4 in the backward) plus attention's
    scores and mixing, 12 per layer, position and channel."""
    return 6 * n_params + 12 * config.n_layer * T * config.n_embd


# dense bf16 tensor-core peaks from the datasheets, TFLOP/s (name as torch reports it)
DATASHEET_BF16_TFLOPS = {"A100": 312, "H100 PCIe": 756, "H100": 989, "H200": 989, "L4": 121,
                         "A10G": 125, "RTX 4090": 165, "RTX 3090": 71}


def datasheet_tflops(device):
    """A CUDA GPU's dense bf16 peak from its datasheet, or None for a device not in the table."""
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in DATASHEET_BF16_TFLOPS.items():  # the first key found in the name wins
        if key in name:
            return tflops
    return None


# the MFU this project's step reached on one H200 (GPT-2 124M, T=1024, B=64 for bf16, 16 for TF32; 2026-11-30),
# by (bf16, compile): what --dry_run 1 turns into a run's duration on other GPUs
MEASURED_MFU = {(True, True): 0.447, (True, False): 0.360, (False, True): 0.138, (False, False): 0.138}
MEASURED_ON = "one H200, GPT-2 124M, 2026-11-30"
SCALING = 0.95  # the share of N times one GPU's speed that N GPUs are assumed to reach


def run_seconds(tokens, flops, gpus, tflops, mfu):
    """An estimate of how long a run of tokens takes on gpus GPUs of a datasheet peak, at an MFU measured elsewhere."""
    tokens_per_sec = tflops * 1e12 * mfu / flops * gpus * (SCALING if gpus > 1 else 1)
    return tokens / tokens_per_sec


def measured_tflops(device, dtype, n=None, reps=None):
    """The device's matmul peak in practice: TFLOP/s of the fastest of a few large square matmuls."""
    on_gpu = device.startswith("cuda")
    n, reps = n or (4096 if on_gpu else 1024), reps or (10 if on_gpu else 3)  # a CPU is ~1000x slower: keep it short
    g = torch.Generator(device=device).manual_seed(0)  # random numbers of its own: training's stream is untouched
    a, b = (torch.randn(n, n, device=device, dtype=dtype, generator=g) for _ in range(2))
    a @ b  # warm-up
    best = float("inf")
    for _ in range(reps):  # the fastest repetition: the ceiling, not the average under noise
        synchronize(device)
        t0 = time.time()
        a @ b
        synchronize(device)
        best = min(best, time.time() - t0)
    return 2 * n ** 3 / best / 1e12


def peak_tflops(device, bf16):
    """What MFU is measured against, and its name: a known GPU's datasheet bf16 peak, else this device's own."""
    sheet = datasheet_tflops(device) if bf16 else None
    if sheet:
        return sheet, f"the datasheet bf16 peak of {torch.cuda.get_device_name(device)}"
    dtype, name = (torch.bfloat16, "bf16") if bf16 else (torch.float32, "fp32")
    return measured_tflops(device, dtype), f"this device's measured {name} matmul peak"


def mfu(tokens_per_sec, flops, peak):
    """Model FLOPs utilisation: the FLOP/s achieved at tokens_per_sec (flops per token), as a share of peak TFLOP/s."""
    return tokens_per_sec * flops / (peak * 1e12)


def peak_memory_gib(device):
    """The most a CUDA device has held at once in this process (torch.cuda.max_memory_allocated), in GiB; None elsewhere."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.startswith("cuda") else None


class Meter:
    """The end of each step line: MFU (the FLOP/s a process achieves, as a share of what its device could do at
    most), the time left, from the pace since this run's first step (compiling) ended, evaluations included, and
    on a CUDA GPU the peak memory so far (torch.cuda.max_memory_allocated)."""

    def __init__(self, model, cfg, world):
        n_params = sum(p.numel() for p in model.parameters())
        self.flops = flops_per_token(n_params, model.config, cfg.seq_len)
        self.peak, name = peak_tflops(world.device, cfg.bf16)
        world.print(f"MFU is measured against {name}: {self.peak:,.3f} TFLOP/s")
        self.world_size, self.max_steps, self.device = world.world_size, cfg.max_steps, world.device
        self.first = None  # (step, time) when the run's first step ended

    def __call__(self, step, tokens_per_sec, dt):
        utilisation = mfu(tokens_per_sec / self.world_size, self.flops, self.peak)
        if self.first is None:
            self.first, pace = (step, time.time()), dt
        else:
            pace = (time.time() - self.first[1]) / (step - self.first[0])
        line = f"mfu {100 * utilisation:.1f}% | eta {duration(pace * (self.max_steps - step - 1))}"
        if (held := peak_memory_gib(self.device)) is not None:  # the most held at once, evaluations included
            line += f" | mem {held:.2f} GiB"
        return line
