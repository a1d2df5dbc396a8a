"""GPT-2 (124M) from scratch: the model, its data, and its training loop, in one file.

Read it top to bottom, in the lecture's order: the model, the data loader, evaluation, the learning-rate schedule,
the training loop, the recipe and main(), which sets a run up (torchrun, DDP or FSDP). What a production run needs
beyond the lecture (checkpoints, signals, agreement between ranks, speed figures) lives beside it, in machinery/.
"""
import bisect
import collections
import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed import init_process_group
import torch.nn as nn
import torch.utils.checkpoint
from torch.distributed.tensor import DTensor
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import hellaswag  # downloads, renders and scores HellaSwag; it never imports this file
from tokenizer import GPT2_VOCAB_SIZE, gpt2_encoding  # GPT-2's BPE, read from files in this repo: never downloaded
# what a production run needs beyond the lecture, from the package beside this file (which never imports it)
from machinery.checkpoints import (CheckpointManager, check_weights,  # checkpoints: found, restored, saved, rotated
                                   read_checkpoint)
from machinery.chunked_loss import chunked_cross_entropy  # --loss_chunks: the loss without the whole logits
from machinery.cli import error_text, one_line_errors, run_script  # a bad input is one line and an exit code
from machinery.fsdp import shard_model  # --fsdp 1: FSDP2 for models that do not fit one GPU
from machinery.inputs import check_data, load_hf_gpt2, read_text  # what a user hands the trainer, checked
from machinery.memory import choose_batch_size  # --batch_size auto: the largest micro-batch that fits
from machinery.perf import Meter  # MFU and the time left, on each step line
from machinery.run_dir import RunDir  # the --log_dir a run owns: its lock, log.txt, curves.png, STOPPED
from machinery.settings import (batch_line, check_config, check_run, dry_run, fit_batch_size, out_of_memory_advice,
                                parse_args, samples_prompt)  # the flags, the --model presets, their checks, --dry_run
from machinery.shards import open_shard, shard_paths  # the token shards fineweb.py writes
from machinery.stopping import STOPPED, StopRequest, stop_if_not_finite  # signals that stop a run with a checkpoint
from machinery.world import World, bf16_fast, can_compile, check_launcher, init_device, synchronize  # devices, ranks

# -----------------------------------------------------------------------------
# The model

# for a model trained from scratch, 50257 padded up to a multiple of 128: GPU kernels work in power-of-two
# tiles, and a ragged vocabulary costs more than the 47 extra rows (93 vs 96 ms a step, A100). The padded
# rows never appear as targets: training drives their logits down
PADDED_VOCAB_SIZE = 50304


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence the model can read (context length)
    vocab_size: int = GPT2_VOCAB_SIZE
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        # query, key and value for all heads in one matmul
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_SCALE_INIT = True  # adds into the residual stream: see GPT._init_weights
        self.n_head = config.n_head
        self.n_embd = config.n_embd

    def forward(self, x, mask=None, cache=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        # (B, T, C) -> (B, n_head, T, head_size): each head attends independently
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if cache is not None:  # generating: [keys, values] of the tokens before these, which x extends by one
            k, v = (torch.cat((old, new), dim=2) for old, new in zip(cache, (k, v))) if cache else (k, v)
            cache[:] = k, v
        # flash attention: softmax(q k^T / sqrt(head_size)) v, causal (no token sees the future),
        # computed in tiles without ever writing the (T, T) attention matrix to memory; a mask
        # (B, 1, T, T), True where a token may look, replaces causality (see hellaswag.py); a new
        # token after cached ones sees them all
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T == k.size(2))
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads side by side
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2 used the tanh approximation
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_SCALE_INIT = True

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, mask=None, cache=None):
        # pre-norm: the residual stream x is never normalised, only what branches off it
        x = x + self.attn(self.ln_1(x), mask, cache)  # tokens talk to each other
        x = x + self.mlp(self.ln_2(x))  # each token thinks on its own
        return x


# the published checkpoints, loadable by name through Hugging Face
PRETRAINED = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
# OpenAI's checkpoints store these four weights as Conv1D, (in, out); nn.Linear wants (out, in)
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# some Hugging Face checkpoints carry the causal masks as buffers: constants, not weights
HF_MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embeddings
            wpe=nn.Embedding(config.block_size, config.n_embd),  # position embeddings
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # weight tying: the output head reuses the token embedding (GPT-2 does, and it saves
        # vocab_size * n_embd = 38.6M parameters, 30% of the 124M model)
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        self.activation_checkpointing, self.loss_chunks = False, 1  # see hidden() and forward()

    def _init_weights(self, module):
        """GPT-2's initialisation: normal(0, 0.02) weights, zero biases (LayerNorm keeps 1 and 0)."""
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "RESIDUAL_SCALE_INIT", False):
                # each block adds two branches into the residual stream; scaling them by
                # 1/sqrt(2 * n_layer) keeps the stream's variance from growing with depth
                std *= (2 * self.config.n_layer) ** -0.5
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def hidden(self, idx, pos=None, mask=None, caches=None):
        """idx (B, T) token ids -> the last layer's normalised states (B, T, C), which lm_head turns into logits.
        By default token t is at position t and sees tokens 0..t; pos and mask say otherwise (see hellaswag.py),
        and caches holds each layer's keys and values of earlier tokens (see generate)."""
        B, T = idx.size()
        if pos is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence of length {T} is longer than block_size {self.config.block_size}")
            pos = torch.arange(0, T, dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C) + (T, C) broadcasts
        for block, cache in zip(self.transformer.h, caches or [None] * len(self.transformer.h)):
            if self.activation_checkpointing and self.training:
                # keep only the block's input; backward runs the block again for what it needs: memory for compute
                x = torch.utils.checkpoint.checkpoint(block, x, mask, use_reentrant=False)
            else:
                x = block(x, mask, cache)
        return self.transformer.ln_f(x)

    def forward(self, idx, targets=None, pos=None, caches=None):
        """idx (B, T) token ids -> logits (B, T, vocab_size), and the mean cross-entropy if targets."""
        x = self.hidden(idx, pos, caches=caches)
        if targets is not None and self.loss_chunks > 1:  # --loss_chunks: no logits, the loss computed in pieces
            return None, chunked_cross_entropy(x.flatten(0, 1), self.lm_head.weight, targets.reshape(-1), self.loss_chunks)
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            # reshape, not view: targets may be a slice such as idx[:, 1:], which view cannot flatten
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, top_k=50, generator=None, kv_cache=True):
        """Append max_new_tokens to idx (B, T), each sampled from the top_k most likely next tokens. kv_cache: each
        layer keeps the keys and values of the tokens so far, so a new token costs one position's work, not the
        whole prefix's again (past block_size tokens the window slides: then it is computed whole each time)."""
        caches, seen = [[] for _ in self.transformer.h], 0  # each layer's [keys, values], of the first seen tokens
        for _ in range(max_new_tokens):
            if kv_cache and idx.size(1) <= self.config.block_size:
                logits, _ = self(idx[:, seen:], pos=torch.arange(seen, idx.size(1), device=idx.device), caches=caches)
                seen = idx.size(1)
            else:
                logits, _ = self(idx[:, -self.config.block_size:])  # the model sees at most block_size
            # only the last position predicts the next token; ids past GPT-2's 50257 are padding,
            # not tokens, so they are never sampled (an untrained padded model would pick them)
            probs = F.softmax(logits[:, -1, :GPT2_VOCAB_SIZE], dim=-1)
            # keep the k most likely tokens: the long tail of unlikely ones is where samples go astray
            topk_probs, topk_indices = torch.topk(probs, min(top_k, probs.size(-1)), dim=-1)
            ix = torch.multinomial(topk_probs, 1, generator=generator)  # renormalises for us
            idx = torch.cat((idx, torch.gather(topk_indices, -1, ix)), dim=1)
        return idx

    def configure_optimizers(self, weight_decay, learning_rate, device_type, log=None):
        """AdamW with weight decay on the matmul weights and embeddings, none on biases and LayerNorms."""
        params = [p for p in self.parameters() if p.requires_grad]
        # decay pulls weights toward 0 as a regulariser: right for the 2-D tensors that multiply
        # activations, wrong for biases and LayerNorm gains (1-D), whose 0 means nothing special
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        for kind, group in zip(("decayed", "non-decayed"), groups) if log else ():
            log(f"{kind} tensors: {len(group['params'])}, with {sum(p.numel() for p in group['params']):,} parameters")
        # the fused kernel updates every tensor in one launch instead of several per tensor (CUDA only)
        return torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.95), eps=1e-8, fused=device_type == "cuda")

    @classmethod
    def from_pretrained(cls, name_or_path):
        """GPT-2 with OpenAI's weights: a name in PRETRAINED or a Hugging Face GPT-2 directory."""
        if name_or_path not in PRETRAINED and not os.path.isdir(name_or_path):
            raise ValueError(f"unknown model {name_or_path!r}: use one of {', '.join(PRETRAINED)} "
                             "or a directory holding a Hugging Face GPT-2 checkpoint")
        hf = load_hf_gpt2(name_or_path, PRETRAINED)  # every tensor read from the files, or a one-line error
        c = hf.config  # the shape comes from the checkpoint, not from our defaults
        model = cls(GPTConfig(block_size=c.n_positions, vocab_size=c.vocab_size,
                              n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd))
        sd = {k: v.t() if k.endswith(CONV1D_WEIGHTS) else v
              for k, v in hf.state_dict().items() if not k.endswith(HF_MASK_BUFFERS)}
        check_weights(model, sd, name_or_path)
        model.load_state_dict(sd)
        return model


def load_model(name_or_path):
    """A model's weights: a published name, a Hugging Face GPT-2 directory, or a checkpoint of this project (a
    file, or a directory of shards)."""
    if os.path.normpath(name_or_path).endswith((".pt", ".dcp")):
        checkpoint = read_checkpoint(name_or_path)
        try:
            model = GPT(GPTConfig(**checkpoint["model_config"]))
        except (TypeError, AssertionError) as e:
            raise ValueError(f"checkpoint {name_or_path} has an unusable model_config ({error_text(e)})") from None
        check_weights(model, checkpoint["model"], name_or_path)
        model.load_state_dict(checkpoint["model"])
        return model
    return GPT.from_pretrained(name_or_path)


# -----------------------------------------------------------------------------
# The data


def load_text_tokens(path):
    """A text file as one long array of GPT-2 token ids (uint16: every id is < 65536). <|endoftext|> in the text is
    the document separator it means, token 50256."""
    text = read_text(path)  # UTF-8, not empty, not binary, not JSON: else a one-line error
    return np.array(gpt2_encoding().encode(text, allowed_special={"<|endoftext|>"}), dtype=np.uint16)


class DataLoaderLite:
    """Batches of B rows of T tokens from one split, read as a single stream that wraps around.

    data_root is a directory of fineweb.py shards (the split's shards, in order, are one
    continuous stream: a batch may straddle two of them) or a text file (first 90% train,
    last 10% val). Process r of N reads chunk s * N + r at step s, so N processes together
    read exactly what one process would, and runs on 1 or 8 GPUs see the same data. With a
    shuffle_seed, each epoch after the first reads the shards in another order, drawn from the
    seed and the epoch: the same on every process, and after a resume.
    """

    def __init__(self, B, T, process_rank=0, num_processes=1, split="train", data_root="edu_fineweb10B",
                 shuffle_seed=None):
        assert split in ("train", "val")
        self.B, self.T, self.split, self.shuffle_seed = B, T, split, shuffle_seed
        self.process_rank, self.num_processes = process_rank, num_processes
        if os.path.isfile(data_root):  # a text file, tokenized whole and split 90/10
            tokens = load_text_tokens(data_root)
            n = int(0.9 * len(tokens))
            self.shards = [tokens[:n] if split == "train" else tokens[n:]]
        elif os.path.isdir(data_root):
            paths, lengths = shard_paths(data_root, split)
            # memory-mapped, not loaded: the OS reads in what a batch touches, and the 8 processes of a
            # machine share one copy in its page cache instead of holding 200 MB a shard each
            self.shards = [open_shard(path, n) for path, n in zip(paths, lengths)]
        else:
            what = "is neither a file nor a directory" if os.path.exists(data_root) else "not found"  # /dev/null, say
            raise ValueError(f"data {data_root!r} {what}: run `python fineweb.py` to make the FineWeb-Edu shards, "
                             "or pass --data with a text file such as input.txt")
        self.lengths = [len(s) for s in self.shards]
        self.total = sum(self.lengths)
        if self.total < B * T * num_processes + 1:
            raise ValueError(f"{data_root} ({split}) has {self.total} tokens, fewer than one step of B*T*processes+1 "
                             f"= {B * T * num_processes + 1}: pass a smaller --batch_size or --seq_len, or more data")
        # the largest token id, to check against the model's vocabulary before training, read from the data
        # itself, not a record of it (a memory-mapped max: 0.013 s for 100M cached tokens, disk speed when cold)
        self.max_id = max(int(s.max()) for s in self.shards)
        if process_rank == 0:  # one line per split, not one per process
            print(f"{data_root} ({split}): {self.total:,} tokens in {len(self.shards)} shard(s), "
                  f"1 epoch = {self.total // (B * T * num_processes)} steps of {B}x{T}x{num_processes}")
        self.reset()

    def reset(self):
        self.offset = 0  # where the current step's chunk 0 starts in the stream, counted from the first epoch's start

    def state_dict(self):
        return {"offset": self.offset}  # the position in the stream is all a resume needs

    def load_state_dict(self, state):
        self.offset = state["offset"]

    def shard_order(self, epoch):
        """The shards in the order an epoch reads them: as listed, or, with a shuffle_seed, after the first epoch,
        in an order drawn from the seed and the epoch (reading the same order every epoch, a long run's loss
        repeats a pattern each epoch)."""
        if self.shuffle_seed is None or epoch == 0:
            return list(range(len(self.shards)))
        return np.random.default_rng((self.shuffle_seed, epoch)).permutation(len(self.shards)).tolist()

    def read(self, start, n):
        """n tokens of the stream from position start, across shard ends and into the next epoch."""
        pieces = []
        while n:
            epoch, pos = divmod(start, self.total)
            order = self.shard_order(epoch)
            starts = np.cumsum([0] + [self.lengths[i] for i in order[:-1]]).tolist()  # where each shard begins
            k = bisect.bisect_right(starts, pos) - 1
            offset = pos - starts[k]
            piece = self.shards[order[k]][offset:offset + n]
            pieces.append(piece)
            n -= len(piece)
            start += len(piece)
        return np.concatenate(pieces)

    def next_batch(self):
        B, T = self.B, self.T
        start = self.offset + self.process_rank * B * T
        # uint16 -> int64 through numpy: a torch view of uint16 as int16 would turn ids >= 32768 negative
        buf = torch.from_numpy(self.read(start, B * T + 1).astype(np.int64))  # +1: the last input's target
        x = buf[:-1].view(B, T)  # inputs
        y = buf[1:].view(B, T)  # targets: each input's next token
        self.offset += B * T * self.num_processes  # past every process's chunk
        return x, y


# what a run reads: the train and val streams, and the HellaSwag examples (None: not scored)
Data = collections.namedtuple("Data", "train val hellaswag")


# -----------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate_loss(model, val_loader, val_rows, world, use_bf16=False, should_stop=lambda: False):
    """Mean loss over the first val_rows sequences of the val split, the same whatever B and the number of processes.

    They go in chunks of B; val_loader's process r reads chunks r, r + N, ...: 1 GPU and 8, at B=64 or B=12,
    measure the same tokens. Every process runs as many forward passes (under FSDP each one is a collective);
    past the last chunk, one is not counted. None if a stop was requested meanwhile: a long pass must not delay
    the checkpoint."""
    model.eval()
    val_loader.reset()
    loss_sum = torch.zeros((), device=world.device)
    B, N = val_loader.B, val_loader.num_processes
    for chunk in range(val_loader.process_rank, -(-val_rows // (B * N)) * N, N):  # this process's chunks
        if world.any(should_stop()):  # asked on every rank alike, so all of them stop at the same chunk
            model.train()
            return None
        x, y = val_loader.next_batch()
        rows = min(B, val_rows - chunk * B)  # of its B sequences, those that count: all, the last chunk's first, none
        if 0 < rows < B:  # cross_entropy's ignore_index, -100: the loss is the mean over the rows that count
            y = torch.cat([y[:rows], torch.full_like(y[rows:], -100)])  # a copy: y shares its memory with x
        x, y = x.to(world.device), y.to(world.device)
        with torch.autocast(device_type=world.device_type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = model(x, y)[1]  # the logits are dropped at once, not kept until the next batch
        if rows > 0:
            loss_sum += loss.float() * (rows / B)
    if world.ddp:
        dist.all_reduce(loss_sum, op=dist.ReduceOp.SUM)  # sum, then divide: gloo lacks AVG
    model.train()
    return loss_sum.item() / (val_rows / B)


@torch.no_grad()
def evaluate_hellaswag(model, examples, world, use_bf16=False, should_stop=lambda: False, sharded=False):
    """acc_norm over all examples: each rank scores every world_size-th one, then the counts add up. They go
    in rounds of 64 per rank, and between rounds the ranks ask each other whether to stop: a pre-empted run
    (torchrun kills ~30 s after SIGTERM) never waits for a whole pass. None when it stopped early.
    A sharded (FSDP) model gathers its weights in every forward pass, with every rank: there, every rank
    scores every example, in step with the others."""
    model.eval()
    if sharded:
        model.unshard()  # the root's weights (embeddings, lm_head): hellaswag.predict uses them outside forward()
    ranks = 1 if sharded else world.world_size  # how many ranks share the examples
    counts = torch.zeros(2, dtype=torch.long, device=world.device)  # correct (acc_norm), total
    per_round = 64 * ranks  # a multiple of the ranks: rank r still scores examples r, r + N, ...
    stopped = False
    for start in range(0, len(examples), per_round):
        if stopped := world.any(should_stop()):
            break
        mine = examples[start:start + per_round][world.rank % ranks::ranks]  # may be empty in the last round
        _, correct_norm, total = hellaswag.evaluate(model, mine, world.device, use_bf16=use_bf16)
        counts += torch.tensor([correct_norm, total], device=world.device)
    if sharded:
        model.reshard()
    model.train()
    if stopped:
        return None
    if ranks > 1:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    return counts[0].item() / counts[1].item()


def evaluate(step, eval_model, raw_model, data, cfg, world, run, should_stop):
    """The val loss, and HellaSwag where there is data: printed and logged; then curves.png is redrawn. False if
    a stop requested meanwhile cut them short."""
    val_loss = evaluate_loss(eval_model, data.val, cfg.val_steps * cfg.val_batch_size, world, cfg.bf16, should_stop)
    if val_loss is None:
        world.print("validation: cut short, a stop was requested")
        return False
    world.print(f"validation loss: {val_loss:.4f}")
    run.log(step, "val", f"{val_loss:.4f}")
    if data.hellaswag is not None:
        t0 = time.time()
        acc_norm = evaluate_hellaswag(raw_model, data.hellaswag, world, cfg.bf16, should_stop, sharded=cfg.fsdp)
        if acc_norm is None:
            world.print("HellaSwag: cut short, a stop was requested")
            return False
        world.print(f"HellaSwag accuracy: {acc_norm:.4f} over {len(data.hellaswag)} examples ({time.time() - t0:.1f} s)")
        run.log(step, "hella", f"{acc_norm:.4f}")
    run.draw_curves()
    return True


# the lecture's prompt, for samples of a model trained on the web
GPT2_PROMPT = "Hello, I'm a language model,"


@torch.no_grad()
def sample(model, device, num_samples=4, max_new_tokens=32, seed=42, prompt=GPT2_PROMPT):
    """num_samples continuations of prompt (top-k 50), from a generator of their own."""
    model.eval()
    enc = gpt2_encoding()
    # no prompt: start where every training document starts, after <|endoftext|> (not printed)
    tokens = enc.encode(prompt, allowed_special={"<|endoftext|>"}) if prompt else [enc.eot_token]
    x = torch.tensor(tokens, dtype=torch.long, device=device).unsqueeze(0).repeat(num_samples, 1)
    g = torch.Generator(device=device).manual_seed(seed)  # never disturbs training's random stream
    out = model.generate(x, max_new_tokens, top_k=50, generator=g)
    model.train()
    return [enc.decode(row[0 if prompt else 1:].tolist()) for row in out]


# -----------------------------------------------------------------------------
# The optimisation schedule


def get_lr(step, warmup_steps, max_steps, max_lr, min_lr):
    """Learning rate at a step: linear warmup to max_lr, cosine decay to min_lr at max_steps, then min_lr."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps  # step + 1: the first step already moves
    if step >= max_steps:
        return min_lr
    decay_ratio = (step - warmup_steps) / max(1, max_steps - warmup_steps)  # 0 -> 1
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # 1 -> 0
    return min_lr + coeff * (max_lr - min_lr)


# -----------------------------------------------------------------------------
# The training loop


def clip_and_step(model, optimizer):
    """The update: clip the global gradient norm at 1.0 (one unlucky batch cannot shock the weights), then AdamW's
    step. Returns the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # under FSDP, over every rank's shards
    optimizer.step()
    return norm.full_tensor() if isinstance(norm, DTensor) else norm  # (FSDP returns it as a DTensor)


def train(cfg, world, model, data, run, stop, checkpoints):
    """The loop, from step 0 or where the checkpoint to resume left off (checkpoints: the run's CheckpointManager);
    True if it stopped on request (stop: main()'s StopRequest)"""
    device = world.device
    world.print(f"using device: {device}" + (f", {world.world_size} processes" if world.ddp else ""))
    world.print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters")
    # a 0.5M-token batch does not fit in memory at once: add up the gradients of several micro-batches of B x T
    B, T = cfg.batch_size, cfg.seq_len
    assert cfg.total_batch_size % (B * T * world.world_size) == 0, "total_batch_size must divide into B * T * processes"
    grad_accum_steps = cfg.total_batch_size // (B * T * world.world_size)
    world.print(batch_line(cfg, world.world_size, grad_accum_steps))
    meter = Meter(model, cfg, world)  # MFU and the time left, for each step line
    if cfg.fsdp:  # FSDP2: weights, gradients and AdamW's moments split across the processes (machinery/fsdp.py)
        shard_model(model, device, world.master, cfg.fsdp_bf16)
    else:
        model.to(device)
    # GPT-3's AdamW: beta2 0.95 (not 0.999) lets the second moment follow the gradients' scale faster
    optimizer = model.configure_optimizers(weight_decay=cfg.weight_decay, learning_rate=cfg.max_lr,
                                           device_type=world.device_type, log=world.print)
    start_step = checkpoints.load(model, optimizer, data.train)  # 0, or the step the checkpoint to resume is at
    if start_step:  # a checkpoint's step is the next to run: 1 or more
        world.print(f"resuming at step {start_step}")
    # compile fuses the model's elementwise ops into a few kernels and cuts Python overhead; the
    # compiled module shares raw_model's weights, and raw_model stays for sampling (other shapes)
    raw_model = eval_model = model
    use_compile = cfg.compile and can_compile(world.device_type, world.print)  # a compiler, a Python it supports
    if use_compile:
        model = eval_model = torch.compile(model, mode=cfg.compile_mode)  # evaluation needs no DDP
    if world.ddp and not cfg.fsdp:
        # DDP averages the gradients of all processes during backward, bucket by bucket; compiled around DDP, not
        # inside it, the graph breaks at the buckets so that each one's all-reduce overlaps the rest of backward
        model = DDP(raw_model, device_ids=[world.local_rank] if world.device_type == "cuda" else None)
        if use_compile:
            model = torch.compile(model, mode=cfg.compile_mode)

    stopping = False  # SIGTERM, Ctrl-C, SIGHUP, SIGUSR1 (stop.requested): finish the step, checkpoint, exit
    for step in range(start_step, cfg.max_steps):
        last_step = step == cfg.max_steps - 1
        # a stop (in the start-up, or during the step before; the ranks may see it at different steps) or one that
        # cuts the evaluation short: the step is not trained, a resume starts with it (HellaSwag is eager: shapes vary)
        if world.any(stop.requested) or ((step % cfg.eval_every == 0 or last_step) and not evaluate(
                step, eval_model, raw_model, data, cfg, world, run, should_stop=lambda: stop.requested)):
            stopping, step = True, step - 1
            break
        # under FSDP every rank takes part in each forward pass, so every rank samples (the same text)
        sample_due = (step > 0 and step % cfg.sample_every == 0) or last_step
        if sample_due and not world.any(stop.requested) and (world.master or cfg.fsdp):
            # the eager model again: each new token makes a new shape, which would recompile every time
            for i, text in enumerate(sample(raw_model, device, prompt=samples_prompt(cfg, GPT2_PROMPT))):
                world.print(f"sample {i}: {text}")

        # ---- the lecture's training step: BEGIN ----
        t0 = time.time()
        optimizer.zero_grad()
        loss_accum = 0.0
        for micro_step in range(grad_accum_steps):
            x, y = data.train.next_batch()
            x, y = x.to(device), y.to(device)
            # DDP would average gradients after every backward; only the last micro-step's is needed.
            # no_sync() must wrap the forward too: DDP decides during the forward what backward does
            last = micro_step == grad_accum_steps - 1
            if cfg.fsdp:  # keep the gathered weights until the last micro-step: the next forward needs them
                raw_model.set_reshard_after_backward(last)
            with model.no_sync() if world.ddp and not cfg.fsdp and not last else contextlib.nullcontext():
                # bf16 autocast: matmuls run in bfloat16 (fp32's range, 8 bits of mantissa); weights and loss stay fp32
                with torch.autocast(device_type=world.device_type, dtype=torch.bfloat16, enabled=cfg.bf16):
                    # [1], not `logits, loss =`: a name would keep this step's (B, T, vocab) logits
                    # alive through the next micro-step's forward (6 GiB at B=64 in bf16)
                    loss = model(x, y)[1]
                # backward adds to .grad: dividing each micro-batch's mean loss by their number makes
                # the sum the mean over the whole batch, as if it had been one forward pass
                loss = loss / grad_accum_steps
                loss_accum += loss.detach()
                loss.backward()
        if world.ddp:  # the loss to print is the mean over all processes (sum, then divide: gloo lacks AVG)
            dist.all_reduce(loss_accum, op=dist.ReduceOp.SUM)
            loss_accum /= world.world_size
        stop_if_not_finite(loss_accum, step, cfg.log_dir)  # inf or nan: stop before the update
        lr = get_lr(step, cfg.warmup_steps, cfg.max_steps, cfg.max_lr, cfg.min_lr)
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr
        norm = clip_and_step(model, optimizer)  # clip, then AdamW
        synchronize(device)  # the GPU runs ahead of Python: wait for it before reading the clock
        dt = time.time() - t0
        tokens_per_sec = B * T * grad_accum_steps * world.world_size / dt
        world.print(f"step {step:5d} | loss {loss_accum.item():.6f} | lr {lr:.4e} | norm {norm:.4f} "
                    f"| dt {dt * 1000:.2f}ms | tok/sec {tokens_per_sec:.2f} | {meter(step, tokens_per_sec, dt)}")
        run.log(step, "train", f"{loss_accum.item():.6f}")
        # ---- the lecture's training step: END; what follows is machinery: stops and checkpoints ----

        checkpoints.maybe_save(step)  # every --checkpoint_every steps, every --checkpoint_minutes, and at the end
    if stopping:
        if step >= start_step:  # else nothing was trained since the start, or since the checkpoint resumed
            checkpoints.save(step, rotate=True)
        run.mark_stopped(step + 1, stop.requested, checkpoints.last_saved)  # log_dir/STOPPED: what requeueing looks for
        world.print(f"stopped before step {step + 1}: continue with --resume auto --log_dir {cfg.log_dir}")
    return stopping


# -----------------------------------------------------------------------------
# Setting a run up: one process, or one of many that torchrun starts


def scratch_config(cfg):
    """The shape of a model trained from scratch: its context is the sequence length it trains with."""
    return GPTConfig(block_size=cfg.seq_len, vocab_size=PADDED_VOCAB_SIZE, n_layer=cfg.n_layer, n_head=cfg.n_head,
                     n_embd=cfg.n_embd)


# The recipe: GPT-3 Small's hyperparameters (GPT-3 paper, Table 2.1), with which the lecture trains GPT-2 124M on 10B
# tokens. Each is the default of the flag of its name (--help); --model sets other sizes' (machinery/settings.py)
RECIPE = dict(
    n_layer=GPTConfig.n_layer, n_head=GPTConfig.n_head, n_embd=GPTConfig.n_embd,  # the model: GPT-2 124M
    total_batch_size=524288,  # 2**19, ~0.5M tokens per optimisation step, as GPT-3 Small
    batch_size=64,  # B, the micro-batch: sequences a GPU computes at once; gradient accumulation makes up the rest
    seq_len=1024,  # T: tokens per sequence
    max_lr=6e-4,  # GPT-3 Small's peak learning rate
    min_lr=6e-5,  # max_lr * 0.1: the cosine decays to 10% of the peak
    warmup_steps=715,  # 375M tokens / 2**19: GPT-3's warmup
    max_steps=19073,  # 10B tokens / 2**19: one epoch of FineWeb-Edu's 10B-token sample
    weight_decay=0.1,
    eval_every=250,  # the val loss and HellaSwag every 250 steps, and at the last
    val_steps=20, val_batch_size=64,  # 20 val batches of 64 x T each evaluation, read B at a time: the same for any B
    sample_every=250,
    checkpoint_every=5000,
    seed=1337,
)


def pick_device(requested="auto"):
    """The device asked for, or the fastest there is: a CUDA GPU, then Apple's MPS, then the CPU."""
    if requested != "auto":
        return requested
    device = "cpu"
    if torch.cuda.is_available():
        device = "cuda"
    elif hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
        device = "mps"
    return device


def main(argv=None):
    with StopRequest() as stop:  # a stop signal from here on: the run stops before its next step, with STOPPED
        with one_line_errors():  # the same settings on every rank: if these fail, they fail on all of them alike
            cfg = parse_args(argv, RECIPE)  # the recipe, as --model and the flags given change it
            # DDP: torchrun starts a process per GPU and tells each who it is; a plain run is a world of one
            check_launcher(planning=cfg.dry_run)  # all of torchrun's variables or none, whole numbers that fit together
            ddp = int(os.environ.get("RANK", -1)) != -1 and not cfg.dry_run  # is this a ddp run?
            ddp_rank = int(os.environ.get("RANK", 0))
            ddp_local_rank = int(os.environ.get("LOCAL_RANK", 0))  # which GPU of its machine the process drives
            ddp_world_size = int(os.environ.get("WORLD_SIZE", 1))
            device = init_device(pick_device(cfg.device), ddp_local_rank if ddp else None)  # checked; cuda:N under DDP
            world = World(ddp_rank, ddp_local_rank, ddp_world_size, ddp, device)  # who is who, for the package
            check_config(cfg, world.world_size)
            cfg.batch_size = fit_batch_size(cfg, world)
            if cfg.dry_run:
                return dry_run(cfg, world, GPT, scratch_config(cfg))
            if cfg.bf16 == "auto":  # decided once, here: the checkpoint records what the run really did
                cfg.bf16 = bf16_fast(world.device)
            check_run(cfg, world)  # the settings that depend on the device and the processes
        if world.ddp:
            # NCCL moves gradients between GPUs; gloo does it on the CPU, so DDP runs on a laptop too
            init_process_group(backend="nccl" if world.device_type == "cuda" else "gloo")
        if world.device_type == "cuda":
            # TF32: fp32 matmuls on tensor cores with a 10-bit mantissa, ~3x faster on A100/H100; the weights and
            # activations stay fp32, and training does not notice the lost precision
            torch.set_float32_matmul_precision("high")
        stopped = None  # True or False once train() returns
        try:
            run = RunDir(cfg.log_dir, writes=world.master)
            with one_line_errors(), contextlib.ExitStack() as claim:  # claim holds the log_dir for the run (rank 0)
                # from here a step may fail on one rank only: the ranks agree after each stage
                with world.together():
                    if world.master:  # before any work: a log_dir that cannot be used fails now, not after an hour
                        claim.enter_context(run.claim())
                    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
                    if cfg.init_from == "scratch":
                        # FSDP: rank 0 alone builds the weights; the others build shapes without memory (the meta
                        # device) and take their shards of rank 0's in shard_model: one whole model a job, not a process
                        with torch.device("meta") if cfg.fsdp and not world.master else contextlib.nullcontext():
                            model = GPT(scratch_config(cfg))
                    else:  # fine-tuning: the weights only, with a fresh optimizer from step 0
                        model = load_model(cfg.init_from)
                    if cfg.seq_len > model.config.block_size:
                        raise ValueError(f"--seq_len {cfg.seq_len} is longer than the model's context of "
                                         f"{model.config.block_size}")
                    # how the model trains, set before anything measures it (--batch_size auto tries this very model)
                    model.activation_checkpointing, model.loss_chunks = cfg.activation_checkpointing, cfg.loss_chunks
                if cfg.batch_size == "auto":  # the largest that fits: tried on a CUDA GPU, else from an estimate
                    with world.together():
                        cfg.batch_size = choose_batch_size(cfg, world, model, log=world.print)
                with world.together():
                    train_loader, val_loader = (DataLoaderLite(cfg.batch_size, cfg.seq_len, world.rank,
                                                               world.world_size, split, cfg.data,
                                                               cfg.seed if shuffle else None)
                                                for split, shuffle in (("train", cfg.shuffle_shards), ("val", False)))
                    check_data(cfg, model, train_loader, val_loader)  # token ids the model knows, enough val batches
                checkpoints = CheckpointManager(cfg, world, run, model)  # finds the checkpoint to resume, and reads it
                data = Data(train_loader, val_loader, hellaswag=hellaswag.load_for_run(cfg, world))
                # an error on one rank alone: it says why, and every rank stops; out of memory: which B to try
                with world.stop_all_on_error(stopping=lambda: stop.requested), out_of_memory_advice(cfg):
                    stopped = train(cfg, world, model, data, run, stop, checkpoints)
                model = data = checkpoints = None  # freed before the process group is: see World.leave
        except torch._dynamo.exc.TorchDynamoException as e:
            # compiling happens at the first forward, not at torch.compile(): a missing compiler shows up here
            sys.exit(f"error: torch.compile failed ({error_text(e)}): pass --compile 0 to train without it")
        finally:
            if world.ddp:
                world.leave(finished=stopped is not None)
        if stopped and not world.ddp:  # under torchrun, exit 0: its own report would call a stop a failure
            sys.exit(STOPPED)


if __name__ == "__main__":
    # Ctrl-C before training began, or a second one: stop now, quietly
    run_script(main, "interrupted: stopped at once, without a checkpoint")
