"""What a user hands the trainer besides flags, checked before any work: a text file to train on, a Hugging Face
GPT-2 directory to start from, token ids that fit the model. Whatever is wrong is a ValueError of one line that names the file and says what to do.
"""
import json
import os


def read_text(path):
    """A text file to train on, whole: UTF-8, not empty, not binary, and not JSON lines (whose documents are in
    its "text" fields: fineweb.py tokenizes those)."""
    try:
        with open(path, "r", encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"data {path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}): "
                         "pass a text file, or a directory of fineweb.py shards") from None
    if "\0" in text or not text.strip():
        raise ValueError(f"data {path} is {'binary (it holds NUL bytes)' if text.strip() else 'empty'}: "
                         "pass a text file, or a directory of fineweb.py shards")
    if path.endswith((".jsonl", ".json")) or is_json_object(text.lstrip().split("\n", 1)[0]):
        raise ValueError(f"data {path} is JSON, not text: make shards of its documents with `python fineweb.py "
                         f"--data_files {path} --local_dir DIR`, then pass --data DIR")
    return text


def is_json_object(line):
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def load_hf_gpt2(name_or_path, published):
    """transformers' GPT2LMHeadModel from a published name or a local directory, every tensor read from the files:
    transformers would fill a missing one with random numbers and carry on, and answer a mis-shaped one with a
    report of twenty lines."""
    from transformers import GPT2LMHeadModel  # imported here: only this path needs it
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # its bar over 28 tensors would bury a one-line error
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its warning about missing tensors: said below, in one line
    try:
        # mis-shaped tensors are listed below rather than raised: transformers' error points to a report
        hf, info = GPT2LMHeadModel.from_pretrained(name_or_path, output_loading_info=True, ignore_mismatched_sizes=True)
    except Exception as e:
        if name_or_path in published and not os.path.isdir(name_or_path):  # a download that failed: offline?
            raise ValueError(f"cannot download {name_or_path!r} from Hugging Face (offline?): on a machine online, "
                             f"save it with GPT2LMHeadModel.from_pretrained({name_or_path!r}).save_pretrained("
                             f"'{name_or_path}-local'), copy that directory here and pass it instead") from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot load a GPT-2 checkpoint from {name_or_path!r} ({first.rstrip('.')}): pass a directory "
                         "that save_pretrained wrote, a .pt checkpoint of this project, or a published name") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    # GPT-2's checkpoints leave out the attention masks (buffers, not weights) and lm_head (tied to wte)
    missing = sorted(k for k in info["missing_keys"] if not k.endswith(("attn.bias", "attn.masked_bias", "lm_head.weight")))
    unexpected = sorted(k for k in info["unexpected_keys"] if not k.endswith(("attn.bias", "attn.masked_bias")))
    if missing or unexpected:
        what = f"{missing[0]} is missing" if missing else f"{unexpected[0]} is not a GPT-2 tensor"
        raise ValueError(f"{name_or_path} does not hold a whole GPT-2 ({what}): pass a complete checkpoint")
    if info["mismatched_keys"]:
        name, saved, made = sorted(info["mismatched_keys"])[0]
        raise ValueError(f"{name_or_path}: {name} has shape {tuple(saved)}, but its config.json makes it {tuple(made)}: "
                         "the weights and config.json are of different models")
    return hf


def check_vocab(model, max_id, what):
    """Token ids must index the model's embedding: a larger one is an IndexError on the CPU, a
    device-side assert on CUDA, hours into a run. Check once, up front."""
    if max_id >= model.config.vocab_size:
        raise ValueError(f"{what} holds token id {max_id}, but the model's vocabulary has {model.config.vocab_size} "
                         "ids: use data made with its tokenizer, or a model with GPT-2's vocabulary")


def check_data(cfg, model, train_loader, val_loader):
    """Before training: the model is the one asked for (a shape flag given with --init_from is its shape), every
    token id of the data indexes its vocabulary, and the val split holds the --val_steps batches an evaluation
    reads (more would count some of them twice)."""
    for name in ("n_layer", "n_head", "n_embd"):  # --init_from's model keeps its own shape
        if cfg.init_from != "scratch" and name in getattr(cfg, "given", ()) and getattr(cfg, name) != getattr(
                model.config, name):
            raise ValueError(f"--{name} {getattr(cfg, name)} does not fit --init_from {cfg.init_from}, whose model has "
                             f"{getattr(model.config, name)}: leave the shape flags out (the model keeps its shape)")
    for loader in (train_loader, val_loader):
        check_vocab(model, loader.max_id, f"{cfg.data} ({loader.split})")
    chunks = (val_loader.total - 1) // (cfg.val_batch_size * cfg.seq_len)  # the val batches the split holds
    if cfg.val_steps > chunks:
        raise ValueError(f"--val_steps {cfg.val_steps} is more than the val split of {cfg.data} holds: "
                         f"{chunks} chunks of {cfg.val_batch_size} x {cfg.seq_len}: pass --val_steps {chunks} or less")
