"""HellaSwag, completion style: which of four endings does the model find most likely?

    python hellaswag.py -m gpt2 -d cuda                 # the 10,042 val examples
    python hellaswag.py -m log/model_19072.pt --limit 500
    python hellaswag.py -m my_hf_dir --data_file hellaswag_val.jsonl

Each ending is rendered as the context's tokens followed by the tokens of " " + ending, and
scored by the model's cross-entropy over the ending's tokens only. acc picks the lowest summed
loss, acc_norm the lowest mean loss per token (fairer to long endings). Published GPT-2 124M:
acc 0.2859, acc_norm 0.2955 (completion style, the original val file).
"""
import argparse
import json
import os
import sys
import urllib.request

import tiktoken
import torch
from torch.nn import functional as F
from tqdm import tqdm

DATA_CACHE_DIR = os.environ.get("HELLASWAG_CACHE", os.path.join(os.path.dirname(os.path.abspath(__file__)), "hellaswag"))
URLS = {split: f"https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_{split}.jsonl"
        for split in ("train", "val", "test")}


def download(split="val", cache_dir=DATA_CACHE_DIR):
    """The split's jsonl file, downloaded once into cache_dir (to a temporary name, then renamed)."""
    path = os.path.join(cache_dir, f"hellaswag_{split}.jsonl")
    if os.path.exists(path):
        return path
    os.makedirs(cache_dir, exist_ok=True)
    tmp = path + ".tmp"
    with urllib.request.urlopen(URLS[split], timeout=30) as r, open(tmp, "wb") as f:
        with tqdm(total=int(r.headers.get("content-length", 0)), unit="B", unit_scale=True,
                  desc=f"hellaswag {split}") as bar:
            while chunk := r.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))
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
    with open(path, encoding="utf-8") as f:
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


def render_example(example, enc):
    """(tokens (4, N), mask (4, N), label): the context + each ending; mask is 1 on the ending."""
    ctx = enc.encode(example["ctx"])
    rows, masks = [], []
    for ending in example["endings"]:
        end = enc.encode(" " + ending)  # the leading space: GPT-2's tokens carry the space before a word
        rows.append(ctx + end)
        masks.append([0] * len(ctx) + [1] * len(end))
    n = max(len(r) for r in rows)
    tokens = torch.zeros((4, n), dtype=torch.long)
    mask = torch.zeros((4, n), dtype=torch.long)
    for i, (r, m) in enumerate(zip(rows, masks)):
        tokens[i, :len(r)] = torch.tensor(r)
        mask[i, :len(m)] = torch.tensor(m)
    return tokens, mask, example["label"]


@torch.no_grad()
def score(model, rendered, device, use_bf16=False):
    """Predictions (acc, acc_norm) for a list of rendered examples, in one forward pass.

    The examples' rows are right-padded to one length: attention is causal, so padding after a
    row's last token cannot change the logits of the tokens before it, and the mask drops it.
    """
    n = max(t.size(1) for t, _, _ in rendered)
    tokens = torch.zeros((4 * len(rendered), n), dtype=torch.long)
    mask = torch.zeros_like(tokens)
    for i, (t, m, _) in enumerate(rendered):
        tokens[4 * i:4 * i + 4, :t.size(1)] = t
        mask[4 * i:4 * i + 4, :m.size(1)] = m
    tokens, mask = tokens.to(device), mask.to(device)
    with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=use_bf16):
        logits, _ = model(tokens)
    # the loss of predicting token t+1 from position t, for every position
    losses = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1),
                             reduction="none").view(tokens.size(0), -1)
    m = mask[:, 1:].float()  # only the ending's tokens count
    sum_loss = (losses * m).sum(dim=1).view(-1, 4)
    avg_loss = sum_loss / m.sum(dim=1).view(-1, 4)
    return sum_loss.argmin(dim=1).tolist(), avg_loss.argmin(dim=1).tolist()


def evaluate(model, examples, device, batch_size=16, use_bf16=False):
    """(correct, correct_norm, total) over examples, batch_size examples per forward pass."""
    enc = tiktoken.get_encoding("gpt2")
    correct = correct_norm = total = 0
    batch = []
    for i, example in enumerate(examples):
        batch.append(render_example(example, enc))
        if len(batch) == batch_size:
            c, cn = tally(model, batch, device, use_bf16)
            correct, correct_norm, total = correct + c, correct_norm + cn, total + len(batch)
            batch = []
    if batch:
        c, cn = tally(model, batch, device, use_bf16)
        correct, correct_norm, total = correct + c, correct_norm + cn, total + len(batch)
    return correct, correct_norm, total


def tally(model, batch, device, use_bf16):
    pred, pred_norm = score(model, batch, device, use_bf16)
    labels = [label for _, _, label in batch]
    return sum(p == l for p, l in zip(pred, labels)), sum(p == l for p, l in zip(pred_norm, labels))


def main(argv=None):
    # the command line needs the trainer's model loader; the trainer imports this file, so the
    # import is made here, when the command runs, and importing hellaswag stays free of it
    from train_gpt2 import GPT2_VOCAB_SIZE, bf16_fast, check_vocab, init_device, load_model, one_line_errors
    p = argparse.ArgumentParser(description="Score a model on HellaSwag (completion style).")
    p.add_argument("-m", "--model", default="gpt2", help="gpt2 ... gpt2-xl, a Hugging Face GPT-2 directory, or a .pt checkpoint")
    p.add_argument("-d", "--device", default="auto")
    p.add_argument("--data_file", help="a local HellaSwag jsonl (no download)")
    p.add_argument("--split", default="val", choices=("train", "val"))
    p.add_argument("--limit", type=int, help="score only the first N examples (at least 1)")
    p.add_argument("--batch_size", type=int, default=16, help="examples per forward pass")
    args = p.parse_args(argv)
    with one_line_errors():
        device = init_device(args.device)
        if args.limit is not None and args.limit < 1:
            raise ValueError(f"--limit must be at least 1, got {args.limit}")
        if args.batch_size < 1:
            raise ValueError(f"--batch_size must be at least 1, got {args.batch_size}")
        path = args.data_file or download(args.split)
        if not os.path.isfile(path):
            raise ValueError(f"data file {path!r} not found")
        examples = list(iterate_examples(path, args.limit))
        model = load_model(args.model).to(device).eval()
        check_vocab(model, GPT2_VOCAB_SIZE - 1, "GPT-2 text (HellaSwag)")
    c, cn, n = evaluate(model, tqdm(examples, desc="hellaswag"), device, args.batch_size,
                        use_bf16=bf16_fast(device))
    print(f"hellaswag {os.path.basename(path)}: acc {c / n:.4f} acc_norm {cn / n:.4f} examples {n}")


if __name__ == "__main__":
    # run as a script, this file is the module __main__: the trainer's `import hellaswag` must find
    # this module, not load the file a second time as another
    sys.modules["hellaswag"] = sys.modules[__name__]
    from train_gpt2 import run_script
    run_script(main)
