"""GPT-2's tokenizer without the network: tiktoken's "gpt2" encoding, from the BPE files in tiktoken_cache/.

tiktoken downloads GPT-2's two BPE files once into its cache (TIKTOKEN_CACHE_DIR), each named by the
sha1 of its URL, and checks their sha256 when it reads them. This repo ships the two files so named,
so a machine without internet tokenizes too; a TIKTOKEN_CACHE_DIR set by the user wins where it holds them.
"""
import os

import tiktoken

# GPT-2's vocabulary: 50,000 BPE merges + 256 byte tokens + <|endoftext|>, the last id
GPT2_VOCAB_SIZE = 50257
EOT = 50256  # <|endoftext|>: GPT-2 saw it between documents

CACHE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiktoken_cache")


def gpt2_encoding():
    """tiktoken's GPT-2 encoding (50,257 tokens): from TIKTOKEN_CACHE_DIR if it holds GPT-2's files, else from this
    repo's (a shared cluster's cache may hold other encodings only: tiktoken would then try to download)."""
    configured = os.environ.get("TIKTOKEN_CACHE_DIR")
    if configured and all(os.path.isfile(os.path.join(configured, name)) for name in os.listdir(CACHE_DIR)):
        return tiktoken.get_encoding("gpt2")
    os.environ["TIKTOKEN_CACHE_DIR"] = CACHE_DIR  # read when the encoding loads, which it does once a process
    try:
        return tiktoken.get_encoding("gpt2")
    finally:
        if configured is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = configured
