"""The token shard format: fineweb.py writes it, the trainer's DataLoaderLite reads it.

A shard set is a directory of 1-D uint16 .npy arrays named {PREFIX}_{split}_{index:06d}.npy (shard 0 is
val, the rest train), and fineweb.json, its manifest: the settings it was made with, and once the set is
whole, `complete` and each shard's name, length and largest token id.
"""
import errno
import json
import os
import resource

import numpy as np

from machinery.cli import error_text

MANIFEST = "fineweb.json"
PREFIX = "edufineweb"


def shard_name(index):
    """The file name of shard index: shard 0 is the val split, the rest train."""
    return f"{PREFIX}_{'val' if index == 0 else 'train'}_{index:06d}.npy"


def write_shard(local_dir, index, tokens):
    """Write a complete shard atomically (to a temporary file first, then renamed); its manifest record."""
    path = os.path.join(local_dir, shard_name(index))
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            np.save(f, tokens)
        os.replace(tmp, path)  # atomic: the shard appears whole or not at all
    except OSError as e:  # numpy's own words for a full disk: "1000000 requested and 866240 written"
        if os.path.exists(tmp):
            os.remove(tmp)
        raise OSError(f"cannot write {path} ({error_text(e)}): is the disk full? Free some space and run it "
                      "again") from None
    return {"name": os.path.basename(path), "tokens": len(tokens), "max_id": int(tokens.max())}


def write_manifest(local_dir, settings, shards=None):
    """fineweb.json: the run's settings, and once it is complete, each shard's record."""
    manifest = {"settings": settings, "complete": shards is not None, "shards": shards or []}
    path = os.path.join(local_dir, MANIFEST)
    with open(path + ".tmp", "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(path + ".tmp", path)


def read_manifest(data_root):
    """data_root's manifest, or None where there is none (shards made by another tool)."""
    path = os.path.join(data_root, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path} ({error_text(e)}): delete {data_root} and remake its shards with "
                         "fineweb.py") from None
    shards = manifest.get("shards") if isinstance(manifest, dict) else None
    if not isinstance(shards, list) or not all(isinstance(s, dict) and isinstance(s.get("name"), str) for s in shards):
        raise ValueError(f"{path} is damaged (it has no list of shards): delete {data_root} and remake its shards "
                         "with fineweb.py")
    return manifest


def shard_paths(data_root, split):
    """The split's shards in data_root, in order, checked against the manifest where fineweb.py wrote one,
    and each one's length where the manifest records it (else None)."""
    names = sorted(f for f in os.listdir(data_root) if f"_{split}_" in f and f.endswith(".npy"))
    lengths = {}  # the number of tokens in each shard, where the manifest says
    manifest = read_manifest(data_root)
    if manifest is not None:  # else shards from another tool (the lecture's fineweb.py, say): taken as they are
        if not manifest.get("complete"):
            raise ValueError(f"the shards in {data_root} are incomplete ({MANIFEST} says fineweb.py did not "
                             "finish): rerun fineweb.py the same way to remake them")
        listed = sorted(s["name"] for s in manifest["shards"] if f"_{split}_" in s["name"])
        lengths = {s["name"]: s.get("tokens") for s in manifest["shards"]}
        if names != listed:
            extra, lost = sorted(set(names) - set(listed)), sorted(set(listed) - set(names))
            problem = f"{extra[0]} is not in {MANIFEST} (left by another run?)" if extra else f"{lost[0]} is missing"
            raise ValueError(f"{data_root} is not the shard set fineweb.py made: {problem}: remake it with fineweb.py")
    if not names:
        raise ValueError(f"no {split} shards (*_{split}_*.npy) in {data_root}: run `python fineweb.py` to make them")
    return [os.path.join(data_root, name) for name in names], [lengths.get(name) for name in names]


def open_shard(path, expected_tokens=None):
    """A token shard, memory-mapped: a 1-D uint16 array, not empty, as long as the manifest says (if it says),
    checked from its header and its size alone."""
    try:
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    except OSError as e:
        if e.errno != errno.EMFILE:
            raise ValueError(f"cannot read shard {path} ({error_text(e)}): remake it with fineweb.py") from None
        # each shard, memory-mapped, holds a file open: too many shards for this process's limit
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        raise ValueError(f"cannot open shard {path}: its folder holds more shards than this process may hold open "
                         f"(ulimit -n: {limit}): remake them with a larger fineweb.py --shard_size (the default makes "
                         "100), or raise the limit") from None
    except Exception as e:  # truncated, a damaged header (numpy parses it: a SyntaxError), Python objects, not .npy
        raise ValueError(f"cannot read shard {path} ({error_text(e)}): remake it with fineweb.py") from None
    if tokens.ndim != 1 or tokens.dtype != np.uint16:
        raise ValueError(f"shard {path} is not a 1-D uint16 token array (dtype {tokens.dtype}, "
                         f"shape {tokens.shape}): remake it with fineweb.py")
    if len(tokens) == 0 or expected_tokens not in (None, len(tokens)):
        said = f", where {MANIFEST} says {expected_tokens:,}" if expected_tokens is not None else ""
        raise ValueError(f"shard {path} holds {len(tokens):,} tokens{said}: it was changed after fineweb.py made "
                         "it, or cut short; remake it with fineweb.py")
    return tokens
