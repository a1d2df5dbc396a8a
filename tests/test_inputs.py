"""Every input a user can get wrong: it works as meant, or stops before any training with one line that names the
file, flag or variable and says what to do, exit code 1, nothing written."""
import json
import os
import pickle
import re
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import error_of, INPUT, make_hf_checkpoint, parse_args, run, SMALL
from machinery.settings import PROMPT_CHARS, samples_prompt
from machinery.shards import shard_name, write_manifest, write_shard
from tokenizer import EOT
import sample
import train_gpt2
from train_gpt2 import DataLoaderLite, GPT2_PROMPT


def refused(argv, tmp_path):
    """main(argv)'s one-line error, checking that the run wrote nothing: no log_dir made."""
    log = tmp_path / "log"
    error = error_of(train_gpt2.main, [*argv, "--log_dir", str(log)])
    assert not log.exists(), os.listdir(log)
    return error


# ----------------------------------------------------------------------------- text files and prompts

def test_endoftext_in_a_text_file_is_the_document_separator(tmp_path):
    text = tmp_path / "two.txt"
    text.write_text("First document.<|endoftext|>Second document.\n" * 40)
    tokens = train_gpt2.load_text_tokens(str(text))
    assert list(tokens).count(EOT) == 40 and tokens[3] == EOT  # "First", " document", ".", then the separator


def test_a_jsonl_given_as_text_is_refused_with_the_command_that_tokenizes_it(tmp_path):
    for name in ("docs.jsonl", "docs.txt"):  # by its name, or by its first line
        path = tmp_path / name
        path.write_text('{"text": "a document"}\n' * 100)
        assert refused([*SMALL, "--data", str(path), "--max_steps", "1"], tmp_path) == (
            f"error: data {path} is JSON, not text: make shards of its documents with `python fineweb.py "
            f"--data_files {path} --local_dir DIR`, then pass --data DIR")


def test_prompt_auto_takes_at_most_a_short_first_line_in_whole_words(tmp_path):
    text = tmp_path / "one_line.txt"
    text.write_text("word " * 10000)  # no line break anywhere
    prompt = samples_prompt(parse_args(["--data", str(text)]), GPT2_PROMPT)
    assert prompt == "word " * 15 + "word" and len(prompt) <= PROMPT_CHARS
    assert samples_prompt(parse_args(["--data", INPUT]), GPT2_PROMPT) == "First Citizen:\n"  # a short first line, whole


def test_a_prompt_holding_endoftext_samples_in_training_and_in_sample_py(tmp_path, capsys):
    train_gpt2.main([*SMALL, "--max_steps", "1", "--val_steps", "1", "--prompt", "<|endoftext|>Once",
                     "--log_dir", str(tmp_path)])
    assert capsys.readouterr().out.count("sample 3: <|endoftext|>Once") == 1
    sample.main(["-m", str(tmp_path / "model_00000.pt"), "-d", "cpu", "--prompt", "<|endoftext|>Once",
                 "--num_samples", "2", "--max_new_tokens", "3"])
    assert capsys.readouterr().out.count(": <|endoftext|>Once") == 2


# ----------------------------------------------------------------------------- flags that used to fail late

def test_more_val_steps_than_the_val_split_holds_is_refused_at_the_start(tmp_path):
    # input.txt's val split: 33,803 tokens, 1,056 chunks of 2 x 16; more would average repeated chunks
    assert refused([*SMALL, "--max_steps", "1", "--val_steps", "5000"], tmp_path) == (
        f"error: --val_steps 5000 is more than the val split of {INPUT} holds: 1056 chunks of 2 x 16: "
        "pass --val_steps 1056 or less")


# ----------------------------------------------------------------------------- resuming

def test_resume_says_which_checkpoint_it_continues_and_refuses_a_finished_run_and_a_directory(tmp_path, capsys):
    log = tmp_path / "log"
    args = [*SMALL, "--max_steps", "3", "--checkpoint_every", "2", "--val_steps", "1", "--log_dir", str(log)]
    train_gpt2.main(args)  # model_00001.pt, then model_00002.pt at the end
    error = error_of(train_gpt2.main, [*args, "--resume", str(log / "model_00002.pt")])
    assert error == (f"error: {log}/model_00002.pt ends its run (step 3 of 3): nothing is left to train; to train "
                     "on, start a new run with --init_from it and another --log_dir")
    error = error_of(train_gpt2.main, [*args, "--resume", str(log)])
    assert error == (f"error: checkpoint {log} is a directory: pass a checkpoint file in it (model_NNNNN.pt), or "
                     f"--resume auto --log_dir {log} for the newest one there")
    os.remove(log / "model_00002.pt")
    capsys.readouterr()
    train_gpt2.main([*args, "--resume", "auto"])
    out = capsys.readouterr().out
    assert f"resuming from {log}/model_00001.pt\n" in out and "resuming at step 2\n" in out


def test_a_log_txt_with_a_byte_that_is_not_utf8_resumes_and_keeps_it(tmp_path):
    log = tmp_path / "log"
    args = [*SMALL, "--max_steps", "3", "--checkpoint_every", "2", "--val_steps", "1", "--log_dir", str(log)]
    train_gpt2.main(args)
    with open(log / "log.txt", "ab") as f:
        f.write(b"# a note \xe9crit in Latin-1\n")  # a user's edit in another encoding
    os.remove(log / "model_00002.pt")
    train_gpt2.main([*args, "--resume", "auto"])  # from model_00001.pt: step 2's lines are set aside
    assert b"\xe9crit" in (log / "log.txt").read_bytes()


# ----------------------------------------------------------------------------- shards

@pytest.fixture
def shards(tmp_path):
    """A shard set as fineweb.py makes it: a val shard, two train shards, a complete manifest."""
    records = [write_shard(str(tmp_path), i, np.arange(200, dtype=np.uint16) + i) for i in range(3)]
    write_manifest(str(tmp_path), {"made_by": "test"}, records)
    return tmp_path


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(p.read_bytes()[:200]), r"cannot read shard .*_000001\.npy \(.*\): remake it with fineweb\.py"),
    (lambda p: p.write_bytes(b"\x93NUMPY\x01\x00\x10\x00{'descr': garbage}   \n" + bytes(64)),
     r"cannot read shard .*_000001\.npy \(.*\): remake it with fineweb\.py"),
    (lambda p: np.save(p, np.array([{"a": 1}] * 200, dtype=object)),
     r"cannot read shard .*_000001\.npy \(.*\): remake it with fineweb\.py"),
    (lambda p: np.save(p, np.zeros(0, dtype=np.uint16)),
     r"shard .*_000001\.npy holds 0 tokens, where fineweb\.json says 200: it was changed after fineweb\.py made it"),
    (lambda p: np.save(p, np.full(150, 60000, dtype=np.uint16)),
     r"shard .*_000001\.npy holds 150 tokens, where fineweb\.json says 200: it was changed after fineweb\.py made it"),
], ids=["truncated", "bad-header", "objects", "empty", "replaced"])
def test_a_damaged_shard_is_one_line_naming_it(shards, damage, message):
    damage(shards / shard_name(1))
    with pytest.raises(ValueError, match=message):
        DataLoaderLite(2, 16, data_root=str(shards))


def test_a_shard_replaced_with_ids_past_the_vocabulary_is_caught_from_the_data_not_the_manifest(shards, tmp_path):
    np.save(shards / shard_name(2), np.full(200, 60000, dtype=np.uint16))  # the same length: the manifest is fooled
    error = refused([*SMALL, "--data", str(shards), "--max_steps", "1", "--val_steps", "1"], tmp_path)
    assert error.startswith(f"error: {shards} (train) holds token id 60000, but the model's vocabulary has 50304 ids")


def test_more_shards_than_the_process_may_hold_open_is_one_line_saying_what_to_do(tmp_path):
    # fineweb.py --shard_size 1 wrote 23,573 shards; each one, memory-mapped, holds a file open
    (tmp_path / "many").mkdir()
    records = [write_shard(str(tmp_path / "many"), i, np.arange(50, dtype=np.uint16) + i) for i in range(120)]
    write_manifest(str(tmp_path / "many"), {"made_by": "test"}, records)
    limit = "import resource; resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))"
    out = run(["-c", f"{limit}; import sys; sys.argv[0] = 'train_gpt2.py'; from machinery.cli import run_script; "
                     "import train_gpt2; run_script(train_gpt2.main)", *SMALL, "--data", str(tmp_path / "many"),
               "--max_steps", "1", "--val_steps", "1", "--log_dir", str(tmp_path / "log")])
    assert out.returncode == 1
    assert re.fullmatch(r"error: cannot open shard .*/edufineweb_train_0000\d\d\.npy: its folder holds more shards than "
                        r"this process may hold open \(ulimit -n: 64\): remake them with a larger fineweb.py "
                        r"--shard_size \(the default makes 100\), or raise the limit\n", out.stderr), out.stderr


def test_a_manifest_without_its_shard_list_is_one_line(shards):
    (shards / "fineweb.json").write_text(json.dumps({"settings": {}, "complete": True}))
    with pytest.raises(ValueError, match=r"fineweb\.json is damaged \(it has no list of shards\): delete .* and remake"):
        DataLoaderLite(2, 16, data_root=str(shards))


# ----------------------------------------------------------------------------- weights

def test_a_hugging_face_directory_missing_a_tensor_or_mis_shaped_is_one_line(tmp_path):
    whole = make_hf_checkpoint(tmp_path / "whole")
    weights = load_file(os.path.join(whole, "model.safetensors"))
    lacking = make_hf_checkpoint(tmp_path / "lacking")
    save_file({k: v for k, v in weights.items() if k != "transformer.h.1.mlp.c_fc.weight"},
              os.path.join(lacking, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError) as e:
        train_gpt2.load_model(lacking)  # transformers would fill it with random numbers and say nothing we show
    assert str(e.value) == f"{lacking} does not hold a whole GPT-2 (transformer.h.1.mlp.c_fc.weight is missing): " \
                           "pass a complete checkpoint"
    wrong = make_hf_checkpoint(tmp_path / "wrong")
    config = json.loads((tmp_path / "wrong" / "config.json").read_text())
    (tmp_path / "wrong" / "config.json").write_text(json.dumps({**config, "n_embd": 64}))
    with pytest.raises(ValueError) as e:
        train_gpt2.load_model(wrong)
    assert str(e.value).startswith(f"{wrong}: ") and "but its config.json makes it" in str(e.value)
    assert str(e.value).endswith("the weights and config.json are of different models") and "\n" not in str(e.value)


def test_a_directory_without_weights_and_a_device_as_data_are_one_line_each(tmp_path):
    (tmp_path / "empty").mkdir()
    assert refused([*SMALL, "--init_from", str(tmp_path / "empty")], tmp_path).startswith(
        f"error: cannot load a GPT-2 checkpoint from '{tmp_path}/empty' (")
    assert refused([*SMALL, "--init_from", str(tmp_path / "empty")], tmp_path).endswith(
        "): pass a directory that save_pretrained wrote, a .pt checkpoint of this project, or a published name")
    assert refused([*SMALL, "--data", "/dev/null"], tmp_path) == (
        "error: data '/dev/null' is neither a file nor a directory: run `python fineweb.py` to make the FineWeb-Edu "
        "shards, or pass --data with a text file such as input.txt")


def test_a_raw_pickle_is_refused_in_one_line_without_torchs_warning(tmp_path):
    path = tmp_path / "raw.pt"
    path.write_bytes(pickle.dumps({"model": [1, 2, 3]}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        error = error_of(train_gpt2.main, [*SMALL, "--init_from", str(path), "--log_dir", str(tmp_path / "log")])
    assert error.startswith(f"error: cannot read checkpoint {path}: it is truncated, or not a checkpoint")
    assert [str(w.message) for w in caught] == []


# ----------------------------------------------------------------------------- memory

@pytest.mark.parametrize("raised, said", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 24.00 GiB. GPU 0 has 79 GiB"), "CUDA out of memory"),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 25769803776 bytes. Error code 12"),
     "DefaultCPUAllocator: can't allocate memory: you tried to allocate 25769803776 bytes"),
], ids=["cuda", "cpu"])
def test_out_of_memory_in_a_step_says_which_batch_size_to_try(tmp_path, monkeypatch, raised, said):
    def forward(self, idx, targets=None):
        raise raised
    monkeypatch.setattr(train_gpt2.GPT, "forward", forward)
    error = error_of(train_gpt2.main, [*SMALL, "--max_steps", "1", "--val_steps", "1", "--log_dir", str(tmp_path)])
    assert error == (f"error: out of memory at --batch_size 2 ({said}): pass --batch_size 1; the total "
                     "batch stays 32 tokens, in more micro-steps")
