"""What every test shares: the repo on sys.path, no network ever, the small runs' flags, and helpers.

tiktoken reads GPT-2's BPE files from the repo's tiktoken_cache/ (tokenizer.py), as it does for
a user, and the Hugging Face libraries are told to stay offline. Any attempt to open a non-local socket
fails the test, so a hidden download cannot slip in.

Test modules import what they need from here (`from conftest import ROOT, TINY, run`), never
from each other.
"""
import glob
import os
import re
import signal
import socket
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
INPUT = os.path.join(ROOT, "input.txt")  # tiny Shakespeare: 338,025 GPT-2 tokens, 90% train, 10% val
HELLASWAG_20 = os.path.join(FIXTURES, "hellaswag_val_20.jsonl")  # the first 20 HellaSwag val examples
sys.path.insert(0, ROOT)

# The flags of runs small enough for a test, to which tests add --max_steps, --log_dir and what they examine.
# Each reads val batches of 2 sequences (--val_batch_size; the recipe's 64 would be 32 times the work).
# 2 blocks of 32 channels, one micro-batch of 2 x 16 tokens a step, eager, no HellaSwag: a tenth of a second a step
SMALL = ["--data", INPUT, "--hellaswag", "0", "--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--batch_size", "2",
         "--seq_len", "16", "--total_batch_size", "32", "--compile", "0", "--warmup_steps", "1", "--val_batch_size", "2"]
# 1 block of 16 channels, 2 micro-batches a step, a val loss every 2 steps, fp32 on the CPU: runs that stop and resume
TINY = ["--data", INPUT, "--hellaswag", "0", "--n_layer", "1", "--n_head", "2", "--n_embd", "16", "--batch_size", "2",
        "--seq_len", "16", "--total_batch_size", "64", "--warmup_steps", "2", "--max_lr", "1e-3", "--eval_every", "2",
        "--val_steps", "2", "--val_batch_size", "2", "--sample_every", "1000", "--compile", "0", "--bf16", "0",
        "--device", "cpu"]
# 5 steps of 64 tokens, val and HellaSwag (20 examples) at steps 0, 2 and 4: one process against several
DDP = ["--data", INPUT, "--hellaswag_file", HELLASWAG_20, "--n_layer", "2", "--n_head", "2", "--n_embd", "32",
       "--batch_size", "2", "--seq_len", "16", "--total_batch_size", "64", "--max_steps", "5", "--warmup_steps", "2",
       "--max_lr", "1e-3", "--compile", "0", "--bf16", "0", "--device", "cpu", "--eval_every", "2", "--val_steps", "3",
       "--val_batch_size", "2"]
# SMALL's batch and schedule without a shape: for runs whose model comes from --init_from
NO_SHAPE = ["--data", INPUT, "--hellaswag", "0", "--batch_size", "2", "--seq_len", "16", "--total_batch_size", "32",
            "--warmup_steps", "1", "--eval_every", "1000", "--val_steps", "3", "--val_batch_size", "2", "--compile", "0",
            "--bf16", "0", "--device", "cpu"]

# set before anything imports transformers; subprocesses inherit them. tiktoken reads the repo's own
# BPE files (tokenizer.py), as it does for a user: a cache set elsewhere must not stand in for them
os.environ.pop("TIKTOKEN_CACHE_DIR", None)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# a shell starts a background job (`pytest &`, some CI runners) with SIGINT ignored, and a child process inherits
# that: the Ctrl-C tests would then send a signal nobody hears. Handled here, it is reset to the default in
# every child, as in a terminal, however the suite was started
signal.signal(signal.SIGINT, signal.default_int_handler)

_LOCAL = ("127.0.0.1", "localhost", "::1", "0.0.0.0")
_connect = socket.socket.connect


def _local_only_connect(self, address):
    if isinstance(address, tuple) and address[0] not in _LOCAL:
        raise RuntimeError(f"test tried to reach the network: {address}")
    return _connect(self, address)


def selects_gpu_tests(markexpr):
    """Whether a -m expression asks for the GPU tests: `-m gpu` does, `-m "not gpu"` and no -m do not."""
    return re.search(r"(?<!not )\bgpu\b", markexpr or "") is not None


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (tests/test_gpu.py); skipped without one, as in CI")
    # the CPU suite runs on the CPU even where a GPU is (a test's numbers must not depend on the machine), so the GPU
    # is hidden, before any test asks CUDA; `pytest -m gpu` asks for it, and sees it
    if not selects_gpu_tests(config.getoption("markexpr")):
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    monkeypatch.setattr(socket.socket, "connect", _local_only_connect)


def make_hf_checkpoint(path, seed=0, **shape):
    """A tiny GPT-2 with random weights saved as a Hugging Face directory at path."""
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = dict(n_positions=64, n_embd=32, n_layer=2, n_head=4, vocab_size=128)
    cfg.update(shape)
    if cfg["vocab_size"] <= 50256:  # keep the special-token ids inside a small vocabulary
        cfg.setdefault("bos_token_id", cfg["vocab_size"] - 1)
        cfg.setdefault("eos_token_id", cfg["vocab_size"] - 1)
    torch.manual_seed(seed)
    GPT2LMHeadModel(GPT2Config(**cfg)).eval().save_pretrained(path)
    return str(path)


@pytest.fixture
def hf_checkpoint(tmp_path):
    """Factory fixture: make_hf_checkpoint into this test's tmp_path."""
    return lambda name="tiny", seed=0, **shape: make_hf_checkpoint(tmp_path / name, seed, **shape)


def read_docs(*names):
    """The README and the guides in docs/ (all of them, or those named), as one text: what a reader is told."""
    paths = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
    chosen = [p for p in paths if not names or os.path.basename(p) in names]
    assert chosen, names
    return "\n".join(open(p).read() for p in chosen)


def parse_args(argv):
    """The settings a run of train_gpt2.py gets from these flags: its recipe, changed by them."""
    import train_gpt2
    from machinery import settings
    return settings.parse_args(argv, train_gpt2.RECIPE)


def run(args, cwd=ROOT, timeout=600, env=None):
    """`python *args` in a fresh process, from the repository root: what a user's shell would see."""
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def torchrun(nproc, args, timeout=600, launcher=("--standalone",), cwd=ROOT, env=None, script=None):
    """train_gpt2.py (or script) on nproc processes of this machine, started by torchrun (gloo on the CPU). Its
    stderr is what the processes themselves wrote there, rank by rank (torchrun's own report of a failure is
    left out)."""
    import tempfile
    with tempfile.TemporaryDirectory() as logs:
        cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, f"--nproc_per_node={nproc}",
               "--redirects", "2", "--log-dir", logs, script or os.path.join(ROOT, "train_gpt2.py"), *args]
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
        files = sorted(glob.glob(os.path.join(logs, "*", "attempt_0", "*", "stderr.log")),
                       key=lambda f: int(f.split(os.sep)[-2]))  # by local rank
        out.stderr = "".join(open(f).read() for f in files)
    return out


def read_log(log_dir):
    """log_dir/log.txt as a list of [step, kind, value] lines."""
    with open(os.path.join(log_dir, "log.txt")) as f:
        return [line.split() for line in f.read().splitlines()]


def assert_same_log(got, expected, tol=0.0, after=-1, kinds=("train", "val", "hella")):
    """Two runs logged the same records (step and kind, in order) with values within tol; tol 0: the very same
    text, digit for digit. after: only the steps after this one count (what a resumed run logs); kinds: only
    these records count."""
    got, expected = ([r for r in read_log(d) if int(r[0]) > after and r[1] in kinds] for d in (got, expected))
    assert [r[:2] for r in got] == [r[:2] for r in expected] and got, (got, expected)
    for (step, kind, a), (_, _, b) in zip(got, expected):
        assert (a == b) if tol == 0 else abs(float(a) - float(b)) <= tol, (step, kind, a, b)


def error_of(main, argv):
    """What main(argv) exits with: the one-line error message a user would see on stderr."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert isinstance(e.value.code, str), f"exit code {e.value.code}, no message"
    return e.value.code
