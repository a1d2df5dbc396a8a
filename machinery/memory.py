"""Memory: an estimate of a training process's peak, part by part, and --batch_size auto, the largest micro-batch that
fits the device (tried on a CUDA GPU, else from the estimate)."""
import dataclasses
import gc
import os
import resource

import torch

from machinery.world import device_type


def memory_estimate(config, n_params, cfg, world_size, fsdp, grad_accum_steps):
    """One training process's peak memory in bytes, part by part: a planning figure for a GPU with flash attention,
    eager or compiled as cfg says. Weights and gradients are fp32, as are AdamW's two moments; activations are bf16
    under autocast, else fp32. On one H200, GPT-2 124M at B=64: 53.93 GiB estimated eager, 52.97 measured; 41.65
    compiled, 41.16 measured (torch.cuda.max_memory_allocated over a whole run)."""
    B, T, C, L, V = cfg.batch_size, config.block_size, config.n_embd, config.n_layer, config.vocab_size
    bf16 = cfg.bf16 != False  # auto is on for the GPUs this estimates
    block = 12 * C * C + 13 * C  # one block's parameters
    if fsdp:
        # 1/N of everything, plus what is whole at a time: the root's weights (embeddings, lm_head) and two blocks'
        # (the one computing and the next, fetched ahead), all of them kept between micro-steps; two blocks' gradients
        gathered = n_params if grad_accum_steps > 1 else n_params - L * block + 2 * block
        weights, gradients = 4 * (n_params / world_size + gathered), 4 * (n_params / world_size + 2 * block)
        optimizer = 8 * n_params / world_size
    else:  # a whole copy on every process, and DDP's buckets: a second copy of the gradients to reduce in
        weights, gradients, optimizer = 4 * n_params, 4 * n_params * (2 if world_size > 1 else 1), 8 * n_params
    # saved for backward, per token and layer: both LayerNorms' inputs (fp32), the 4 matmuls' inputs, q, k, v, the
    # attention's output and the MLP's 4C-wide hidden layer: 38 C bytes with the matmuls in bf16, 68 C in fp32
    per_layer = (38 if bf16 else 68) * C
    # --activation_checkpointing: each block's input (fp32), and one block's insides while it is recomputed
    activations = B * T * (L * 4 * C + per_layer if cfg.activation_checkpointing else L * per_layer)
    # per logit: eager keeps the logits (bf16 under autocast), the loss's fp32 log-softmax of them, and its fp32
    # gradient; compiled, the log-softmax is fused into the loss and never written, leaving logits and gradient
    logits = B * T * V * ((2 if bf16 else 4) + (4 if cfg.compile else 8))
    if cfg.loss_chunks > 1:  # one chunk's logits at a time (bf16, their fp32 softmax, its bf16 copy), and the
        # gradients of the hidden states and of lm_head (fp32), which forward computes and keeps for backward
        logits = B * T * V * (12 if bf16 else 8) / cfg.loss_chunks + 4 * (B * T * C + V * C)
    return dict(weights=weights, gradients=gradients, optimizer=optimizer, activations=activations, logits=logits)


# the share of a device's memory a micro-batch is planned to fill: the estimate is within a few percent of what a
# GPU measured, and the CUDA context, the allocator's fragments and evaluation take the rest. A size tried on a GPU
# must run with the rest set aside too: one that only just ran once fails later, on a fragmented allocator
PLANNED_SHARE = 0.9
# how far above the device's memory an estimate may be and still be tried: compile and the allocator can do better
TRIED_ABOVE = 1.25
# what a dry run plans --batch_size auto for where it sees no GPU: an 80 GB card (A100 80GB, H100)
DRY_RUN_MEMORY = 80 * 2**30


def sequences_per_process(cfg, world_size):
    """The sequences each process adds up in a step: --total_batch_size tokens in sequences of --seq_len, shared out."""
    return cfg.total_batch_size // (cfg.seq_len * world_size)


def batch_sizes(cfg, world_size):
    """The micro-batches a step can be made of, largest first: those that divide the sequences each process adds up."""
    sequences = sequences_per_process(cfg, world_size)
    return [b for b in range(sequences, 0, -1) if sequences % b == 0]


# where a container's memory limit is written: cgroup v2, then v1 (a number of bytes, or "max")
CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def device_memory(device):
    """The bytes a process may fill: a CUDA GPU's total (under set_per_process_memory_fraction, that share of it),
    else the machine's RAM, or less where the process is held to less: its address-space limit (ulimit -v) or its
    container's (cgroup), as on a shared login node or a Slurm job's share of a machine."""
    if device.startswith("cuda"):
        fraction = torch.cuda.get_per_process_memory_fraction(device)
        return int(torch.cuda.get_device_properties(device).total_memory * fraction)
    limits = [os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")]
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        limits.append(soft)
    for path in CGROUP_LIMITS:
        try:
            with open(path) as f:
                limits.append(int(f.read().strip()))  # "max": no limit, a ValueError
        except (OSError, ValueError):
            pass
    return min(limits)


def estimated_bytes(cfg, config, n_params, world_size, batch_size):
    """The memory estimate's total for one process at this micro-batch."""
    planned = dataclasses.replace(cfg, batch_size=batch_size)
    accum = sequences_per_process(cfg, world_size) // batch_size
    return sum(memory_estimate(config, n_params, planned, world_size, cfg.fsdp, accum).values())


def largest_estimated(cfg, config, n_params, world_size, memory, share=PLANNED_SHARE):
    """The largest micro-batch whose estimate fills at most share of memory, or None if not even 1 does."""
    sizes = batch_sizes(cfg, world_size)
    return next((b for b in sizes if estimated_bytes(cfg, config, n_params, world_size, b) <= share * memory), None)


def free_memory(model):
    model.zero_grad(set_to_none=True)
    gc.collect()  # what a failed try left in reference cycles
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # give the cached blocks back, so that the next try starts from an empty GPU


def largest_that_runs(sizes, try_step, free):
    """The first of sizes (largest first) at which try_step(B) runs without running out of memory, or None;
    free() runs after every try, once its failure (and the traceback that holds its tensors) is let go."""
    for B in sizes:
        fits = True
        try:
            try_step(B)
        except torch.OutOfMemoryError:
            fits = False
        free()
        if fits:
            return B
    return None


def trial_step(model, B, T, device, bf16, reserved):
    """One forward and backward at B x T on random tokens, with reserved bytes set aside for what the first real step
    adds later (AdamW's moments, DDP's buckets)."""
    aside = torch.empty(reserved, dtype=torch.uint8, device=device)
    g = torch.Generator(device).manual_seed(0)  # random numbers of its own: training's stream is untouched
    x = torch.randint(0, model.config.vocab_size, (B, T + 1), device=device, generator=g)
    with torch.autocast(device_type=device_type(device), dtype=torch.bfloat16, enabled=bf16):
        loss = model(x[:, :-1], x[:, 1:])[1]
    loss.backward()
    del aside


def choose_batch_size(cfg, world, model, log=print):
    """--batch_size auto. On a CUDA GPU (not under FSDP, whose every forward is a collective): the largest that
    runs a forward and backward of the model as the run trains it (compiled, --loss_chunks, activation checkpointing)
    with a tenth of the memory set aside, tried largest first from what the estimate allows. Elsewhere,
    and under FSDP: the largest the estimate fits in the memory there is. Every process takes the smallest choice."""
    n_params = sum(p.numel() for p in model.parameters())
    memory = device_memory(world.device)
    if world.device_type == "cuda" and not cfg.fsdp:
        sizes = [b for b in batch_sizes(cfg, world.world_size)
                 if estimated_bytes(cfg, model.config, n_params, world.world_size, b) <= TRIED_ABOVE * memory] or [1]
        model.to(world.device)
        # a graph per size: no dynamic shapes, which would make the run's own graph slower
        trial = torch.compile(model, dynamic=False, mode=cfg.compile_mode) if cfg.compile else model
        # AdamW's two moments; DDP's buckets; and the headroom a run needs beyond its step's peak
        reserved = 8 * n_params + (4 * n_params if world.ddp else 0) + int((1 - PLANNED_SHARE) * memory)
        chosen = largest_that_runs(
            sizes, lambda B: trial_step(trial, B, cfg.seq_len, world.device, cfg.bf16, reserved), lambda: free_memory(model))
        if cfg.compile:
            torch._dynamo.reset()  # the run compiles its own graph, at the chosen size
        how = (f"the largest that ran a step here with {1 - PLANNED_SHARE:.0%} of the memory to spare"
               + (", compiled" if cfg.compile else ""))
    else:
        chosen = largest_estimated(cfg, model.config, n_params, world.world_size, memory)
        how = f"the largest the memory estimate fits in {PLANNED_SHARE:.0%} of this device's {memory / 2**30:.1f} GiB"
    chosen = world.min(chosen or 0)
    if not chosen:
        raise ValueError("--batch_size auto: even one sequence does not fit: pass a smaller --seq_len, or "
                         "--activation_checkpointing 1, or --fsdp 1 under torchrun")
    log(f"--batch_size auto: {chosen} ({how})")
    return chosen
