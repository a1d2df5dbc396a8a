"""Every setting of a run: TrainConfig (a flag each), the --model presets, their checks, and the dry run."""
import argparse
import contextlib
import os
from dataclasses import dataclass, field, fields

import torch

from machinery.cli import auto_on_off, check_utf8, error_text, int_or_auto, on_off
from machinery.memory import DRY_RUN_MEMORY, device_memory, largest_estimated, memory_estimate, sequences_per_process
from machinery.perf import DATASHEET_BF16_TFLOPS, MEASURED_MFU, MEASURED_ON, SCALING, duration, flops_per_token, run_seconds
from machinery.shards import open_shard, shard_paths
from machinery.world import COMPILE_MODES


def flag(default, help):
    return field(default=default, metadata={"help": help})


def gpt3(n_layer, n_head, n_embd, total_batch_size, max_lr, batch_size):
    """A GPT-3 size (its paper's Table 2.1) with the paper's recipe: context 2048, its tokens per step and peak
    learning rate, the floor at 10% of the peak, 375M tokens of warmup; run, like GPT-2, for 10B tokens."""
    return dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, seq_len=2048, total_batch_size=total_batch_size,
                batch_size=batch_size, max_lr=max_lr, min_lr=float(f"{max_lr / 10:.3g}"),
                warmup_steps=round(375e6 / total_batch_size), max_steps=round(10e9 / total_batch_size))


# --model: what each model changes from the defaults (GPT-2 124M's recipe); batch_size is the micro-batch
# that keeps the 124M run's 64K tokens per GPU pass, halved as the width grows (see --dry_run 1 for memory)
MODELS = {
    "gpt2": {},
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, batch_size=32),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280, batch_size=16),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600, batch_size=8),
    "gpt3-small": gpt3(12, 12, 768, 2**19, 6e-4, batch_size=32),
    "gpt3-medium": gpt3(24, 16, 1024, 2**19, 3e-4, batch_size=16),
    "gpt3-large": gpt3(24, 16, 1536, 2**19, 2.5e-4, batch_size=8),
    # the paper prints 24 heads of 128 for a width of 2048, and a width of 5140 for 13B, which 40 heads do
    # not divide: implementations use 16 heads of 128, and 5120
    "gpt3-xl": gpt3(24, 16, 2048, 2**20, 2e-4, batch_size=8),
    "gpt3-2.7b": gpt3(32, 32, 2560, 2**20, 1.6e-4, batch_size=4),
    "gpt3-6.7b": gpt3(32, 32, 4096, 2**21, 1.2e-4, batch_size=2),
    "gpt3-13b": gpt3(40, 40, 5120, 2**21, 1e-4, batch_size=1),
    "gpt3-175b": gpt3(96, 96, 12288, 1536 * 2048, 6e-5, batch_size=1),  # 3.2M tokens: 1536 sequences
}


@dataclass
class TrainConfig:
    """Every setting of a run, each a flag of the same name. Those whose default is None take it from the recipe that
    parse_args is given: the lesson's (train_gpt2.RECIPE, GPT-2 124M), which the --model presets change."""
    # data and model
    data: str = flag("edu_fineweb10B", "a directory of fineweb.py shards, or a text file (90% train, 10% val)")
    shuffle_shards: bool = flag(False, "read the train shards in a new seeded order each epoch after the first "
                                       "(the lecture's run repeated the same order, and its loss a pattern, each epoch)")
    model: str = flag("gpt2", f"the shape and recipe to train from scratch: {', '.join(MODELS)}; "
                              "the flags below that are given explicitly override it")
    init_from: str = flag("scratch", "scratch (random GPT-2 init), or start from weights: gpt2 ... gpt2-xl, "
                                     "a Hugging Face GPT-2 directory, or a .pt checkpoint of this project")
    n_layer: int = flag(None, "transformer blocks (scratch only)")
    n_head: int = flag(None, "attention heads (scratch only)")
    n_embd: int = flag(None, "channels (scratch only)")
    # batch
    total_batch_size: int = flag(None, "tokens per optimisation step")
    batch_size: int = flag(None, "B: sequences per micro-batch; accumulation makes up the rest. auto: the largest that "
                               "fits the device (tried on a CUDA GPU, else from the memory estimate)")
    seq_len: int = flag(None, "T: tokens per sequence, and a new model's context (block_size)")
    # optimisation schedule
    max_steps: int = flag(None, "optimisation steps")
    warmup_steps: int = flag(None, "linear learning-rate warmup steps")
    max_lr: float = flag(None, "peak learning rate, after warmup")
    min_lr: float = flag(None, "final learning rate, reached at --max_steps")
    weight_decay: float = flag(None, "AdamW weight decay on 2-D+ tensors (matmul weights, embeddings)")
    # evaluation, logging and checkpoints
    eval_every: int = flag(None, "evaluate every this many steps, and at the last step")
    val_steps: int = flag(None, "val batches per evaluation, from the start of the val split")
    val_batch_size: int = flag(None, "sequences per val batch, read in micro-batches of --batch_size: the same val "
                                     "tokens whatever B and the processes (a resumed run keeps the one it started with)")
    hellaswag: bool = flag(True, "evaluate HellaSwag acc_norm every --eval_every steps")
    hellaswag_file: str = flag("", "a local HellaSwag jsonl (default: the val split, downloaded once by hellaswag.py)")
    sample_every: int = flag(None, "print 4 samples every this many steps, and at the last step")
    prompt: str = flag("auto", "the samples' prompt; auto: the first line of a text --data, so the samples show the "
                               "text's form, else the lecture's prompt (for web text: FineWeb's shards)")
    log_dir: str = flag("log", "where log.txt and the checkpoints are written")
    checkpoint_every: int = flag(None, "write log_dir/model_{step:05d}.pt every this many steps, and at the last")
    checkpoint_minutes: float = flag(60, "also write one when this many minutes have passed since the last (0: never); "
                                         "each of these replaces the one before it, once written")
    sharded_checkpoints: str = flag("auto", "save each rank's shards (torch.distributed.checkpoint, a directory "
                                    "model_{step:05d}.dcp) instead of one file that rank 0 gathers whole: 1, 0, or "
                                    "auto (on under --fsdp 1 when a checkpoint outgrows 64 GB: gpt3-6.7b and up)")
    resume: str = flag("", "continue a run exactly from a checkpoint: a path, or 'auto' (the newest in --log_dir)")
    # system
    seed: int = flag(None, "seed for initialisation and training")
    device: str = flag("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    bf16: str = flag("auto", "bfloat16 autocast for the forward pass and loss: 1, 0, or auto (on for CUDA GPUs "
                             "that support it; off elsewhere: most CPUs and older Macs run it slower or not at all)")
    compile: bool = flag(True, "torch.compile the model (slow to start, faster steps)")
    compile_mode: str = flag("default", "torch.compile's mode: default, or max-autotune-no-cudagraphs (it tries kernel "
                                        "configurations while compiling: minutes more to start; off by default until "
                                        "a GPU measures it faster)")
    fsdp: bool = flag(False, "shard weights, gradients and optimizer state across the processes (FSDP2) instead of "
                             "copying them to each (DDP): for models that do not fit one GPU; needs torchrun")
    fsdp_bf16: bool = flag(False, "FSDP: the blocks gather their weights in bf16, half the bytes, and compute in bf16 "
                                  "throughout (not only the matmuls); gradients are still summed in fp32. The losses "
                                  "move slightly. Needs --bf16 1")
    activation_checkpointing: bool = flag(False, "keep only each block's input for backward, recomputing the rest: "
                                                 "far less activation memory for about a third more compute")
    loss_chunks: int = flag(1, "compute the output layer and the loss in this many pieces of the batch's positions, "
                               "so that the (B*T, vocab) logits never exist whole: B=64 fits in 40 GB with 8 (1: whole, "
                               "the lecture's way; off by default until a GPU measures it no slower)")
    dry_run: bool = flag(False, "print the settings, the parameter count, the batch and an estimate of memory per "
                                "GPU for DDP and FSDP on WORLD_SIZE processes (default 1), then exit")


def parse_args(argv, recipe):
    """The command line as a TrainConfig, or a ValueError that says which flag is wrong: each setting is the flag
    given, else what the --model preset sets, else the recipe's value (a dict, a value for each field whose default
    is None), else the field's default."""
    needed = {f.name for f in fields(TrainConfig) if f.default is None}
    if set(recipe) != needed:  # a mistake in the lesson, not in the command line
        raise TypeError(f"the recipe must give {sorted(needed)}, not {sorted(recipe)}")
    # exit_on_error=False: argparse raises its errors, to end in one line like any; --max is no abbreviation
    parser = argparse.ArgumentParser(description="Train GPT-2 (124M by default), then sample from it.",
                                     exit_on_error=False, allow_abbrev=False)
    preset = set().union(*MODELS.values())  # the flags whose default --model sets
    for f in fields(TrainConfig):  # default None: a flag left out takes the model's value, else the recipe's or field's
        default = recipe.get(f.name, f.default)
        default = f"{default} for gpt2; other models set their own" if f.name in preset else default
        parser.add_argument(f"--{f.name}", type=on_off if f.type is bool else auto_on_off if f.name in ("bf16", "sharded_checkpoints")
                            else int_or_auto if f.name == "batch_size" else f.type,
                            default=None, help=f"{f.metadata['help']} (default: {default})".replace("%", "%%"))
    try:
        args, unknown = parser.parse_known_args(argv)
    except argparse.ArgumentError as e:
        raise ValueError(f"{e} (see --help)") from None
    if unknown:
        raise ValueError(f"unrecognized arguments: {' '.join(unknown)} (see --help)")
    given = {name: value for name, value in vars(args).items() if value is not None}
    model = given.get("model", TrainConfig.model)
    if model not in MODELS:
        raise ValueError(f"--model {model!r} is not one of {', '.join(MODELS)}")
    for name in ("prompt", "data", "log_dir", "resume", "init_from", "hellaswag_file"):
        check_utf8(given.get(name, ""), f"--{name}")
    cfg = TrainConfig(**{**recipe, **MODELS[model], **given})
    cfg.given = frozenset(given)  # the flags on the command line (not a setting: no checkpoint records it)
    return cfg


def check_config(cfg, world_size=1):
    """Catch bad settings before any work is done, with a message that says what to change."""
    for name in ("n_layer", "n_head", "n_embd", "total_batch_size", "batch_size", "seq_len", "max_steps", "warmup_steps",
                 "eval_every", "val_steps", "val_batch_size", "sample_every", "checkpoint_every", "loss_chunks"):
        least = 0 if name == "warmup_steps" else 1
        if getattr(cfg, name) != "auto" and getattr(cfg, name) < least:
            raise ValueError(f"--{name} must be at least {least}, got {getattr(cfg, name)}")
    if cfg.hellaswag and cfg.hellaswag_file and not os.path.isfile(cfg.hellaswag_file):
        raise ValueError(f"--hellaswag_file {cfg.hellaswag_file!r} not found (or pass --hellaswag 0)")
    if cfg.warmup_steps > cfg.max_steps:
        raise ValueError(f"--warmup_steps {cfg.warmup_steps} is longer than the run (--max_steps {cfg.max_steps}): "
                         "pass a smaller --warmup_steps")
    if not 0 < cfg.max_lr < float("inf"):  # written so that nan fails too
        raise ValueError(f"--max_lr must be above 0 and finite, got {cfg.max_lr}")
    if not 0 <= cfg.min_lr <= cfg.max_lr:
        raise ValueError(f"--min_lr must be from 0 to --max_lr {cfg.max_lr}, got {cfg.min_lr}")
    if not cfg.checkpoint_minutes >= 0:
        raise ValueError(f"--checkpoint_minutes must be at least 0 (0: never), got {cfg.checkpoint_minutes}")
    if not cfg.weight_decay >= 0:
        raise ValueError(f"--weight_decay must be at least 0, got {cfg.weight_decay}")
    if cfg.total_batch_size % (cfg.seq_len * world_size):  # a whole number of sequences on every process
        raise ValueError(f"--total_batch_size {cfg.total_batch_size} is not a multiple of --seq_len x processes = "
                         f"{cfg.seq_len} x {world_size}: change one of them")
    if cfg.seed < 0:  # numpy's generators (--shuffle_shards) take none below 0
        raise ValueError(f"--seed must be at least 0, got {cfg.seed}")
    if cfg.fsdp_bf16 and not cfg.fsdp:
        raise ValueError("--fsdp_bf16 1 sets what FSDP sends: pass --fsdp 1 too")
    if cfg.sharded_checkpoints is True and not cfg.fsdp:
        raise ValueError("--sharded_checkpoints 1 saves the shards FSDP makes: pass --fsdp 1 too, or "
                         "--sharded_checkpoints auto")
    if cfg.compile_mode not in COMPILE_MODES:
        raise ValueError(f"--compile_mode {cfg.compile_mode!r} is not one of {', '.join(COMPILE_MODES)}")
    if cfg.n_embd % cfg.n_head:
        raise ValueError(f"--n_embd {cfg.n_embd} must be a multiple of --n_head {cfg.n_head}")


def check_run(cfg, world):
    """The settings that depend on what the run found: bf16 decided for the device, the processes torchrun started."""
    if cfg.fsdp_bf16 and not cfg.bf16:
        raise ValueError("--fsdp_bf16 1 computes the blocks in bf16, and bf16 autocast is off: pass --bf16 1 too, "
                         "or --fsdp_bf16 0")
    if cfg.fsdp and not world.ddp:
        raise ValueError("--fsdp 1 shards the model across the processes torchrun starts: launch with torchrun "
                         "(--nproc_per_node=N), or pass --fsdp 0")


def fit_batch_size(cfg, world):
    """The micro-batch B to use: the largest up to --batch_size that divides the sequences each process adds up
    in a step, so any number of GPUs keeps --total_batch_size. B changes how many sequences go through a GPU
    at once, not which tokens a step trains on: a run may resume with another B, or on another number of GPUs."""
    if cfg.batch_size == "auto":
        return "auto"  # chosen once the model is built (machinery/auto_batch.py)
    sequences = sequences_per_process(cfg, world.world_size)
    fitted = max(b for b in range(1, min(cfg.batch_size, sequences) + 1) if sequences % b == 0)
    if fitted != cfg.batch_size:
        world.print(f"--batch_size {cfg.batch_size} does not divide the {sequences} sequences each of "
                    f"{world.world_size} processes adds up in a step: using {fitted}")
    return fitted


# settings that change what is computed: a resumed run must use the checkpoint's (not --batch_size: see above)
RESUME_MUST_MATCH = ("data", "shuffle_shards", "init_from", "n_layer", "n_head", "n_embd", "total_batch_size",
                     "seq_len", "max_steps", "warmup_steps", "max_lr", "min_lr", "weight_decay", "seed", "bf16",
                     "fsdp_bf16")


@contextlib.contextmanager
def out_of_memory_advice(cfg):
    """Out of memory in a step, on a GPU or the CPU: a ValueError of one line saying which --batch_size to try."""
    try:
        yield
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not isinstance(e, torch.OutOfMemoryError) and "can't allocate memory" not in str(e):
            raise  # another RuntimeError: not ours to explain
        smaller = cfg.batch_size // 2
        raise ValueError(f"out of memory at --batch_size {cfg.batch_size} ({error_text(e).split('. ')[0]}): " + (
            f"pass --batch_size {smaller}; the total batch stays {cfg.total_batch_size:,} tokens, in more micro-steps"
            if smaller else "even one sequence is too many: pass a smaller --seq_len, or --activation_checkpointing 1, "
                            "or --fsdp 1 under torchrun")) from None


def batch_line(cfg, world_size, grad_accum_steps):
    """How a step's tokens are made up, in a line: the micro-steps of each process."""
    return (f"total batch {cfg.total_batch_size:,} tokens = {grad_accum_steps} micro-batches of {cfg.batch_size} x "
            f"{cfg.seq_len} on each of {world_size} processes")


def checkpoint_bytes(n_params):
    """A checkpoint's size: fp32 weights and AdamW's two moments, 12 bytes a parameter."""
    return 12 * n_params


# a checkpoint bigger than this is saved sharded by default: rank 0's host need not hold it whole
SHARDED_ABOVE = 64e9


def saves_sharded(cfg, n_params):
    """Whether the run's checkpoints are directories of every rank's shards rather than one file."""
    if cfg.sharded_checkpoints == "auto":
        return cfg.fsdp and checkpoint_bytes(n_params) > SHARDED_ABOVE
    return cfg.sharded_checkpoints


PROMPT_CHARS = 80  # the longest --prompt auto takes from a text's first line


def samples_prompt(cfg, web_prompt):
    """What --prompt auto means: a text file's first line (in Shakespeare, a speaker's name and a line break),
    or for FineWeb's shards web_prompt, the lecture's."""
    if cfg.prompt != "auto":
        return cfg.prompt
    if os.path.isfile(cfg.data):
        with open(cfg.data, encoding="utf-8") as f:
            line = f.readline(PROMPT_CHARS + 1)  # a text without line breaks must not be one whole-file prompt
        # cut at the last space within PROMPT_CHARS: whole words, each sample's prompt a line or so on screen
        return line if len(line) <= PROMPT_CHARS else line[:PROMPT_CHARS].rsplit(" ", 1)[0] or line[:PROMPT_CHARS]
    return web_prompt


def dry_run(cfg, world, model_class, config):
    """Say what a run of model_class(config) would be, without reading data beyond its shards' headers or making the model's weights:
    the settings, the parameter count, the batch, and the memory per GPU under DDP and under FSDP."""
    if cfg.init_from != "scratch":
        raise ValueError("--dry_run 1 plans a model trained from scratch: leave out --init_from")
    world.print("dry run: the settings, the model and its memory; nothing is trained")
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        world.print(f"  --{f.name} {int(value) if isinstance(value, bool) else value if value != '' else repr('')}")
    with torch.device("meta"):  # shapes without storage: even 175B parameters take no memory here
        model = model_class(config)
    n_params = sum(p.numel() for p in model.parameters())
    world.print(f"model: {n_params:,} parameters")
    if cfg.batch_size == "auto":  # planned from the estimate: for the GPU here, else for an 80 GiB one
        memory = device_memory(world.device) if world.device_type == "cuda" else DRY_RUN_MEMORY
        fits = {gib: largest_estimated(cfg, config, n_params, world.world_size, gib * 2**30) or "none" for gib in (40, 80, 141)}
        cfg.batch_size = largest_estimated(cfg, config, n_params, world.world_size, memory)
        world.print(f"--batch_size auto: {cfg.batch_size or 'not even 1 fits; planned at 1'} for {memory / 2**30:.0f} "
                    f"GiB, from the memory estimate ({', '.join(f'{b} on {gib} GiB' for gib, b in fits.items())}; "
                    "a run on a CUDA GPU tries them)")
        cfg.batch_size = cfg.batch_size or 1
    grad_accum_steps = sequences_per_process(cfg, world.world_size) // cfg.batch_size
    world.print(batch_line(cfg, world.world_size, grad_accum_steps))
    if os.path.isdir(cfg.data):
        paths, _ = shard_paths(cfg.data, "train")
        tokens = sum(len(open_shard(path)) for path in paths)  # memory-mapped: only the headers are read
        world.print(f"data: {tokens:,} train tokens in {len(paths)} shards: the run reads "
                    f"{cfg.max_steps * cfg.total_batch_size / tokens:.2f} epochs")
    else:
        world.print(f"data: {cfg.data} is {'a text file' if os.path.isfile(cfg.data) else 'not here'}: not read by a dry run")
    size = checkpoint_bytes(n_params)
    form = "sharded: a directory of each rank's shards" if saves_sharded(cfg, n_params) else "one file"
    world.print(f"checkpoints: {size / 1e9:,.1f} GB each ({form}; 12 bytes a parameter), {size / 1e9:,.0f} s to write "
                "at 1 GB/s; "
                f"every {cfg.checkpoint_every} steps ({cfg.max_steps // cfg.checkpoint_every} in {cfg.max_steps:,})" +
                (f", every {cfg.checkpoint_minutes:g} minutes (each replacing the one before)" if cfg.checkpoint_minutes
                 else "") + ", and at the end")
    tokens, flops = cfg.max_steps * cfg.total_batch_size, flops_per_token(n_params, config, cfg.seq_len)
    mfu = MEASURED_MFU[cfg.bf16 != False, cfg.compile]
    world.print(f"time, estimated: the MFU measured on {MEASURED_ON} ({100 * mfu:.1f}%, {'compiled' if cfg.compile else 'eager'}) "
                f"at each GPU's datasheet bf16 peak; on 8, {SCALING:.0%} of 8 times one's speed:")
    for gpu in ("A100", "H100", "H200"):
        tflops = DATASHEET_BF16_TFLOPS[gpu]
        world.print(f"  {gpu} ({tflops} TFLOP/s): " + ", ".join(
            f"{duration(run_seconds(tokens, flops, n, tflops, mfu))} on {n}" for n in (1, 8)))
    precision = "fp32" if cfg.bf16 is False else "bf16 autocast"
    world.print(f"memory per GPU, estimated (GiB; {precision}, flash attention, {'compiled' if cfg.compile else 'eager'}; "
                f"WORLD_SIZE={world.world_size} processes):")
    world.print(f"  {'':10} {'weights':>9} {'gradients':>9} {'optimizer':>9} {'activations':>11} {'logits':>9} {'total':>9}")
    for name, fsdp in (("DDP", False), ("FSDP", True)):
        parts = memory_estimate(config, n_params, cfg, world.world_size, fsdp, grad_accum_steps)
        cells = [f"{v / 2**30:{11 if k == 'activations' else 9}.2f}" for k, v in parts.items()]
        world.print(f"  {name:10} {' '.join(cells)} {sum(parts.values()) / 2**30:9.2f}")
