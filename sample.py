"""Sample from a model: a checkpoint of this project, a Hugging Face GPT-2 directory, or gpt2 ... gpt2-xl.

    python sample.py -m log/model_19072.pt --prompt "The meaning of life is" --num_samples 4 --max_new_tokens 64
"""
import argparse
import sys

import torch

from machinery.cli import check_utf8, error_text, one_line_errors, one_line_flag_errors, run_script
from machinery.inputs import check_vocab
from machinery.world import init_device
from tokenizer import GPT2_VOCAB_SIZE
from train_gpt2 import GPT2_PROMPT, load_model, pick_device, sample


def main(argv=None):
    p = one_line_flag_errors(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    p.add_argument("-m", "--model", required=True, help="a .pt checkpoint, a Hugging Face GPT-2 directory, or gpt2 ... gpt2-xl")
    p.add_argument("--prompt", default=GPT2_PROMPT)
    p.add_argument("--num_samples", type=int, default=4)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("-d", "--device", default="auto")
    args = p.parse_args(argv)
    with one_line_errors():
        check_utf8(args.prompt, "--prompt")
        if args.num_samples < 1 or args.max_new_tokens < 0:
            raise ValueError("--num_samples must be at least 1 and --max_new_tokens at least 0, got "
                             f"{args.num_samples} and {args.max_new_tokens}")
        device = init_device(pick_device(args.device))
        model = load_model(args.model).to(device)
        check_vocab(model, GPT2_VOCAB_SIZE - 1, "GPT-2 text (--prompt)")
    try:
        samples = sample(model, device, args.num_samples, args.max_new_tokens, args.seed, args.prompt)
    except (torch.OutOfMemoryError, RuntimeError) as e:  # --num_samples rows at once: too many for the device
        if not isinstance(e, torch.OutOfMemoryError) and "can't allocate memory" not in str(e):
            raise
        sys.exit(f"error: out of memory sampling {args.num_samples} rows at once ({error_text(e).split('. ')[0]}): "
                 "pass a smaller --num_samples")
    for i, text in enumerate(samples):
        print(f"sample {i}: {text}")


if __name__ == "__main__":
    run_script(main)
