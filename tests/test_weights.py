"""Starting from weights, sampling from a checkpoint, exporting to Hugging Face."""
import os

import pytest
import torch
from transformers import GPT2LMHeadModel

import hellaswag
import train_gpt2
from conftest import HELLASWAG_20, INPUT, NO_SHAPE, error_of, make_hf_checkpoint, read_log, run
from machinery.world import World
from train_gpt2 import DataLoaderLite, evaluate_loss, load_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    out = run(["train_gpt2.py", *NO_SHAPE, "--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--max_steps", "3",
               "--log_dir", str(d)])
    assert out.returncode == 0, out.stderr
    return str(d / "model_00002.pt")


def test_export_loads_in_transformers_with_the_same_logits(checkpoint, tmp_path):
    (tmp_path / "hf.tmp").mkdir()  # a user's own directory of the name export once used for its temporary copy
    (tmp_path / "hf.tmp" / "notes.txt").write_text("mine")
    out = run(["export_hf.py", checkpoint, str(tmp_path / "hf")])
    assert out.returncode == 0, out.stderr
    assert sorted(os.listdir(tmp_path)) == ["hf", "hf.tmp"] and (tmp_path / "hf.tmp" / "notes.txt").read_text() == "mine"
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    ours = load_model(checkpoint).eval()
    assert hf.config.vocab_size == 50257 and ours.config.vocab_size == 50304
    idx = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(0))  # the context: 16
    with torch.no_grad():
        diff = (hf(idx).logits - ours(idx)[0][..., :50257]).abs().max().item()
    assert diff < 1e-5
    again = run(["export_hf.py", checkpoint, str(tmp_path / "hf")])
    assert again.returncode != 0 and "exists: choose a new directory" in again.stderr


def test_sample_command_continues_a_prompt_from_a_checkpoint(checkpoint):
    out = run(["sample.py", "-m", checkpoint, "--prompt", "ROMEO:", "--num_samples", "3", "--max_new_tokens", "10",
               "-d", "cpu"])
    assert out.returncode == 0, out.stderr
    assert [out.stdout.count(f"sample {i}: ROMEO:") for i in range(4)] == [1, 1, 1, 0]


def test_hellaswag_scores_a_checkpoint(checkpoint):
    out = run(["eval_hellaswag.py", "-m", checkpoint, "-d", "cpu", "--data_file",
               HELLASWAG_20, "--limit", "4"])
    assert out.returncode == 0, out.stderr
    c, cn, n = hellaswag.evaluate(load_model(checkpoint), hellaswag.iterate_examples(HELLASWAG_20, 4), "cpu")
    assert out.stdout.endswith(f"hellaswag_val_20.jsonl: acc {c / n:.4f} acc_norm {cn / n:.4f} examples 4\n")


def test_init_from_a_checkpoint_starts_from_its_weights(checkpoint, tmp_path):
    out = run(["train_gpt2.py", *NO_SHAPE, "--init_from", checkpoint, "--max_steps", "2", "--log_dir", str(tmp_path)])
    assert out.returncode == 0, out.stderr
    first_val = next(float(l) for s, k, l in read_log(tmp_path) if k == "val" and s == "0")
    model = load_model(checkpoint)
    assert model.config.block_size == 16  # a model trained from scratch has the context it was trained with
    val = DataLoaderLite(2, 16, split="val", data_root=INPUT)
    assert abs(first_val - evaluate_loss(model, val, 3 * 2, World())) < 1e-4  # --val_steps 3 batches of 2 sequences


def test_fine_tune_a_hugging_face_checkpoint_on_input_txt(tmp_path):
    path = make_hf_checkpoint(tmp_path / "hf", vocab_size=50257, n_embd=32, n_positions=64)
    out = run(["train_gpt2.py", *NO_SHAPE, "--init_from", path, "--max_steps", "15", "--max_lr", "3e-3",
               "--log_dir", str(tmp_path / "log")])
    assert out.returncode == 0, out.stderr
    train = [float(l) for _, k, l in read_log(tmp_path / "log") if k == "train"]
    assert train[-1] < train[0] - 0.3  # it learns
    assert torch.load(tmp_path / "log" / "model_00014.pt", weights_only=True)["model_config"]["vocab_size"] == 50257


def test_a_sequence_longer_than_a_pretrained_models_context_is_a_clear_error(tmp_path):
    path = make_hf_checkpoint(tmp_path / "hf", vocab_size=50257, n_embd=32, n_positions=64)
    argv = [*NO_SHAPE, "--init_from", path, "--seq_len", "128", "--total_batch_size", "256", "--log_dir", str(tmp_path / "log")]
    assert error_of(train_gpt2.main, argv) == "error: --seq_len 128 is longer than the model's context of 64"
    assert not (tmp_path / "log").exists()


def test_shape_flags_given_with_init_from_must_be_the_models_shape(tmp_path):
    path = make_hf_checkpoint(tmp_path / "hf", vocab_size=50257, n_embd=32, n_positions=64)  # 2 layers, 4 heads
    argv = [*NO_SHAPE, "--init_from", path, "--n_layer", "2", "--n_head", "4", "--log_dir", str(tmp_path / "log")]
    assert error_of(train_gpt2.main, [*argv, "--n_embd", "64"]) == (
        f"error: --n_embd 64 does not fit --init_from {path}, whose model has 32: leave the shape flags out (the model "
        "keeps its shape)")  # it used to train the 32-wide model without a word
    assert not (tmp_path / "log").exists()
    train_gpt2.main([*argv, "--n_embd", "32", "--max_steps", "1"])  # the model's own shape, said again: it trains
    assert [k for _, k, _ in read_log(tmp_path / "log")] == ["val", "train"]


def test_published_weights_offline_are_one_line_that_says_how_to_use_a_local_copy(tmp_path):
    # the tests run with Hugging Face offline, as a machine without internet would be
    error = error_of(train_gpt2.main, [*NO_SHAPE, "--init_from", "gpt2", "--log_dir", str(tmp_path / "log")])
    assert error == ("error: cannot download 'gpt2' from Hugging Face (offline?): on a machine online, save it with "
                     "GPT2LMHeadModel.from_pretrained('gpt2').save_pretrained('gpt2-local'), copy that directory "
                     "here and pass it instead")
    assert not (tmp_path / "log").exists()
