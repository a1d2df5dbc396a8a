"""Score a model on HellaSwag (completion style): a checkpoint of this project, a Hugging Face GPT-2 directory,
or gpt2 ... gpt2-xl.

    python eval_hellaswag.py -m gpt2 -d cuda                 # the 10,042 val examples
    python eval_hellaswag.py -m log/model_19072.pt --limit 500
    python eval_hellaswag.py -m my_hf_dir --data_file hellaswag_val.jsonl

Published GPT-2 124M: acc 0.2859, acc_norm 0.2955 on the original val file (see hellaswag.py for how).
"""
import argparse
import os

import hellaswag
from machinery.cli import one_line_errors, one_line_flag_errors, run_script
from machinery.inputs import check_vocab
from machinery.world import bf16_fast, init_device
from tokenizer import GPT2_VOCAB_SIZE
from train_gpt2 import load_model, pick_device


def main(argv=None):
    p = one_line_flag_errors(argparse.ArgumentParser(description="Score a model on HellaSwag (completion style)."))
    p.add_argument("-m", "--model", default="gpt2", help="gpt2 ... gpt2-xl, a Hugging Face GPT-2 directory, or a checkpoint (.pt, .dcp)")
    p.add_argument("-d", "--device", default="auto")
    p.add_argument("--data_file", help="a local HellaSwag jsonl (no download)")
    p.add_argument("--split", default="val", choices=("train", "val"))
    p.add_argument("--limit", type=int, help="score only the first N examples (at least 1)")
    p.add_argument("--batch_tokens", type=int, default=hellaswag.BATCH_TOKENS, help="tokens per forward pass, padding included")
    args = p.parse_args(argv)
    with one_line_errors():
        device = init_device(pick_device(args.device))
        if args.limit is not None and args.limit < 1:
            raise ValueError(f"--limit must be at least 1, got {args.limit}")
        if args.batch_tokens < 1:
            raise ValueError(f"--batch_tokens must be at least 1, got {args.batch_tokens}")
        path = args.data_file or hellaswag.download(args.split)
        if not os.path.isfile(path):
            raise ValueError(f"data file {path!r} not found")
        examples = list(hellaswag.iterate_examples(path, args.limit))
        model = load_model(args.model).to(device).eval()
        check_vocab(model, GPT2_VOCAB_SIZE - 1, "GPT-2 text (HellaSwag)")
    c, cn, n = hellaswag.evaluate(model, examples, device, args.batch_tokens, use_bf16=bf16_fast(device), progress=True)
    print(f"hellaswag {os.path.basename(path)}: acc {c / n:.4f} acc_norm {cn / n:.4f} examples {n}")


if __name__ == "__main__":
    run_script(main)
