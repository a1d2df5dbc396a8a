"""Where a run computes: the device, and the processes torchrun starts (who is who, and how they agree)."""
import contextlib
import gc
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from machinery.cli import error_text


def device_type(device):
    """cuda, mps or cpu: the kind of device, as autocast and fused kernels take it (never 'cuda:3')."""
    return device.split(":")[0]


def init_device(device, local_rank=None):
    """device (cpu, cuda, cuda:N or mps) checked against what this torch sees, and set up: under torchrun each process
    drives one GPU, its local rank's. Which device to ask for is the lesson's choice (train_gpt2.pick_device)."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    kind = device_type(device)
    if kind not in available:
        raise ValueError(f"unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps")
    if not available[kind]:
        raise ValueError(f"device {device!r} asked for, but this torch sees no {'CUDA GPU' if kind == 'cuda' else 'MPS'} "
                         "here: use --device cpu")
    if kind == "cuda" and local_rank is not None:
        if local_rank >= torch.cuda.device_count():  # more processes on this machine than it has GPUs
            raise ValueError(f"LOCAL_RANK={local_rank}, but this machine has {torch.cuda.device_count()} GPUs: start "
                             f"at most {torch.cuda.device_count()} processes a node (--nproc_per_node)")
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    return device


def bf16_fast(device):
    """Whether bf16 autocast pays off here: on CUDA GPUs with bf16 (Ampere and later) only."""
    return device.startswith("cuda") and torch.cuda.is_bf16_supported()


def synchronize(device):
    """Wait for the accelerator to finish its queued work (a no-op on the CPU)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    elif device == "mps":
        torch.mps.synchronize()


# torch.compile's modes a run may ask for: the default, and one that tries kernel configurations while compiling
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")


def can_compile(device_type, log=print):
    """Whether torch.compile can run here; where it cannot, say why (through log), and the run stays eager."""
    if device_type == "cpu" and not any(shutil.which(cc) for cc in ("cc", "gcc", "clang", "c++", "g++")):
        log("compile: no C/C++ compiler found (the CPU backend needs one): running eager; "
            "install gcc or pass --compile 0")
        return False
    if not torch._dynamo.is_dynamo_supported():  # a Python release torch.compile does not support yet
        log(f"compile: unavailable on Python {sys.version.split()[0]} with torch {torch.__version__}: running eager; "
            "pass --compile 0")
        return False
    return True


def maybe_compile(model, enabled, device_type, log=print, mode="default"):
    """torch.compile the model (in mode) where it can run, else the model as it is."""
    return torch.compile(model, mode=mode) if enabled and can_compile(device_type, log) else model


# what torchrun sets in each process's environment: all of them, or none for a plain run
LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def env_int(name, default):
    """An environment variable that holds a whole number, or a ValueError naming it."""
    value = os.environ.get(name, str(default))
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not a whole number: unset it, or start the run with torchrun") from None


def check_launcher(planning=False):
    """torchrun tells each process who it is in environment variables: all of them set, as whole numbers that fit
    together, or none (a plain run, a world of one), else a ValueError saying what to do. Planning (a dry run),
    WORLD_SIZE alone is the number of processes to plan for."""
    given = [k for k in LAUNCHER_VARIABLES if k in os.environ]
    if given and not planning and len(given) < len(LAUNCHER_VARIABLES):  # set by hand, or a launcher's half
        missing = next(k for k in LAUNCHER_VARIABLES if k not in os.environ)
        raise ValueError(f"{given[0]} is set but {missing} is not: torchrun sets them all; start the run with "
                         f"torchrun --nproc_per_node=N, or unset {', '.join(given)}")
    if given and not planning and not os.environ["MASTER_ADDR"].strip():
        raise ValueError("MASTER_ADDR is empty: it names the machine of rank 0 (torchrun sets it; under Slurm, the "
                         "job's first node)")
    rank, local_rank, world_size = (env_int(k, d) for k, d in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
    if not (world_size >= 1 and 0 <= rank < world_size and local_rank >= 0):
        raise ValueError(f"RANK={rank}, LOCAL_RANK={local_rank} and WORLD_SIZE={world_size} do not fit together: "
                         "start the run with torchrun")


def peers_gone(e):
    """Whether error e says the other processes are out of reach: the store unreachable (DistNetworkError), a
    collective's other end closed (gloo), a communicator aborted (NCCL)."""
    return isinstance(e, dist.DistError) or any(s in str(e) for s in ("Connection closed by peer", "Connection reset"))


# a rank asked to stop while it waits for rank 0's write leaves once rank 0 has been silent this long (killed with its
# node, say); rank 0 alive, it waits on: the write is the checkpoint the stop is for
SILENT_SECONDS = 10


@dataclass
class World:
    """This process's place in the run: which process it is, of how many, on which device."""
    rank: int = 0  # among all the processes, on every machine
    local_rank: int = 0  # among the processes on this machine: which GPU it drives
    world_size: int = 1
    ddp: bool = False  # started by torchrun: the processes train one model together
    device: str = "cpu"

    def __post_init__(self):
        self.device_type = device_type(self.device)
        self.master = self.rank == 0  # rank 0 alone prints, logs and writes files
        self.writing = threading.Lock()  # held while a file is written: a rank leaving after another's error waits
        self.waits = 0  # wait_for_master calls so far: every rank makes them in the same order
        self.token = None  # the run's name in the job's store, once stop_all_on_error has agreed on it
        self.stopping = lambda: None  # whether this rank was asked to stop: stop_all_on_error is told how to ask

    def print(self, *args):
        if self.master:
            print(*args)

    def any(self, flag):
        """True on every process if flag is true on any of them: how the processes agree to stop or fail together."""
        t = torch.tensor(float(bool(flag)), device=self.device)
        if self.ddp:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def min(self, value):
        """The smallest of a whole number each process holds, on every process."""
        t = torch.tensor(value, dtype=torch.long, device=self.device)
        if self.ddp:
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    def broadcast(self, obj):
        """Rank 0's obj (plain data), on every process."""
        if self.ddp:
            box = [obj]
            dist.broadcast_object_list(box, src=0)
            obj = box[0]
        return obj

    def leave(self, finished):
        """Leave the process group. After a run every rank finished, the ranks leave together, once what holds
        on to the group (FSDP's shards, DDP's buckets, kept by reference cycles) is freed: a group torn down
        under them can abort a process at exit ("terminate called without an active exception", FSDP2 on gloo)."""
        if finished:
            gc.collect()
            with contextlib.suppress(RuntimeError):  # a rank already gone (rank 0 after a stop, its node lost): the
                dist.barrier()  # run is over, and there is nobody to wait for
        dist.destroy_process_group()

    @contextlib.contextmanager
    def together(self):
        """A stage that may fail on some processes only (a node that cannot read a file, say): if it fails on any,
        all of them stop, the one that failed saying why, instead of the others waiting for it forever."""
        error = None
        try:
            yield
        except (ValueError, OSError) as e:
            error = error_text(e)
        if self.any(error is not None):
            sys.exit(f"error: {error}" if error else 1)

    def _store(self):
        """The key-value store torchrun gives the job: every rank of every node reaches it, outside any collective."""
        return dist.distributed_c10d._get_default_store()

    def _key(self, name):
        return f"{self.token}/{name}"

    def wait_for_master(self, name, result, seconds):
        """Rank 0's result (a line of text, or None) on every rank, once rank 0 has it: the others wait up to
        seconds, in the job's store rather than in a collective, whose timeout (NCCL's: 10 minutes) a long
        write on rank 0 (a big checkpoint, a slow disk) would outlast."""
        if not self.ddp:
            return result
        self.waits += 1  # a key of its own each time: the same step may be saved twice (a stop after a cut evaluation)
        store, key = self._store(), self._key(f"{name}/{self.waits}")
        if self.master:
            store.set(key, "" if result is None else "=" + result)
            return result
        # short checks, not one long wait: the process's store connection serves one request at a time (the failure
        # watcher's checks would queue behind a wait), and a signal's handler runs only between them
        deadline, beats, heard = time.monotonic() + seconds, None, time.monotonic()
        while not store.check([key]):
            now, beat = time.monotonic(), store.add(self._key("alive"), 0)  # rank 0's watcher adds 1 each second
            if beat != beats:
                beats, heard = beat, now
            if self.stopping() and now - heard > SILENT_SECONDS:  # asked to stop, and rank 0 is gone: nothing comes
                sys.exit(f"rank {self.rank}: stopping: rank 0 went silent during {name}")
            if now > deadline:
                raise TimeoutError(f"rank 0 did not finish {name} within {seconds:.0f} s")
            time.sleep(0.1)
        value = store.get(key).decode()
        return value[1:] if value else None

    @contextlib.contextmanager
    def stop_all_on_error(self, stopping=lambda: None):
        """Training, where an error can strike one rank alone (out of memory, a full disk): that rank says why in one
        line, and every other rank leaves within seconds, wherever it waits. Without this, the others would wait
        for it in a collective (NCCL: until its timeout, 10 minutes) or crash there with a traceback of their own.
        The ranks learn of the failure through the store torchrun gives the job, which every node reaches.
        stopping: whether this rank was asked to stop (then a rank 0 gone silent is not waited for)."""
        if not self.ddp:
            yield
            return
        self.stopping = stopping
        # the store outlives an elastic restart, and each node's agent counts restarts for itself: the keys of this
        # attempt carry a token rank 0 draws (not from torch's generator: training's random stream stays as it is)
        self.token = self.broadcast(os.urandom(8).hex())
        store, key = self._store(), self._key("failed")
        done = threading.Event()
        threading.Thread(target=self._leave_once_failed, args=(store, key, done), daemon=True).start()
        try:
            yield
        except Exception as e:
            with contextlib.suppress(dist.DistError):  # (the store is gone with rank 0: see below)
                if store.check([key]):  # another rank failed first: this error follows from it, and it said why
                    sys.exit(1)
            if self.stopping() and peers_gone(e):  # rank 0, the store's host, left first: this rank was leaving too
                print(f"rank {self.rank}: stopping: rank 0 is gone ({type(e).__name__})", flush=True)
                sys.exit(0)  # as a stopped worker exits under torchrun
            cause = error_text(e) if isinstance(e, (ValueError, OSError)) else f"{type(e).__name__}: {error_text(e)}"
            line = f"error: rank {self.rank}: {cause}"  # a ValueError is one of this project's own lines
            print(line, file=sys.stderr, flush=True)
            store.set(key, line)
            sys.exit(1)
        finally:
            done.set()

    def _leave_once_failed(self, store, key, done):
        # a thread, as the main one may be stuck in a collective that never returns; a file being written is finished.
        # On rank 0 it also counts seconds in the store: the others, waiting for its write, hear that it is alive
        try:
            while not done.wait(1):
                if self.master:
                    store.add(self._key("alive"), 1)
                if store.check([key]):
                    with self.writing:
                        os._exit(1)
        except Exception:  # the store is gone: the job is over
            pass
