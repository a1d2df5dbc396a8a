"""Export a checkpoint of this project as a Hugging Face GPT-2 directory.

    python export_hf.py log/model_19072.pt my-gpt2
    python -c "from transformers import GPT2LMHeadModel; GPT2LMHeadModel.from_pretrained('my-gpt2')"

The result is a plain GPT-2: the vocabulary cut back to 50257 (the padded rows are not tokens),
the four projection weights transposed back to Conv1D's (in, out) layout, lm_head tied to wte.
It works with transformers' pipelines, with eval_hellaswag.py, and on the hub.
"""
import argparse
import os
import shutil
import sys
import tempfile

from machinery.cli import one_line_errors, one_line_flag_errors, run_script
from tokenizer import EOT, GPT2_VOCAB_SIZE
from train_gpt2 import CONV1D_WEIGHTS, HF_MASK_BUFFERS, load_model


def export(model, out_dir):
    from transformers import GPT2Config, GPT2LMHeadModel
    c = model.config
    hf = GPT2LMHeadModel(GPT2Config(n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
                                    vocab_size=GPT2_VOCAB_SIZE, bos_token_id=EOT, eos_token_id=EOT))
    sd = {}
    for k, v in model.state_dict().items():
        if k.endswith(CONV1D_WEIGHTS):
            v = v.t()
        if k in ("transformer.wte.weight", "lm_head.weight"):
            v = v[:GPT2_VOCAB_SIZE]  # drop the padding rows
        sd[k] = v.contiguous()
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith(HF_MASK_BUFFERS)]
    if missing or unexpected:
        raise ValueError(f"cannot map the checkpoint onto GPT-2: missing {missing[:3]}, unexpected {unexpected[:3]}")
    parent, name = os.path.split(os.path.abspath(out_dir))
    tmp = tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=parent)  # a name no one else uses
    try:
        hf.save_pretrained(tmp)
        os.replace(tmp, out_dir)  # all or nothing
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # ours alone: made just now
        raise


def main(argv=None):
    p = one_line_flag_errors(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    p.add_argument("checkpoint", help="a checkpoint written by train_gpt2.py: a .pt file, or a .dcp directory of shards")
    p.add_argument("out_dir", help="the Hugging Face directory to create (must not exist)")
    args = p.parse_args(argv)
    if os.path.exists(args.out_dir):
        sys.exit(f"error: {args.out_dir} exists: choose a new directory")
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.out_dir))):
        sys.exit(f"error: {os.path.dirname(os.path.abspath(args.out_dir))} does not exist: make it first, or choose "
                 "another place for the export")
    with one_line_errors():
        if not os.path.normpath(args.checkpoint).endswith((".pt", ".dcp")):
            raise ValueError(f"{args.checkpoint!r} is not a checkpoint of this project (a .pt file or a .dcp directory)")
        export(load_model(args.checkpoint), args.out_dir)
    print(f"wrote {args.out_dir}: load it with GPT2LMHeadModel.from_pretrained({args.out_dir!r})")


if __name__ == "__main__":
    run_script(main)
