import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import tiktoken

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "tests", "fixtures", "fineweb_edu_40.jsonl")  # 40 real FineWeb-Edu documents


def fineweb(*args):
    return [sys.executable, "fineweb.py", "--num_proc", "2", *args]


def expected_stream(path):
    enc = tiktoken.get_encoding("gpt2")
    out = []
    with open(path) as f:
        for line in f:
            out += [50256] + enc.encode_ordinary(json.loads(line)["text"])
    return np.array(out)


def shards_of(d):
    return sorted(os.listdir(d), key=lambda n: int(n.split("_")[-1].split(".")[0]))


def test_shards_hold_every_document_in_order(tmp_path):
    out = subprocess.run(fineweb("--data_files", DOCS, "--local_dir", str(tmp_path), "--shard_size", "5000"),
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    stream = expected_stream(DOCS)
    n = len(stream)
    assert n == 23573
    names = shards_of(tmp_path)
    k = -(-n // 5000)  # ceil
    assert names == ["edufineweb_val_000000.npy"] + [f"edufineweb_train_{i:06d}.npy" for i in range(1, k)]
    arrays = [np.load(tmp_path / name) for name in names]
    assert all(a.dtype == np.uint16 and a.ndim == 1 for a in arrays)
    assert [len(a) for a in arrays] == [5000] * (k - 1) + [n - 5000 * (k - 1)]
    assert np.array_equal(np.concatenate(arrays).astype(np.int64), stream)
    assert f"{n:,} tokens in {k} shards" in out.stdout


def test_a_killed_run_leaves_no_partial_shard_and_a_rerun_rebuilds_the_same(tmp_path):
    big = tmp_path / "docs.jsonl"
    with open(DOCS) as f:
        big.write_text(f.read() * 20)  # ~470K tokens
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    args = ["--data_files", str(big), "--shard_size", "3000"]
    assert subprocess.run(fineweb(*args, "--local_dir", str(clean)), cwd=ROOT, capture_output=True,
                          timeout=300).returncode == 0
    proc = subprocess.Popen(fineweb(*args, "--local_dir", str(killed)), cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(glob.glob(str(killed / "*.npy"))) < 5 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole group: the pool's workers too
    proc.wait()
    written = shards_of(killed)
    assert 0 < len([n for n in written if n.endswith(".npy")]) < len(shards_of(clean))  # killed mid-run
    for name in written:
        if name.endswith(".npy"):  # every shard present is whole
            assert np.array_equal(np.load(killed / name), np.load(clean / name)), name
    out = subprocess.run(fineweb(*args, "--local_dir", str(killed)), cwd=ROOT, capture_output=True, timeout=300)
    assert out.returncode == 0
    assert shards_of(killed) == shards_of(clean)  # no temporary file left either
    for name in shards_of(clean):
        assert (killed / name).read_bytes() == (clean / name).read_bytes()


def test_missing_data_file_is_a_clear_error(tmp_path):
    out = subprocess.run(fineweb("--data_files", "nope.jsonl", "--local_dir", str(tmp_path / "d")),
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert out.stderr.strip() == "error: cannot read the documents: data file 'nope.jsonl' not found"
    assert not (tmp_path / "d").exists()
