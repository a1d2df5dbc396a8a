"""FineWeb-Edu (sample-10BT) as GPT-2 tokens: 100M-token uint16 shards for train_gpt2.py.

    python fineweb.py                      # download through `datasets`, write ./edu_fineweb10B/
    python fineweb.py --streaming 1        # stream from the hub instead of caching ~30 GB first
    python fineweb.py --data_files my.jsonl --local_dir my_shards --shard_size 1000000

Every document is preceded by <|endoftext|> (50256), the separator GPT-2 was trained with, and
the stream is cut into shards of --shard_size tokens (the last holds the remainder): a document
that overflows a shard continues in the next. Shard 0 is the validation split, the rest train:
edufineweb_val_000000.npy, edufineweb_train_000001.npy, ...

Each shard is written under a temporary name and renamed when complete, so an interrupted run
never leaves a truncated shard. fineweb.json records the run: its settings when it starts, and
every shard when it ends (only then does it say complete), so a set cut short is never taken for
a whole one. A rerun of an interrupted run deletes its shards and starts over; a rerun of a
finished one has nothing to do; shards made from other data or another --shard_size are never
mixed with new ones: the run refuses and touches nothing.
"""
import argparse
import contextlib
import glob
import json
import multiprocessing as mp
import os
import signal
import sys
import time

import numpy as np
from tqdm import tqdm

from machinery.cli import error_text, one_line_errors, one_line_flag_errors, run_script
from machinery.locks import hold_directory
from machinery.shards import MANIFEST, PREFIX, read_manifest, write_manifest, write_shard
from tokenizer import EOT, gpt2_encoding


def tokenize(text):
    """One document -> uint16 tokens, <|endoftext|> first. Runs in the worker processes."""
    enc = gpt2_encoding()  # cached per process after the first call
    tokens = np.array([EOT] + enc.encode_ordinary(text), dtype=np.int64)
    assert (0 <= tokens).all() and (tokens < 2**16).all(), "GPT-2 ids must fit in uint16"
    return tokens.astype(np.uint16)


def prepare_local_dir(local_dir, settings):
    """True if local_dir is ready for this run's shards, False if it already holds them all; else an error."""
    shards = glob.glob(os.path.join(local_dir, f"{PREFIX}_*.npy"))
    manifest = read_manifest(local_dir)
    if manifest is None:
        if shards:
            raise ValueError(f"{local_dir} holds shards but no {MANIFEST} (made by another tool?): "
                             "choose another --local_dir, or delete them")
        return True
    if not manifest.get("complete"):  # an interrupted run: its shards are a partial set
        for stale in shards + glob.glob(os.path.join(local_dir, "*.tmp")):
            os.remove(stale)
        print(f"{local_dir}: an interrupted run's {len(shards)} shards deleted, starting over")
        return True
    if manifest.get("settings") != settings:
        raise ValueError(f"{local_dir} holds a complete shard set made with other settings "
                         f"({manifest.get('settings')}): choose another --local_dir, or delete it to remake it")
    print(f"{local_dir} already holds these {len(manifest['shards'])} shards: nothing to do")
    return False


def read_jsonl(paths):
    """The text of each line of local jsonl files, checked, so an error can name the file and line."""
    for path in paths:
        with open(path, encoding="utf-8") as f:
            lineno = 0
            try:
                for lineno, line in enumerate(f, start=1):
                    try:
                        doc = json.loads(line)
                    except ValueError:
                        doc = None
                    if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
                        raise ValueError(f"{path} line {lineno}: expected a JSON object with a \"text\" string, got "
                                         f"{line.strip()[:60]!r}")
                    yield doc["text"]
            except UnicodeDecodeError as e:  # f reads ahead: the line is the one after the last good one, or near it
                raise ValueError(f"{path} is not UTF-8 (byte {e.object[e.start]:#04x} near line {lineno + 1}): "
                                 "save it as UTF-8") from None


def load_documents(data_files, streaming):
    """The text of every document: local jsonl read here, other files and the hub through `datasets`."""
    if data_files:
        missing = [f for f in data_files if not os.path.isfile(f)]
        if missing:
            raise ValueError(f"data file {missing[0]!r} not found")
        other = [f for f in data_files if not f.endswith((".jsonl", ".json", ".parquet"))]
        if other:  # `datasets` would fail with "An error occurred while generating the dataset"
            raise ValueError(f"{other[0]} is not .jsonl, .json or .parquet, the files whose 'text' fields this "
                             "tokenizes; a plain text file needs no shards: pass it to train_gpt2.py --data")
        if all(f.endswith(".jsonl") for f in data_files):
            return read_jsonl(data_files)
    import datasets  # imported here: a slow import that only this step needs
    if data_files:
        kind = "parquet" if data_files[0].endswith(".parquet") else "json"
        ds = datasets.load_dataset(kind, data_files=data_files, split="train", streaming=streaming)
    else:
        ds = datasets.load_dataset("HuggingFaceFW/fineweb-edu", name="sample-10BT", split="train",
                                   streaming=streaming)
    if ds.column_names is not None and "text" not in ds.column_names:
        raise ValueError(f"the documents have no 'text' column (columns: {', '.join(ds.column_names)})")
    return (checked_text(doc, i) for i, doc in enumerate(ds))


def checked_text(doc, i):
    if not isinstance(doc.get("text"), str):
        raise ValueError(f"document {i} has no text (its 'text' is {doc.get('text')!r})")
    return doc["text"]


def quiet_worker():
    """A tokenizer process ignores Ctrl-C: the parent alone handles it, and stops the pool (a pool whose workers
    each got the SIGINT could hang); it dies quietly of the SIGTERM that stops it (not the parent's handler)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def write_shards(texts, local_dir, shard_size, num_proc):
    """Tokenize texts into shards of shard_size tokens; returns each shard's record and the token count."""
    total, index, count = 0, 0, 0
    buf = np.empty((shard_size,), dtype=np.uint16)  # the shard being filled
    bar = None
    written = []  # each shard's name, length and largest id, for the manifest
    with mp.Pool(num_proc, initializer=quiet_worker) as pool, \
            contextlib.ExitStack() as on_exit:
        on_exit.callback(lambda: bar is not None and bar.close())  # however it ends: no bar after the last line
        for tokens in pool.imap(tokenize, texts, chunksize=16):
            total += len(tokens)
            while len(tokens):  # a document may spill over into the next shard(s)
                if bar is None:
                    bar = tqdm(total=shard_size, unit="tokens", desc=f"shard {index}")
                n = min(len(tokens), shard_size - count)
                buf[count:count + n] = tokens[:n]
                count += n
                bar.update(n)
                tokens = tokens[n:]
                if count == shard_size:  # full: write it, start the next
                    bar.close()
                    bar = None
                    written.append(write_shard(local_dir, index, buf))
                    index, count = index + 1, 0
    if count:  # the remainder
        bar.close()
        written.append(write_shard(local_dir, index, buf[:count]))
    return written, total


def main(argv=None):
    p = one_line_flag_errors(argparse.ArgumentParser(description="Tokenize FineWeb-Edu sample-10BT into uint16 shards."))
    p.add_argument("--data_files", nargs="+", help="local json/jsonl/parquet files with a 'text' column (no download)")
    p.add_argument("--local_dir", default="edu_fineweb10B", help="where the shards go")
    p.add_argument("--shard_size", type=int, default=10**8,
                   help="tokens per shard (the trainer holds each shard open: keep their number under `ulimit -n`)")
    p.add_argument("--streaming", type=int, choices=(0, 1), default=0, help="stream from the hub (1) instead of caching it")
    p.add_argument("--num_proc", type=int, default=os.cpu_count(), help="tokenizer processes")
    args = p.parse_args(argv)
    if args.shard_size < 1 or args.num_proc < 1:
        sys.exit("error: --shard_size and --num_proc must be at least 1")
    try:
        docs = load_documents(args.data_files, bool(args.streaming))
    except Exception as e:
        sys.exit(f"error: cannot read the documents: {error_text(e)}")
    # a local file by its size and modification time too: shards of an edited file are not its shards
    settings = {"data": [[os.path.abspath(f), os.path.getsize(f), os.path.getmtime(f)] for f in args.data_files]
                if args.data_files else "HuggingFaceFW/fineweb-edu sample-10BT", "shard_size": args.shard_size}
    with contextlib.ExitStack() as held:
        with one_line_errors():
            # one run at a time in --local_dir: a second would delete the first's shards while it writes them.
            # A directory made for a run that leaves nothing in it is removed again
            held.enter_context(hold_directory(args.local_dir, "--local_dir", "fineweb.lock"))
            if not prepare_local_dir(args.local_dir, settings):
                return
            write_manifest(args.local_dir, settings)  # not complete until the end
        t0 = time.time()
        received = []  # SIGTERM (a scheduler, `kill`) stops the run as Ctrl-C does, cleaning up after itself

        def stop(signum, frame):
            received.append(signum)
            raise KeyboardInterrupt
        signal.signal(signal.SIGTERM, stop)
        try:
            written, total = write_shards(docs, args.local_dir, args.shard_size, args.num_proc)
            if not written:
                raise ValueError("the documents hold no text: there is nothing to tokenize")
        except (ValueError, OSError, KeyboardInterrupt) as e:
            # a bad document or a Ctrl-C: leave nothing of this run behind, not even a partial set
            for path in glob.glob(os.path.join(args.local_dir, f"{PREFIX}_*")) + [os.path.join(args.local_dir, MANIFEST)]:
                os.remove(path)
            held.close()  # the lock, and the directory if this run made it
            print(file=sys.stderr)  # a progress bar may have been cut mid-line: the message gets a line of its own
            if isinstance(e, KeyboardInterrupt):
                print("interrupted: stopped, and this run's shards removed", file=sys.stderr, flush=True)
                sys.stdout.flush()
                # not sys.exit: the pool, interrupted mid-task, can leave a thread that Python's exit waits on forever
                os._exit(128 + (received[0] if received else signal.SIGINT))  # as a shell reports the signal
            sys.exit(f"error: {error_text(e)}")
        write_manifest(args.local_dir, settings, written)
    dt = time.time() - t0
    print(f"{total:,} tokens in {len(written)} shards in {args.local_dir}/: {dt:.1f} s, "
          f"{total / dt:,.0f} tokens/s with {args.num_proc} processes")


if __name__ == "__main__":  # the guard lets worker processes import this file where they are spawned
    run_script(main)  # a Ctrl-C while tokenizing is handled in main; before that nothing was written
