"""HellaSwag, completion style: which of four endings does the model find most likely?

    python hellaswag.py -m gpt2 -d cuda     # GPT-2 124M on the 10,042 val examples (downloaded once), as the lecture
    python hellaswag.py -m my_hf_dir -d cpu --data_file hellaswag_val.jsonl    # a local Hugging Face GPT-2, a local file
    python hellaswag.py --download_only 1   # the val split downloaded once, and checked

The command scores a Hugging Face GPT-2 (OpenAI's weights by name, or a directory) as the lecture's hellaswag.py
does, an example a forward pass, and ends with its line `N acc_norm: C/N=0.XXXX`. The trainer loads the data for
every rank with load_for_run() and scores its own model in its loop with evaluate(), batched; eval_hellaswag.py
scores any model this project reads (its checkpoints too) the same way; on the same model and file the two agree.
This file imports nothing of the project but the tokenizer and machinery's helpers, so the trainer can import it.

Each ending is rendered as the context's tokens followed by the tokens of " " + ending, and
scored by the model's cross-entropy over the ending's tokens only. acc picks the lowest summed
loss, acc_norm the lowest mean loss per token (fairer to long endings). Published GPT-2 124M:
acc 0.2859, acc_norm 0.2955 (completion style, the original val file). predict() computes exactly
this with a fraction of the work: it says how.
"""
import argparse
import contextlib
import json
import os
import urllib.request

import torch
import torch.distributed as dist
from torch.nn import functional as F
from tqdm import tqdm

from machinery.cli import error_text, on_off, one_line_errors, one_line_flag_errors, run_script
from machinery.inputs import load_hf_gpt2
from machinery.world import device_type, init_device
from tokenizer import EOT, gpt2_encoding

DATA_CACHE_DIR = os.environ.get("HELLASWAG_CACHE", os.path.join(os.path.dirname(os.path.abspath(__file__)), "hellaswag"))
# tokens per forward pass, padding included: rows of similar length are batched up to this many
BATCH_TOKENS = 8192
# a batch's rows are padded to a multiple of this length, and their number to a power of two (or what fills the
# budget): a pass over the val set meets a few dozen shapes, not hundreds, each of which a GPU's kernels (and
# torch.compile) would otherwise meet for the first time: 17 s for the first pass on an H200, 3.7 s after
LENGTH_BUCKET = 32
URLS = {split: f"https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_{split}.jsonl"
        for split in ("train", "val", "test")}


def download(split="val", cache_dir=DATA_CACHE_DIR):
    """The split's jsonl file, downloaded once into cache_dir (to a temporary name, then renamed)."""
    path = os.path.join(cache_dir, f"hellaswag_{split}.jsonl")
    if os.path.exists(path):
        return path
    if os.path.exists(cache_dir) and not os.path.isdir(cache_dir):
        raise ValueError(f"HELLASWAG_CACHE={cache_dir} is a file: set it to a directory, or unset it for ./hellaswag")
    os.makedirs(cache_dir, exist_ok=True)
    tmp = path + ".tmp"
    try:
        with urllib.request.urlopen(URLS[split], timeout=30) as r, open(tmp, "wb") as f:
            with tqdm(total=int(r.headers.get("content-length", 0)), unit="B", unit_scale=True,
                      desc=f"hellaswag {split}") as bar:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
    except OSError as e:  # offline, say: what to do, not only urllib's words
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise ValueError(f"cannot download HellaSwag's {split} split ({error_text(e)}): on a machine online, run "
                         f"`python hellaswag.py --download_only 1` and copy {path} here, or pass --data_file") from None
    os.replace(tmp, path)
    return path


def example_problem(example):
    """What makes a parsed line something other than a HellaSwag example, or None if it is one."""
    if not isinstance(example, dict):
        return "not a JSON object"
    if not isinstance(example.get("ctx"), str):
        return "no 'ctx' text"
    endings = example.get("endings")
    if not isinstance(endings, list) or len(endings) != 4 or not all(isinstance(e, str) for e in endings):
        return f"'endings' must be a list of 4 texts, got {len(endings) if isinstance(endings, list) else endings!r}"
    label = example.get("label")
    if type(label) is not int or not 0 <= label <= 3:
        return f"'label' must be 0, 1, 2 or 3, got {label!r}"
    return None


def iterate_examples(path, limit=None):
    """The examples of a HellaSwag jsonl file, each checked (a ctx, 4 endings, a label 0..3), or a ValueError."""
    count = 0
    with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark some editors put first is not data
        try:
            for lineno, line in enumerate(f, start=1):
                if limit is not None and count >= limit:
                    return
                try:
                    example = json.loads(line)
                except ValueError:
                    example = None  # reported below with the line number
                problem = "a blank line" if not line.strip() else example_problem(example)
                if problem:
                    raise ValueError(f"{path} line {lineno}: {problem}: each line must be one HellaSwag example")
                count += 1
                yield example
        except UnicodeDecodeError:
            raise ValueError(f"{path} is not UTF-8 text: it must be a HellaSwag jsonl file") from None
    if count == 0:
        raise ValueError(f"{path} holds no HellaSwag examples")


def render_example(example, enc, block_size=None):
    """The example as one row: its context once, then its 4 endings, each the tokens of " " + ending
    (GPT-2's tokens carry the space before a word). Returns (tokens, positions, segments): each ending's
    positions continue the context's, as if it followed the context alone; the segment is -1 on the
    context and i on ending i. For a model whose context (block_size) is shorter than context + ending, the
    context loses its first tokens until the longest ending fits, as generate() crops a prompt; an ending
    longer than block_size - 1 keeps its first block_size - 1 tokens, after the context's last one."""
    # an empty context: the endings follow the start of a document, <|endoftext|>, as in training (without
    # a token before it, an ending of one token would have nothing predicting it: a loss of 0/0)
    ctx = enc.encode_ordinary(example["ctx"]) or [EOT]
    ends = [enc.encode_ordinary(" " + ending) for ending in example["endings"]]
    if block_size is not None:
        ends = [end[:block_size - 1] for end in ends]
        ctx = ctx[max(0, len(ctx) - (block_size - max(map(len, ends)))):]
    tokens, positions, segments = list(ctx), list(range(len(ctx))), [-1] * len(ctx)
    for i, end in enumerate(ends):
        tokens += end
        positions += range(len(ctx), len(ctx) + len(end))
        segments += [i] * len(end)
    return tokens, positions, segments


def token_batches(lengths, budget):
    """Indices into lengths, shortest first, in batches of at most budget tokens once padded to their
    longest row (a row longer than the budget goes alone): rows of similar length share a batch."""
    batch, longest = [], 0
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        if batch and (len(batch) + 1) * max(longest, lengths[i]) > budget:
            yield batch
            batch, longest = [], 0
        batch.append(i)
        longest = max(longest, lengths[i])
    if batch:
        yield batch


def by_length(examples):
    """The examples, shortest row first. In rounds of a few dozen (the training loop's), examples of similar
    length pad little: rounds of 64 val examples in file order hold 21% padding, sorted ones 0.4%."""
    enc = gpt2_encoding()
    return sorted(examples, key=lambda example: len(render_example(example, enc)[0]))


def load_for_run(cfg, world):
    """The HellaSwag val examples for the training loop (cfg.hellaswag, cfg.hellaswag_file), or None (switched off
    or unavailable). Every rank of world gets the same answer: if one lacks the data (a node that could not
    download it), none scores HellaSwag, since the others would wait for it in the all-reduce forever."""
    if not cfg.hellaswag:
        return None
    path = cfg.hellaswag_file or os.path.join(DATA_CACHE_DIR, "hellaswag_val.jsonl")
    reason = examples = error = None
    if not cfg.hellaswag_file:  # the cached val split; each node's local rank 0 downloads it (nodes may not share disks)
        if world.local_rank == 0:
            try:
                download("val")
            except Exception as e:  # offline, say
                reason = error_text(e)
        if world.ddp:
            dist.barrier()
    if os.path.isfile(path):
        try:
            examples = list(iterate_examples(path))
        except (ValueError, OSError) as e:
            error = error_text(e)
    if world.any(error is not None):  # a bad file on one node stops every rank
        raise ValueError(f"--hellaswag_file: {error or 'another process cannot read its HellaSwag file'}")
    n = torch.tensor(len(examples) if examples else -1, device=world.device)
    if world.ddp:  # the largest count; then does any rank hold another one (or none)?
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
    if world.any(examples is None or len(examples) != n.item()):
        world.print(f"hellaswag: no data ({reason or path + ' not found'}" + (" on some node" if world.ddp else "") +
                    "): training goes on without it")
        return None
    return by_length(examples)  # each round of evaluate_hellaswag then holds rows of similar length


@torch.no_grad()
def predict(model, examples, device, budget=BATCH_TOKENS, use_bf16=False, progress=False):
    """Each example's predictions (acc, acc_norm): the ending with the lowest summed loss, and with the
    lowest mean loss per token. The same as scoring the 4 rows context + ending one by one, for less:
    - the context goes through the model once for its 4 endings: they share one row after it, and an
      attention mask lets each ending see the context and itself, never another ending;
    - the output layer (GPT-2's largest matmul) and the loss run only where an ending's token is
      predicted, never at the context's positions or the padding's."""
    enc = gpt2_encoding()
    rows = [render_example(example, enc, model.config.block_size) for example in examples]
    sum_loss = torch.zeros((len(rows), 4), device=device)
    n_scored = torch.zeros((len(rows), 4), device=device)
    lengths = [-(-len(r[0]) // LENGTH_BUCKET) * LENGTH_BUCKET for r in rows]  # rounded up to the bucket
    for batch in tqdm(list(token_batches(lengths, budget)), desc="hellaswag", disable=not progress):
        T = max(lengths[i] for i in batch)
        n_rows = min(1 << (len(batch) - 1).bit_length(), max(budget // T, len(batch)))  # padding rows: no one's
        # (B, 3, T) -> tokens, positions, segments, each (B, T); padding: token 0, position 0, segment -2.
        # Built and indexed on the CPU, so the GPU never waits while the next batch is prepared
        padded = [[row + [fill] * (T - len(row)) for row, fill in zip(rows[i], (0, 0, -2))] for i in batch]
        padded += [[[0] * T, [0] * T, [-2] * T]] * (n_rows - len(batch))
        tokens, pos, seg = torch.tensor(padded).unbind(1)
        # an ending's token k is predicted at k - 1, its first token at the context's last (n_ctx - 1);
        # an empty context leaves nothing to predict a first token from, so that one is not scored
        n_ctx = (seg == -1).sum(1, keepdim=True)
        source = torch.where(pos == n_ctx, n_ctx - 1, torch.arange(-1, T - 1))
        b, k = ((seg >= 0) & (source >= 0)).nonzero(as_tuple=True)  # the scored tokens: row b, index k
        ex, end, src, target = torch.tensor(batch)[b], seg[b, k], source[b, k], tokens[b, k]  # example, ending, ...
        tokens, pos, seg, b, ex, end, src, target = (t.to(device) for t in (tokens, pos, seg, b, ex, end, src, target))
        # token q sees token k <= q if k is the context's or in q's own segment
        causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
        mask = causal & ((seg[:, None, :] == -1) | (seg[:, None, :] == seg[:, :, None]))  # (B, T, T)
        with torch.autocast(device_type=device_type(device), dtype=torch.bfloat16, enabled=use_bf16):
            h = model.hidden(tokens, pos, mask.unsqueeze(1))
            logits = model.lm_head(h[b, src])  # (scored tokens, vocab)
        losses = F.cross_entropy(logits.float(), target, reduction="none")
        sum_loss.index_put_((ex, end), losses, accumulate=True)
        n_scored.index_put_((ex, end), torch.ones_like(losses), accumulate=True)
    sum_loss, n_scored = sum_loss.cpu(), n_scored.cpu()
    return list(zip(sum_loss.argmin(1).tolist(), (sum_loss / n_scored).argmin(1).tolist()))


def evaluate(model, examples, device, budget=BATCH_TOKENS, use_bf16=False, progress=False):
    """(correct, correct_norm, total) over examples."""
    examples = list(examples)
    preds = predict(model, examples, device, budget, use_bf16, progress)
    correct = sum(p == ex["label"] for (p, _), ex in zip(preds, examples))
    correct_norm = sum(pn == ex["label"] for (_, pn), ex in zip(preds, examples))
    return correct, correct_norm, len(examples)


@torch.no_grad()
def plain_predictions(logits_of, examples, device, use_bf16=False):
    """The straightforward way, the lecture's: one example a forward pass, its 4 rows (context + ending, as
    render_example makes them) padded to the longest, logits (logits_of(tokens)) at every position, and a mask that
    keeps the endings' tokens. What predict() computes with a fraction of the work: (acc's, acc_norm's) picks."""
    enc = gpt2_encoding()
    preds = []
    for example in examples:
        tokens, _, segments = render_example(example, enc)
        ctx = [t for t, s in zip(tokens, segments) if s == -1]
        rows = [ctx + [t for t, s in zip(tokens, segments) if s == i] for i in range(4)]
        x = torch.zeros((4, max(len(row) for row in rows)), dtype=torch.long)
        mask = torch.zeros_like(x)
        for i, row in enumerate(rows):
            x[i, :len(row)] = torch.tensor(row)
            mask[i, len(ctx):len(row)] = 1
        x, mask = x.to(device), mask[:, 1:].to(device)  # position t predicts token t + 1
        with torch.autocast(device_type=device_type(device), dtype=torch.bfloat16, enabled=use_bf16):
            logits = logits_of(x)
        losses = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten(), reduction="none")
        sum_loss = (losses.view(4, -1) * mask).sum(1)
        preds.append((sum_loss.argmin().item(), (sum_loss / mask.sum(1)).argmin().item()))
    return preds


def main(argv=None):
    p = one_line_flag_errors(argparse.ArgumentParser(
        description="Score a Hugging Face GPT-2 on HellaSwag, as the lecture does (python hellaswag.py -m gpt2 -d cuda); "
                    "the data is downloaded once into HELLASWAG_CACHE (default ./hellaswag)"))
    p.add_argument("-m", "--model_type", default="gpt2", help="gpt2 ... gpt2-xl (OpenAI's weights, through Hugging "
                                                              "Face), or a local Hugging Face GPT-2 directory")
    p.add_argument("-d", "--device", default="cuda", help="the device to use: cuda, cuda:N, mps or cpu")
    p.add_argument("--data_file", help="a local HellaSwag jsonl (no download)")
    p.add_argument("--split", default="val", choices=("train", "val"))
    p.add_argument("--download_only", type=on_off, default=False, help="1: download the split and check it, no model")
    args = p.parse_args(argv)
    with one_line_errors():  # offline, a missing file, no GPU: one line, no traceback
        path = args.data_file or download(args.split)
        if not os.path.isfile(path):
            raise ValueError(f"--data_file {path!r} not found")
        examples = list(iterate_examples(path))
        if args.download_only:
            print(f"hellaswag {args.split}: {len(examples):,} examples in {path}")
            return
        device = init_device(args.device)
        published = () if os.path.isdir(args.model_type) else (args.model_type,)
        model = load_hf_gpt2(args.model_type, published).to(device).eval()
    if device_type(device) == "cuda":
        torch.set_float32_matmul_precision("high")  # use tf32, as the lecture does
    correct_norm = 0
    logits_of = lambda x: model(x).logits
    for n, example in enumerate(examples, start=1):
        correct_norm += plain_predictions(logits_of, [example], device)[0][1] == example["label"]
        if n % 1000 == 0 or n == len(examples):
            print(f"{n} acc_norm: {correct_norm}/{n}={correct_norm / n:.4f}")


if __name__ == "__main__":
    run_script(main)
