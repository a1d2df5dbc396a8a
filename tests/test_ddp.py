"""DistributedDataParallel on the CPU: torchrun with the gloo backend."""
import glob
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import DDP, HELLASWAG_20, ROOT, assert_same_log, read_log, run, torchrun
import train_gpt2


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    """DDP's run in one process, 2 micro-batches a step: what 2 processes of 1 micro-batch each must log."""
    d = tmp_path_factory.mktemp("one")
    out = run(["train_gpt2.py", *DDP, "--log_dir", str(d)])
    assert out.returncode == 0, out.stderr
    assert "= 2 micro-batches of 2 x 16 on each of 1 processes" in out.stdout
    return d


def test_two_processes_match_one_process_with_twice_the_accumulation(one, tmp_path):
    two = tmp_path / "two"
    out2 = torchrun(2, [*DDP, "--log_dir", str(two)])  # 1 micro-batch on each of 2 processes
    assert out2.returncode == 0, out2.stderr
    assert "= 1 micro-batches of 2 x 16 on each of 2 processes" in out2.stdout
    # train and val losses within 1e-5 (val at steps 0, 2 and 4; 3 val batches: rank 0 takes two, rank 1 one);
    # HellaSwag: 20 examples, 10 on each rank, counts summed: the same accuracy as one process
    assert_same_log(two, one, tol=1e-5)
    log = read_log(one)
    assert [(s, k) for s, k, _ in log if k != "train"] == [(s, k) for s in "024" for k in ("val", "hella")]
    losses = [float(l) for _, k, l in log if k == "train"]
    assert len(losses) == 5 and losses[-1] < losses[0]
    assert all(float(l) * 20 == round(float(l) * 20) for _, k, l in read_log(two) if k == "hella")  # a count of 20
    assert sorted(os.listdir(two)) == ["curves.png", "log.txt", "model_00004.pt"]  # rank 0 alone writes
    for line in ("step     0 |", "input.txt (train):", "non-decayed tensors:", "sample 3:", "saved "):
        assert out2.stdout.count(line) == 1, line  # rank 0 alone prints (and samples)
    assert out2.stderr == ""  # no warning (a process group not torn down, say), no traceback, from either rank


def two_nodes(args, cwds, envs, timeout=180):
    """Two torchrun 'nodes' of one process each on this machine (static rendezvous on 127.0.0.1), side by side:
    each node's exit code, stdout, and what its process wrote to stderr."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    def node(i):
        launcher = ("--nnodes=2", f"--node_rank={i}", "--master_addr=127.0.0.1", f"--master_port={port}")
        out = torchrun(1, args, timeout, launcher, cwd=cwds[i], env=dict(os.environ, **envs[i]))  # a hang fails here
        return out.returncode, out.stdout, out.stderr
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(node, (0, 1)))


def test_two_nodes_of_one_process_each_log_what_one_process_logs(one, tmp_path):
    out = two_nodes([*DDP, "--log_dir", str(tmp_path / "log")], [ROOT, ROOT], [{}, {}])
    assert [code for code, _, _ in out] == [0, 0], out[0][2] + out[1][2]
    assert "using device: cpu, 2 processes" in out[0][1] and out[1][1].count("step ") == 0  # global rank 0 prints
    assert_same_log(tmp_path / "log", one, tol=1e-5)


def test_every_node_resumes_rank_0s_checkpoint_or_none_does(tmp_path):
    node0, node1 = tmp_path / "node0", tmp_path / "node1"  # each node's own disk: --log_dir log is not shared
    node0.mkdir(), node1.mkdir()
    out = run([os.path.join(ROOT, "train_gpt2.py"), *DDP, "--log_dir", "log"], cwd=node0)
    assert out.returncode == 0, out.stderr
    assert sorted(os.listdir(node0 / "log")) == ["curves.png", "log.txt", "model_00004.pt"]
    # node 1 finds no checkpoint in its log: were it to start from step 0 while node 0 resumes, the run would mix two
    out = two_nodes([*DDP, "--log_dir", "log", "--resume", "auto"], [node0, node1], [{}, {}])
    (code0, _, err0), (code1, _, err1) = out
    assert code0 != 0 and code1 != 0
    assert err1 == "error: checkpoint 'log/model_00004.pt' not found\n"  # one line, no traceback
    assert err0 == ""  # node 0 stops because node 1 did, and leaves the saying to it
    assert not os.path.exists(node1 / "log" / "log.txt")


def test_nodes_agree_on_hellaswag_when_one_cannot_download_it(tmp_path):
    cache0, cache1 = tmp_path / "cache0", tmp_path / "cache1"
    cache0.mkdir()
    (cache0 / "hellaswag_val.jsonl").write_text(open(HELLASWAG_20).read())  # node 0 has it cached; node 1 is offline
    offline = {"https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}
    args = [a for a in DDP if a not in ("--hellaswag_file", HELLASWAG_20)]
    out = two_nodes([*args, "--log_dir", str(tmp_path / "log")], [ROOT, ROOT],
                    [dict(offline, HELLASWAG_CACHE=str(cache0)), dict(offline, HELLASWAG_CACHE=str(cache1))])
    (code0, out0, err0), (code1, _, err1) = out
    assert (code0, code1) == (0, 0), err0 + err1
    assert "hellaswag: no data (" in out0 and "on some node): training goes on without it" in out0
    kinds = [k for _, k, _ in read_log(tmp_path / "log")]
    assert kinds.count("train") == 5 and "hella" not in kinds


def test_a_checkpoint_one_node_cannot_read_stops_every_node_with_the_error(tmp_path):
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    node0.mkdir(), node1.mkdir()
    train_gpt2.main([*DDP, "--log_dir", str(tmp_path / "first")])
    good = (tmp_path / "first" / "model_00004.pt").read_bytes()
    (node0 / "ckpt.pt").write_bytes(good)
    (node1 / "ckpt.pt").write_bytes(good[:1000])  # node 1 sees a damaged copy
    out = two_nodes([*DDP, "--log_dir", str(tmp_path / "log"), "--resume", "ckpt.pt"], [node0, node1], [{}, {}])
    (code0, _, err0), (code1, _, err1) = out
    assert code0 != 0 and code1 != 0
    assert err1.startswith("error: cannot read checkpoint ckpt.pt: it is truncated") and err1.count("\n") == 1, err1
    assert err0 == ""


def test_no_rank_finishes_while_rank_0_writes_a_checkpoint_even_past_the_collectives_timeout(tmp_path):
    # rank 0's torch.save takes 8 s here, the process group's timeout is 5 s (NCCL's 10 minutes against a
    # big checkpoint on a slow disk): waiting in a collective, rank 1 would time out; leaving without waiting,
    # it would tear the process group down and exit while rank 0 still writes
    wrapper = tmp_path / "slow_save.py"
    wrapper.write_text(f"""import datetime, os, sys, time
sys.path.insert(0, {ROOT!r})
import torch, torch.distributed as dist, train_gpt2
real_save, real_init = torch.save, dist.init_process_group
def slow_save(obj, f):
    time.sleep(8)
    real_save(obj, f)
    open({str(tmp_path)!r} + "/saved", "w").write(repr(time.time()))
if os.environ["RANK"] == "0":
    torch.save = slow_save
dist.init_process_group = lambda **kw: real_init(**kw, timeout=datetime.timedelta(seconds=5))
train_gpt2.main(sys.argv[1:])
open({str(tmp_path)!r} + "/exited_" + os.environ["RANK"], "w").write(repr(time.time()))
""")
    args = [a for a in DDP if a not in ("--hellaswag_file", HELLASWAG_20)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(wrapper),
           *args, "--hellaswag", "0", "--max_steps", "2", "--log_dir", str(tmp_path / "log")]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    saved, exited = (float((tmp_path / name).read_text()) for name in ("saved", "exited_1"))
    assert exited >= saved  # rank 1 waited for the checkpoint
    assert torch.load(tmp_path / "log" / "model_00001.pt", weights_only=True)["step"] == 2


def test_rank_0s_log_dir_decides_whether_a_run_is_new_a_stale_copy_on_another_node_does_not(tmp_path):
    node0, node1 = tmp_path / "node0", tmp_path / "node1"  # each node's own disk: --log_dir log is not shared
    (node1 / "log").mkdir(parents=True)
    (node1 / "log" / "log.txt").write_text("0 train 10.0\n")  # an old run's log, copied there long ago
    node0.mkdir()
    out = two_nodes([*DDP, "--hellaswag", "0", "--max_steps", "2", "--log_dir", "log"], [node0, node1], [{}, {}])
    assert [code for code, _, _ in out] == [0, 0], out[0][2] + out[1][2]
    assert [k for _, k, _ in read_log(node0 / "log")] == ["val", "train", "val", "train"]  # rank 0 wrote the run
    assert (node1 / "log" / "log.txt").read_text() == "0 train 10.0\n"  # rank 1 writes nothing, loses nothing


def test_sharded_checkpoints_into_a_log_dir_the_nodes_do_not_share_are_refused_before_training(tmp_path):
    node0, node1 = tmp_path / "node0", tmp_path / "node1"  # --log_dir log: a folder on each node's own disk
    node0.mkdir(), node1.mkdir()
    args = [*DDP, "--hellaswag", "0", "--fsdp", "1", "--sharded_checkpoints", "1", "--log_dir", "log"]
    (code0, _, err0), (code1, _, err1) = two_nodes(args, [node0, node1], [{}, {}])
    assert code0 != 0 and code1 != 0
    host = socket.gethostname()
    assert err0 == (f"error: --log_dir log is not shared by every node: rank 0 on {host} does not see the files of "
                    f"{host} (rank 1); sharded checkpoints need a folder every node shares (a network file system): "
                    "pass such a --log_dir, or --sharded_checkpoints 0\n")
    assert err1 == err0  # every rank stops with the same line
    assert os.listdir(node0) == os.listdir(node1) == []  # no probe, no log: the folder rank 0 made for it went too
    # a shared one passes the probe, and leaves nothing of it
    out = two_nodes([*args[:-1], str(tmp_path / "shared"), "--max_steps", "2"], [node0, node1], [{}, {}])
    assert [code for code, _, _ in out] == [0, 0], out[0][2] + out[1][2]
    assert sorted(os.listdir(tmp_path / "shared")) == ["curves.png", "log.txt", "model_00001.dcp"]


def test_ddp_compiled_around_the_ddp_module_logs_what_one_process_logs(one, tmp_path):
    # torch.compile(DDP(model)): compile splits its graph at DDP's buckets, so each all-reduce overlaps backward
    out = torchrun(2, [*DDP, "--compile", "1", "--log_dir", str(tmp_path)])
    assert out.returncode == 0, out.stderr
    # on stderr, only dynamo's notice that it skips DDP's profiler markers, once a rank
    assert [line.endswith("will be ignored") for line in out.stderr.splitlines()] == [True, True], out.stderr
    assert_same_log(tmp_path, one, tol=1e-5)


def test_an_error_on_one_rank_stops_every_rank_within_seconds_in_one_line(tmp_path):
    # rank 1 runs out of memory in its half of the HellaSwag pass; rank 0 meanwhile waits for it as in an NCCL
    # collective that never returns (gloo's would fail at once): only the word passed between ranks ends it
    wrapper = tmp_path / "oom_on_rank_1.py"
    wrapper.write_text(f"""import os, sys, time
sys.path.insert(0, {ROOT!r})
import torch, train_gpt2
from machinery.cli import run_script
def evaluate_hellaswag(*args, **kwargs):
    if os.environ["RANK"] == "1":
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    time.sleep(300)
train_gpt2.evaluate_hellaswag = evaluate_hellaswag
run_script(train_gpt2.main)
""")
    logs = tmp_path / "logs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--redirects", "2",
           "--log-dir", str(logs), str(wrapper), *DDP, "--log_dir", str(tmp_path / "log")]
    t0 = time.time()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    seconds = time.time() - t0
    assert out.returncode != 0
    assert seconds < 25, seconds  # torchrun's own kill of a worker that ignores its SIGTERM comes after 30 s
    err0, err1 = (open(glob.glob(str(logs / "*" / "attempt_0" / str(r) / "stderr.log"))[0]).read() for r in (0, 1))
    assert err1 == ("error: rank 1: out of memory at --batch_size 2 (CUDA out of memory): pass --batch_size 1; the "
                    "total batch stays 64 tokens, in more micro-steps\n")
    assert err0 == ""  # one line for the whole run: the rank that failed says why


def test_a_checkpoint_write_that_fails_on_rank_0_stops_both_ranks_in_one_line(tmp_path):
    wrapper = tmp_path / "full_disk.py"  # rank 0's disk is full; rank 1 writes nothing, and must not go on alone
    wrapper.write_text(f"""import os, sys
sys.path.insert(0, {ROOT!r})
import torch, train_gpt2
from machinery.cli import run_script
def full_disk(obj, f):
    open(f, "wb").write(b"half")
    raise OSError(28, "No space left on device")
if os.environ["RANK"] == "0":
    torch.save = full_disk
run_script(train_gpt2.main)
""")
    args = [a for a in DDP if a not in ("--hellaswag_file", HELLASWAG_20)]
    log = tmp_path / "log"
    out = torchrun(2, [*args, "--hellaswag", "0", "--checkpoint_every", "2", "--log_dir", str(log)], script=str(wrapper))
    assert out.returncode != 0
    assert out.stderr == (f"error: cannot write checkpoint {log}/model_00001.pt ([Errno 28] No space left on device): "
                          f"free some space; this run wrote none yet, and those already in {log} are untouched\n")
    assert sorted(os.listdir(log)) == ["curves.png", "log.txt"]  # no half-written file left, no lock; step 2 never ran
    assert [r[0] for r in read_log(log) if r[1] == "train"] == ["0", "1"]


def rank_0_saving(tmp_path, save_body, setup=""):
    """A 2-process run whose rank 0 saves its first checkpoint (after step 1) with a torch.save doing save_body
    (setup: lines run first, in the workers): what torchrun returned, and how many seconds the run took."""
    wrapper = tmp_path / "rank_0_saving.py"
    wrapper.write_text(f"""import os, signal, sys, time
sys.path.insert(0, {ROOT!r})
import torch, train_gpt2, machinery.world
from machinery.cli import run_script
def save(obj, f):
    {save_body}
if os.environ["RANK"] == "0":
    torch.save = save
{setup}
run_script(train_gpt2.main)
""")
    args = [a for a in DDP if a not in ("--hellaswag_file", HELLASWAG_20)]
    t0 = time.time()
    out = torchrun(2, [*args, "--hellaswag", "0", "--checkpoint_every", "2", "--log_dir", str(tmp_path / "log")],
                   timeout=120, script=str(wrapper))
    return out, time.time() - t0


def test_a_rank_waiting_for_rank_0s_checkpoint_leaves_within_seconds_when_rank_0_fails(tmp_path):
    # rank 0 fails while writing (an error of a kind the write does not expect) and rank 1 waits for that write in
    # wait_for_master (for up to 10 minutes): the failure watcher must be heard meanwhile. With one long wait on
    # the store, its checks queued behind it and rank 1 waited the 10 minutes out
    out, seconds = rank_0_saving(tmp_path, 'time.sleep(2); raise KeyError("lost")')
    assert out.returncode != 0
    assert seconds < 25, seconds  # torchrun's own kill of a worker that ignores its SIGTERM comes after 30 s
    assert out.stderr == "error: rank 0: KeyError: 'lost'\n"  # and rank 1, ended by the watcher, says nothing


def test_a_rank_waiting_for_rank_0s_checkpoint_leaves_on_torchruns_sigterm_once_rank_0_is_gone(tmp_path):
    # rank 0 is killed while it writes (its node lost); torchrun then sends SIGTERM to rank 1, which waits for that
    # write: it must leave once rank 0 is silent, as the ranks that were not waiting do, not wait for torchrun's
    # SIGKILL 30 s later. (Silent after 3 s here; 10 s in a run)
    out, seconds = rank_0_saving(tmp_path, "time.sleep(1); os.kill(os.getpid(), signal.SIGKILL)",
                                 setup="machinery.world.SILENT_SECONDS = 3")
    assert out.returncode != 0
    assert seconds < 25, seconds
    assert out.stderr == "rank 1: stopping: rank 0 went silent during checkpoint 1\n"


def test_an_elastic_restart_after_one_nodes_crash_resumes_and_finishes_what_one_process_logs(one, tmp_path):
    # two torchrun agents, "nodes", meet in a c10d rendezvous. Node 1's worker dies at step 3; node 0's is busy then
    # (6 s), so its agent restarts it for the new round without counting a failure: the two agents' restart counts
    # differ (0 and 1), and only a token that rank 0 draws makes the store keys of the new attempt agree
    mark = tmp_path / "crashed"
    wrapper = tmp_path / "crash_once.py"
    wrapper.write_text(f"""import os, sys, time
sys.path.insert(0, {ROOT!r})
import train_gpt2
from machinery.cli import run_script
get_lr, first_attempt = train_gpt2.get_lr, not os.path.exists({str(mark)!r})
def get_lr_crashing_once(step, *args):
    if step == 3 and first_attempt:
        if os.environ["NODE"] == "1":
            open({str(mark)!r}, "w").close()
            os._exit(13)
        time.sleep(6)
    return get_lr(step, *args)
train_gpt2.get_lr = get_lr_crashing_once
run_script(train_gpt2.main)
""")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "log"
    args = [*DDP, "--log_dir", str(log), "--resume", "auto", "--checkpoint_every", "2"]
    launcher = ("--nnodes=2", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=elastic",
                "--max-restarts=1", "--monitor-interval=0.5")
    env = dict(os.environ, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")  # as scripts/train.sbatch sets it
    def node(i):
        return torchrun(1, args, 150, launcher, env=dict(env, NODE=str(i)), script=str(wrapper))
    with ThreadPoolExecutor(2) as pool:
        out = list(pool.map(node, (0, 1)))
    assert [o.returncode for o in out] == [0, 0], out[0].stdout + out[1].stdout
    assert mark.exists()
    printed = out[0].stdout + out[1].stdout
    # rank 0 checkpointed what was trained before the restart: after step 1 (its own node crashed), or after step 3
    # (its agent's SIGTERM came in the 6 s: a stop checkpoint, and the step in hand had every rank's gradients)
    assert "resuming at step 2\n" in printed or "resuming at step 4\n" in printed, printed
    assert sorted(f for f in os.listdir(log) if f.startswith("model_")) == [f"model_0000{s}.pt" for s in (1, 3, 4)]
    assert_same_log(log, one, tol=1e-5)  # steps 0 to 4, as if nothing had happened
