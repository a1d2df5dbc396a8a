import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import FIXTURES, ROOT, error_of
import fineweb as fineweb_py
from tokenizer import gpt2_encoding
from train_gpt2 import DataLoaderLite

DOCS = os.path.join(FIXTURES, "fineweb_edu_40.jsonl")  # 40 real FineWeb-Edu documents


def fineweb(*args):
    return [sys.executable, "fineweb.py", "--num_proc", "2", *args]


def expected_stream(path):
    enc = gpt2_encoding()
    out = []
    with open(path) as f:
        for line in f:
            out += [50256] + enc.encode_ordinary(json.loads(line)["text"])
    return np.array(out)


def shards_of(d):
    """Every file in d, shards in index order (val 000000 first), fineweb.json last."""
    return sorted(os.listdir(d), key=lambda n: (n == "fineweb.json", n.split("_")[-1]))


def test_shards_hold_every_document_in_order(tmp_path):
    out = subprocess.run(fineweb("--data_files", DOCS, "--local_dir", str(tmp_path), "--shard_size", "5000"),
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    stream = expected_stream(DOCS)
    n = len(stream)
    assert n == 23573
    names = shards_of(tmp_path)
    k = -(-n // 5000)  # ceil
    assert names[:-1] == ["edufineweb_val_000000.npy"] + [f"edufineweb_train_{i:06d}.npy" for i in range(1, k)]
    arrays = [np.load(tmp_path / name) for name in names[:-1]]
    assert all(a.dtype == np.uint16 and a.ndim == 1 for a in arrays)
    assert [len(a) for a in arrays] == [5000] * (k - 1) + [n - 5000 * (k - 1)]
    assert np.array_equal(np.concatenate(arrays).astype(np.int64), stream)
    assert f"{n:,} tokens in {k} shards" in out.stdout
    manifest = json.loads((tmp_path / "fineweb.json").read_text())
    data = [[DOCS, os.path.getsize(DOCS), os.path.getmtime(DOCS)]]  # a file by its size and time too: an edit shows
    assert manifest["complete"] and manifest["settings"] == {"data": data, "shard_size": 5000}
    assert manifest["shards"] == [{"name": name, "tokens": len(a), "max_id": int(a.max())} for name, a in zip(names[:-1], arrays)]


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
    assert 0 < len([n for n in written if n.endswith(".npy")]) < len(shards_of(clean)) - 1  # killed mid-run
    assert not json.loads((killed / "fineweb.json").read_text())["complete"]
    with pytest.raises(ValueError, match=r"the shards in .*killed are incomplete \(fineweb.json says fineweb.py did not finish\)"):
        DataLoaderLite(2, 8, data_root=str(killed))
    for name in written:
        if name.endswith(".npy"):  # every shard present is whole
            assert np.array_equal(np.load(killed / name), np.load(clean / name)), name
    out = subprocess.run(fineweb(*args, "--local_dir", str(killed)), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0
    assert "an interrupted run's" in out.stdout and "shards deleted, starting over" in out.stdout
    assert shards_of(killed) == shards_of(clean)  # no temporary file left either
    for name in shards_of(clean):
        assert (killed / name).read_bytes() == (clean / name).read_bytes()


def test_missing_data_file_is_a_clear_error(tmp_path):
    out = subprocess.run(fineweb("--data_files", "nope.jsonl", "--local_dir", str(tmp_path / "d")),
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert out.stderr.strip() == "error: cannot read the documents: data file 'nope.jsonl' not found"
    assert not (tmp_path / "d").exists()


def test_a_rerun_never_mixes_two_shard_sets(tmp_path, capsys):
    d = tmp_path / "shards"
    args = ["--data_files", DOCS, "--local_dir", str(d)]
    assert subprocess.run(fineweb(*args, "--shard_size", "5000"), cwd=ROOT, capture_output=True, timeout=300).returncode == 0
    before = {n: (d / n).read_bytes() for n in os.listdir(d)}
    # the same again: nothing to do; another --shard_size: refused, every file as it was (both decided
    # before any tokenizing, so they run in this process)
    fineweb_py.main([*args, "--shard_size", "5000"])
    assert "already holds these 5 shards: nothing to do" in capsys.readouterr().out
    assert error_of(fineweb_py.main, [*args, "--shard_size", "3000"]).startswith(
        f"error: {d} holds a complete shard set made with other settings")
    assert {n: (d / n).read_bytes() for n in os.listdir(d)} == before
    # a shard the manifest does not list is another run's: the loader refuses the mix
    np.save(d / "edufineweb_train_000009.npy", np.zeros(100, dtype=np.uint16))
    with pytest.raises(ValueError, match=r"edufineweb_train_000009.npy is not in fineweb.json \(left by another run\?\)"):
        DataLoaderLite(2, 8, data_root=str(d))
    # shards without a manifest came from elsewhere: fineweb.py will not write beside them
    os.remove(d / "fineweb.json")
    assert error_of(fineweb_py.main, [*args, "--shard_size", "5000"]).startswith(
        f"error: {d} holds shards but no fineweb.json (made by another tool?)")
    (tmp_path / "file").write_text("mine")
    assert error_of(fineweb_py.main, ["--data_files", DOCS, "--local_dir", str(tmp_path / "file")]) == \
        f"error: --local_dir {tmp_path}/file is a file: pass a directory"
    assert (tmp_path / "file").read_text() == "mine"
    assert DataLoaderLite(2, 8, data_root=str(d)).total == 23573 - 5000 + 100  # taken as they are


@pytest.mark.parametrize("content, problem", [
    ("", "error: the documents hold no text: there is nothing to tokenize"),
    ('{"text": "a"}\n{"text": null}\n', "line 2: expected a JSON object with a \"text\" string, got '{\"text\": null}'"),
    ('{"text": "a"}\n{"text": "b"}\n{"text": "c\n', "line 3: expected a JSON object with a \"text\" string, got '{\"text\": \"c'"),
    ('{"text": "a"}\n\n', "line 2: expected a JSON object with a \"text\" string, got ''"),
])
def test_bad_documents_are_an_error_naming_the_line_and_leave_nothing(tmp_path, content, problem):
    docs = tmp_path / "docs.jsonl"
    docs.write_text(content)
    out = subprocess.run(fineweb("--data_files", str(docs), "--local_dir", str(tmp_path / "d"), "--shard_size", "1000"),
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]  # after the progress bar, if any
    assert last.startswith("error: ") and problem in last and (problem.startswith("error") or str(docs) in last), last
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_stops_the_pool_without_a_traceback_and_leaves_nothing(tmp_path, sig):
    big = tmp_path / "docs.jsonl"
    with open(DOCS) as f:
        big.write_text(f.read() * 100)  # ~2.4M tokens
    d = tmp_path / "d"
    proc = subprocess.Popen(fineweb("--data_files", str(big), "--local_dir", str(d), "--shard_size", "20000"),
                            cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while len(glob.glob(str(d / "*.npy"))) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    if sig == signal.SIGINT:
        os.killpg(proc.pid, sig)  # as a terminal's Ctrl-C: to the parent and every worker
    else:
        proc.send_signal(sig)  # as `kill PID`: the parent alone, which stops its workers
    _, stderr = proc.communicate(timeout=60)  # a hung pool would time out here
    assert proc.returncode == 128 + sig and "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == "interrupted: stopped, and this run's shards removed"
    assert not d.exists()


def test_fineweb_needs_neither_the_trainer_nor_torch():
    # it writes the shard format that machinery/shards.py defines; importing the trainer would load torch for nothing
    code = "import sys, fineweb; print(sorted(m for m in ('torch', 'train_gpt2') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


def test_a_second_run_into_the_same_local_dir_is_refused_and_the_first_makes_one_whole_set(tmp_path):
    # the second used to see the first's unfinished record, delete its shards while it wrote them, and write its
    # own: both exited 0, and the set was a mix of the two
    big = tmp_path / "docs.jsonl"
    with open(DOCS) as f:
        big.write_text(f.read() * 40)  # ~0.9M tokens: 47 shards, a few seconds
    d = tmp_path / "d"
    args = ["--data_files", str(big), "--local_dir", str(d), "--shard_size", "20000"]
    first = subprocess.Popen(fineweb(*args), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not glob.glob(str(d / "*.npy")) and time.time() < deadline and first.poll() is None:
        time.sleep(0.01)  # the first is writing its shards
    error = error_of(fineweb_py.main, [*args, "--num_proc", "1"])
    assert error == (f"error: --local_dir {d} is in use by another run (pid {first.pid} on {socket.gethostname()}): "
                     "wait for it to end, or use another --local_dir")
    _, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr
    manifest = json.loads((d / "fineweb.json").read_text())
    assert manifest["complete"] and len(manifest["shards"]) == len(glob.glob(str(d / "*.npy")))
    stream = np.concatenate([np.load(d / s["name"]) for s in manifest["shards"]])
    assert np.array_equal(stream, expected_stream(str(big)))  # the first run's documents, whole, once
    assert "fineweb.lock" not in os.listdir(d)


def test_a_latin1_file_a_full_disk_and_an_edited_input_are_one_line_each(tmp_path, monkeypatch, capsys):
    d = tmp_path / "d"
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    out = subprocess.run(fineweb("--data_files", str(latin), "--local_dir", str(d)), cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 1 and out.stderr.strip().splitlines()[-1] == (
        f"error: {latin} is not UTF-8 (byte 0xe9 near line 1): save it as UTF-8") and not d.exists()
    docs = tmp_path / "docs.jsonl"
    docs.write_text(open(DOCS).read())
    args = ["--data_files", str(docs), "--local_dir", str(d), "--shard_size", "5000", "--num_proc", "1"]
    real_save = np.save
    def full_disk(f, array):
        real_save(f, array[:10])
        raise OSError("1000000 requested and 866240 written")
    monkeypatch.setattr(np, "save", full_disk)
    error = error_of(fineweb_py.main, args)
    assert error == (f"error: cannot write {d}/edufineweb_val_000000.npy (1000000 requested and 866240 written): is "
                     "the disk full? Free some space and run it again") and not d.exists()
    monkeypatch.setattr(np, "save", real_save)
    fineweb_py.main(args)
    with open(docs, "a") as f:
        f.write('{"text": "one more document"}\n')  # edited since: its shards are not these
    os.utime(docs, (1, 1))
    assert error_of(fineweb_py.main, args).startswith(f"error: {d} holds a complete shard set made with other settings")


def test_a_plain_text_file_is_refused_with_where_it_goes_instead(tmp_path):
    error = error_of(fineweb_py.main, ["--data_files", os.path.join(ROOT, "input.txt"), "--local_dir", str(tmp_path / "d")])
    assert error == (f"error: cannot read the documents: {ROOT}/input.txt is not .jsonl, .json or .parquet, the files "
                     "whose 'text' fields this tokenizes; a plain text file needs no shards: pass it to train_gpt2.py "
                     "--data")
    assert not (tmp_path / "d").exists()

