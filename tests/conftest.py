"""Shared test set-up: the repo on sys.path, and no network, ever.

tiktoken reads GPT-2's BPE files from the vendored cache in tests/fixtures/tiktoken_cache
(the files are named by the sha1 of their download URL, as tiktoken expects), and the
Hugging Face libraries are told to stay offline. Any attempt to open a non-local socket
fails the test, so a hidden download cannot slip in.
"""
import os
import socket
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
sys.path.insert(0, ROOT)

# set before anything imports tiktoken / transformers; subprocesses inherit them
os.environ["TIKTOKEN_CACHE_DIR"] = os.path.join(FIXTURES, "tiktoken_cache")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["CUDA_VISIBLE_DEVICES"] = ""

_LOCAL = ("127.0.0.1", "localhost", "::1", "0.0.0.0")
_connect = socket.socket.connect


def _local_only_connect(self, address):
    if isinstance(address, tuple) and address[0] not in _LOCAL:
        raise RuntimeError(f"test tried to reach the network: {address}")
    return _connect(self, address)


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


def error_of(main, argv):
    """What main(argv) exits with: the one-line error message a user would see on stderr."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert isinstance(e.value.code, str), f"exit code {e.value.code}, no message"
    return e.value.code
