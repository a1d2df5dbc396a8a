import os
import subprocess
import sys

from conftest import parse_args, ROOT
from tokenizer import EOT, gpt2_encoding, GPT2_VOCAB_SIZE
from train_gpt2 import scratch_config

PROMPT = "Hello, I'm a language model,"
PROMPT_IDS = [15496, 11, 314, 1101, 257, 3303, 2746, 11]  # the lecture's prompt, as GPT-2 tokenizes it


def test_gpt2_encoding_offline_from_the_repos_files():
    enc = gpt2_encoding()
    assert enc.n_vocab == GPT2_VOCAB_SIZE == 50257
    assert enc.eot_token == EOT == 50256
    # a model trained from scratch pads the vocabulary to the next multiple of 128, and no further
    vocab = scratch_config(parse_args([])).vocab_size
    assert vocab % 128 == 0 and 0 <= vocab - enc.n_vocab < 128 and vocab == 50304
    assert enc.encode(PROMPT) == PROMPT_IDS
    assert enc.decode(PROMPT_IDS) == PROMPT


# a fresh process in which any connection fails, as on a machine without internet
OFFLINE = """import socket
def refuse(*args):
    raise OSError(f"no network: {args[-1]}")
socket.socket.connect = socket.getaddrinfo = refuse
from tokenizer import gpt2_encoding
print(gpt2_encoding().encode("Hello, I'm a language model,"))
"""


def test_nothing_is_downloaded_even_where_a_configured_cache_lacks_gpt2s_files(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR")}
    env["TMPDIR"] = str(tmp_path)  # not even tiktoken's own cache in the temp dir could help
    out = subprocess.run([sys.executable, "-c", OFFLINE], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(PROMPT_IDS)
    assert os.listdir(tmp_path) == []  # nothing was fetched or cached
    other = tmp_path / "cache"  # a shared cluster's cache, holding other encodings only
    other.mkdir()
    (other / "9b5ad71b2ce5302211f9c61530b329a4922fc6a4").write_bytes(b"cl100k's, say")
    script = OFFLINE + "import os; print(os.environ['TIKTOKEN_CACHE_DIR'])\n"
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=dict(env, TIKTOKEN_CACHE_DIR=str(other)),
                         capture_output=True, text=True)
    # the repo's files stood in, without a download; the user's setting is left as it was for anything else
    assert out.returncode == 0 and out.stdout.splitlines() == [str(PROMPT_IDS), str(other)], out.stderr
    assert os.listdir(other) == ["9b5ad71b2ce5302211f9c61530b329a4922fc6a4"]
