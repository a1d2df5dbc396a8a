"""Checkpoints: one file per checkpoint (torch.save of tensors and plain data), read safely, checked against the
model and the run's settings, written atomically, and restored exactly, whether one process, DDP or FSDP wrote it."""
import contextlib
import os
import pickle
import shutil
import socket
import sys
import time
import warnings
from dataclasses import asdict

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.tensor import DTensor, distribute_tensor

from machinery.cli import error_text
from machinery.run_dir import CHECKPOINT_NAME, is_sharded_save, remove_checkpoint
from machinery.settings import RESUME_MUST_MATCH, TrainConfig, checkpoint_bytes, saves_sharded

SLOW_DISK = 50e6  # bytes a second: a busy network file system
META_FILE = "meta.pt"  # in a sharded checkpoint's directory: all but the tensors, as plain data


def read_checkpoint(path, keys=("model", "model_config")):
    """A checkpoint of this project, read safely, or a ValueError that says what is wrong with the file.

    weights_only=True unpickles tensors and plain data only: a file that needs more could run
    code when loaded, so it is refused, never retried with weights_only=False. mmap=True maps the file
    instead of reading it: the tensors are read as they are copied into the model and the optimizer, so a
    host never holds a second whole copy (8 ranks of a node resuming 6.7B: 80 GB each, otherwise).
    """
    if os.path.isdir(path):
        return read_sharded_checkpoint(path, keys)
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path!r} not found")
    if os.path.getsize(path) == 0:
        raise ValueError(f"checkpoint {path} is empty (0 bytes): use another checkpoint")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # torch's own message would suggest weights_only=False: never that
        raise ValueError(f"cannot read checkpoint {path}: it is truncated, or not a checkpoint of this project "
                         "(only tensors and plain data are loaded: anything else could run code)") from None
    missing = [k for k in keys if k not in checkpoint] if isinstance(checkpoint, dict) else list(keys)
    if missing:
        raise ValueError(f"{path} is not a checkpoint of this project: it has no {', '.join(missing)}")
    return checkpoint


# what torch.distributed.checkpoint writes into a .dcp's .metadata: its own records (sizes, dtypes, chunk offsets, the
# files the shards are in), torch's sizes, dtypes and layouts, and a path; a pickle that names anything else is refused
DCP_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                              "TensorProperties", "ChunkStorageMetadata", "MetadataIndex",
                                              "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # a layout from its name
    "torch": {"Size"},  # and the dtypes, checked below
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles a .dcp's .metadata with DCP_METADATA_CLASSES only: DCP itself uses plain pickle.load, which runs
    whatever a planted file names (a .dcp in a shared --log_dir, a checkpoint downloaded from someone)."""

    def find_class(self, module, name):
        allowed = DCP_METADATA_CLASSES.get(module, set())
        if name in allowed or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"its .metadata names {module}.{name}, which checkpoint metadata never holds "
                                     "(unpickled, it could run code)")


class MetadataReader(dcp.FileSystemReader):
    """torch.distributed.checkpoint's reader of a directory, with its .metadata unpickled safely (see above)."""

    def read_metadata(self, *args, **kwargs):
        with open(os.path.join(str(self.path), ".metadata"), "rb") as f:
            metadata = MetadataUnpickler(f).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError("its .metadata is not torch.distributed.checkpoint's Metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def read_sharded_checkpoint(path, keys, whole=True):
    """A sharded checkpoint (a directory) as read_checkpoint reads a file: its weights read whole in this process
    (for sampling, exporting, fine-tuning), or, not whole, only their shapes (a resume reads its shards later)."""
    if not os.path.exists(os.path.join(path, ".metadata")):  # not written by torch.distributed.checkpoint
        if os.path.normpath(path).endswith(".dcp"):
            raise ValueError(f"checkpoint {path} has no .metadata, the index of its shards: a sharded save that did "
                             "not finish, or was copied in part; use another checkpoint")
        raise ValueError(f"checkpoint {path} is a directory: pass a checkpoint file in it (model_NNNNN.pt), or "
                         f"--resume auto --log_dir {path} for the newest one there")
    try:
        tensors = MetadataReader(path).read_metadata().state_dict_metadata
    except pickle.UnpicklingError as e:
        raise ValueError(f"checkpoint {path} is refused: {error_text(e)}") from None
    except Exception:
        raise ValueError(f"cannot read checkpoint {path}: a directory, but not a whole sharded checkpoint of this "
                         "project") from None
    try:
        meta = torch.load(os.path.join(path, META_FILE), map_location="cpu", weights_only=True)
    except Exception:
        raise ValueError(f"cannot read checkpoint {path}: a directory, but not a whole sharded checkpoint of this "
                         "project") from None
    model = {k.removeprefix("model."): torch.empty(m.size, dtype=m.properties.dtype, device="cpu" if whole else "meta")
             for k, m in tensors.items() if k.startswith("model.")}
    if whole:
        read_shards({"model": model}, path, alone=True)  # tensors, and metadata through the allow-list
    checkpoint = {**meta, "model": model, "sharded": path}
    missing = [k for k in keys if k not in checkpoint and k != "optimizer"]  # the optimizer's: read on resuming
    if missing:
        raise ValueError(f"{path} is not a checkpoint of this project: it has no {', '.join(missing)}")
    return checkpoint


def read_shards(state, path, alone):
    """Fill state's tensors from a sharded checkpoint: each rank its own shards, or, alone, whole in this process
    (which torch.distributed.checkpoint warns of, though it is what is meant)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        dcp.load(state, storage_reader=MetadataReader(path), no_dist=alone)


def check_weights(model, state_dict, path):
    """A checkpoint's weights must fit model tensor for tensor: else say which one does not."""
    expected = model.state_dict()
    if not isinstance(state_dict, dict) or set(state_dict) != set(expected):
        raise ValueError(f"checkpoint {path} does not hold this model's weights (other tensor names): "
                         "it was made for another model")
    for k, v in expected.items():
        if not isinstance(state_dict[k], torch.Tensor) or state_dict[k].shape != v.shape:
            shape = tuple(getattr(state_dict[k], "shape", ()))
            raise ValueError(f"checkpoint {path} does not fit the model: {k} has shape {shape}, "
                             f"the model's is {tuple(v.shape)}")


def load_checkpoint(path, cfg, model):
    """A checkpoint to resume from, read: complete, made with the settings of this run, fitting its model."""
    keys = ("model", "model_config", "optimizer", "step", "train_loader", "rng", "config")
    # a sharded one is read later, each rank its own shards: here its shapes, for the checks below
    checkpoint = read_sharded_checkpoint(path, keys, whole=False) if os.path.isdir(path) else read_checkpoint(path, keys)
    if os.path.isdir(path) and (problem := missing_shard(path)):  # found now, before log.txt is touched
        raise ValueError(f"checkpoint {path} cannot be resumed: {problem}; use another checkpoint")
    for name in RESUME_MUST_MATCH:
        # a setting newer than the checkpoint: the run that wrote it did what the default does
        saved = checkpoint["config"].get(name, getattr(TrainConfig(), name))
        if saved != getattr(cfg, name):
            raise ValueError(f"checkpoint {path} was made with --{name} {saved}, not "
                             f"{getattr(cfg, name)}: resume with the run's own settings")
    check_weights(model, checkpoint["model"], path)
    return checkpoint


def missing_shard(path):
    """For a sharded checkpoint whose metadata reads: a file it names that is not there or too short, in a few
    words, or None."""
    for info in MetadataReader(path).read_metadata().storage_data.values():
        shard = os.path.join(path, info.relative_path)
        size = os.path.getsize(shard) if os.path.isfile(shard) else None
        if size is None or size < info.offset + info.length:
            return f"its shard {info.relative_path} is {'missing' if size is None else f'cut short ({size:,} bytes)'}"
    return None


def damage(path):
    """What makes a checkpoint of this project unusable as it lies (cut short, empty, shards missing, not ours), in
    a few words, or None: read as a resume reads it, and for a sharded one, every file its metadata names there and
    long enough. Settings that differ from the run's are not damage: that is for load_checkpoint to say."""
    keys = ("model", "model_config", "optimizer", "step", "train_loader", "rng", "config")
    try:
        if not os.path.isdir(path):
            read_checkpoint(path, keys)
            return None
        read_sharded_checkpoint(path, keys, whole=False)
        return missing_shard(path)
    except ValueError as e:
        return error_text(e).removeprefix(f"checkpoint {path} ").removeprefix(f"{path} ")
    return None


def checkpoint_step(path):
    """The step a checkpoint's name says it follows (-1 for another name)."""
    m = CHECKPOINT_NAME.fullmatch(os.path.basename(os.path.normpath(path)))
    return int(m.group(1)) if m else -1


def newest_usable(run):
    """--resume auto's checkpoint: the newest here that is whole, each newer one skipped with a line saying why;
    None if there is none yet. If every one is damaged, a ValueError: starting over would lose the run."""
    found = run.checkpoints()
    for path in found:
        problem = damage(path)
        if problem is None:
            return path
        print(f"--resume auto: skipping {path}: {problem}")
    if found:
        raise ValueError(f"--resume auto: none of the {len(found)} checkpoints in {run.path} can be used (see above): "
                         "pass --resume with one you trust, or move the damaged ones away")
    return None


def check_shared_log_dir(run, world):
    """A sharded checkpoint is every rank's files in one directory: before the run trains, each rank writes a probe
    file into --log_dir and rank 0 checks that it sees them all. Else, one line naming the nodes that do not share
    it (their shards would be left on their own disks, and every checkpoint would be unusable)."""
    probe = os.path.join(run.path, f".shared.{world.broadcast(os.urandom(4).hex())}.")  # this start's own names
    with contextlib.suppress(OSError):  # a node without the folder (or without access) cannot write: it is missing
        with open(probe + str(world.rank), "w") as f:
            f.write(socket.gethostname())
    hosts = [None] * world.world_size
    dist.all_gather_object(hosts, socket.gethostname())  # after every rank's write: a collective is a barrier too
    unseen = [r for r in range(world.world_size) if world.master and not os.path.exists(probe + str(r))]
    unseen = world.broadcast(unseen)
    with contextlib.suppress(OSError):
        os.remove(probe + str(world.rank))
    if unseen:
        nodes = ", ".join(sorted({f"{hosts[r]} (rank {r})" for r in unseen}))
        raise ValueError(f"--log_dir {run.path} is not shared by every node: rank 0 on {hosts[0]} does not see the "
                         f"files of {nodes}; sharded checkpoints need a folder every node shares (a network file "
                         "system): pass such a --log_dir, or --sharded_checkpoints 0")


class CheckpointManager:
    """A run's checkpoints, in one place (as torchtitan's CheckpointManager): which one the run resumes, restoring
    it, when to save, names (model_{step:05d}.pt, or .dcp for every rank's shards), one file or shards, rotation.

    main() makes it once the model is built: it finds the checkpoint to resume and reads it on every rank. train()
    then calls load() once its optimizer exists, maybe_save(step) after each step, and save(step) when it stops.
    """

    def __init__(self, cfg, world, run, model):
        self.cfg, self.world, self.run = cfg, world, run
        self.last_saved = None  # the run's newest checkpoint: named if a later write fails, and in STOPPED
        self.last_saved_time = time.time()  # --checkpoint_minutes count from here
        self.rotating = None  # the newest checkpoint if it rotates (see save): the next one replaces it
        self.saved_step = None  # the step saved last, on every rank
        self.resumed = self.find(model)  # the checkpoint to resume, read: until load() restores it
        self.state = None  # what load() restored into and every save holds: the model, its optimizer, the train loader

    def load(self, model, optimizer, train_loader):
        """Restore the checkpoint found (if any) into these, which every later save holds; the step to start at."""
        self.state = (model, optimizer, train_loader)
        start_step = restore_checkpoint(self.resumed, model, optimizer, train_loader) if self.resumed else 0
        self.resumed = None  # its tensors are not kept through the run
        return start_step

    def maybe_save(self, step):
        """Save after step if a checkpoint is due (see due): every --checkpoint_every steps, the minutes, the end."""
        if due := self.due(step):
            self.save(step, rotate=due == "time")

    def find(self, model):
        """The checkpoint this run continues from, read and checked on every rank, or None for a run from step 0;
        log.txt is made to agree with it. A run that saves sharded checkpoints first checks its --log_dir is shared."""
        cfg, world, run = self.cfg, self.world, self.run
        if world.ddp and saves_sharded(cfg, sum(p.numel() for p in model.parameters())):
            with world.together():
                check_shared_log_dir(run, world)
        with world.together():
            path = (newest_usable(run) if cfg.resume == "auto" else cfg.resume) if cfg.resume and world.master else None
            named = path is not None and checkpoint_step(path) >= 0  # a checkpoint's name (else reading says why)
            newer = [p for p in run.checkpoints() if named and checkpoint_step(p) > checkpoint_step(path)]
            if newer and os.path.dirname(os.path.abspath(path)) != os.path.abspath(run.path):
                raise ValueError(f"--resume {path} is older than {newer[-1]} in --log_dir {run.path}, which this run "
                                 "would overwrite: resume that one (--resume auto), or pass another --log_dir")
        # every rank resumes rank 0's checkpoint: a node that sees another log_dir must not continue another run
        path = world.broadcast(path)
        with world.together():  # first every rank reads it: a node that cannot is the error to report
            checkpoint = load_checkpoint(path, cfg, model) if path else None
        if checkpoint and checkpoint["step"] >= cfg.max_steps and cfg.resume == "auto":  # a requeue after the end
            world.print(f"--resume auto: {path} ends the run (step {cfg.max_steps} of {cfg.max_steps}): nothing is "
                        "left to train")
            sys.exit(0)
        with world.together():
            if checkpoint and checkpoint["step"] >= cfg.max_steps:
                raise ValueError(f"{path} ends its run (step {cfg.max_steps} of {cfg.max_steps}): nothing is left to "
                                 "train; to train on, start a new run with --init_from it and another --log_dir")
            if path:
                world.print(f"resuming from {path}")  # for --resume auto, the file it chose
                # the val loss of a run is measured on one set of tokens, whatever B it resumes with (older checkpoints:
                # their val batches were their micro-batches)
                saved = checkpoint["config"].get("val_batch_size") or checkpoint["config"]["batch_size"]
                if saved != cfg.val_batch_size:
                    world.print(f"validation: {cfg.val_steps} batches of {saved} sequences, as the run started with "
                                f"(--val_batch_size {saved})")
                    cfg.val_batch_size = saved
                self.rotating = path if checkpoint.get("rotates") else None  # the rotation goes on across requeues
                self.last_saved = path  # the run's newest checkpoint, until it writes one
            if cfg.resume and not path:  # killed before its first checkpoint: there is nothing to continue
                world.print(f"--resume auto: no checkpoint in {cfg.log_dir} yet: starting from step 0")
            elif not cfg.resume and world.master:  # rank 0's log_dir decides: another node's may be a stale copy
                run.check_new_run()
            run.start_log(checkpoint["step"] if checkpoint else 0)
        return checkpoint

    def due(self, step):
        """Why to checkpoint after step, or None: "steps" at the last step and every --checkpoint_every steps, "time"
        when --checkpoint_minutes have passed since the last checkpoint (rank 0's clock decides, for every rank)."""
        cfg, world = self.cfg, self.world
        if step == cfg.max_steps - 1 or (step + 1) % cfg.checkpoint_every == 0:
            return "steps"
        late = world.master and time.time() - self.last_saved_time >= 60 * cfg.checkpoint_minutes
        return "time" if cfg.checkpoint_minutes and world.any(late) else None

    def save(self, step, rotate=False):
        """Checkpoint the run after step. Every rank calls this: one file, for which each rank gathers its FSDP shards
        and rank 0 writes them, or a sharded checkpoint, where each rank writes its own. If the write fails (a full
        disk), every rank stops, with one line naming the last good one. Once it is written, the checkpoint before it
        goes if it was a rotating one; rotate: this one rotates too (one written for time or on a stop, not for steps:
        the checkpoint records it, so a resumed run goes on rotating). A step already saved is not saved again (a stop
        during the evaluation right after its checkpoint): the checkpoint on disk stays as it was."""
        if self.saved_step == step:
            return
        cfg, world, run, (model, optimizer, train_loader) = self.cfg, self.world, self.run, self.state
        sharded = saves_sharded(cfg, sum(p.numel() for p in model.parameters()))
        path = run.checkpoint_path(step, sharded)
        meta = {**checkpoint_meta(step + 1, model.config, train_loader, cfg), "rotates": rotate}
        state = None if sharded else whole_state(model, optimizer, keep=world.master)
        error = None
        try:
            if sharded:
                write_sharded_checkpoint(path, model, optimizer, meta, world)
            elif world.master:
                with world.writing:  # a rank leaving on another's error finishes this first
                    write_checkpoint_file(path, state, meta)
            if world.master:
                print(f"saved {path}")
                if self.rotating and self.rotating != path:
                    with contextlib.suppress(OSError):  # an older checkpoint: the one just written is newer
                        remove_checkpoint(self.rotating)
                self.last_saved, self.rotating, self.last_saved_time = path, path if rotate else None, time.time()
        except (OSError, RuntimeError, CheckpointException) as e:  # a full disk, say: what was half-written is gone
            error = (f"cannot write checkpoint {path} ({error_text(e)}): free some space; " +
                     (f"the last good checkpoint is {self.last_saved}" if self.last_saved else
                      f"this run wrote none yet, and those already in {cfg.log_dir} are untouched"))
        del state  # under FSDP, a whole copy on the CPU: not kept until the next checkpoint
        # every rank waits here for rank 0's write, so none tears the process group down while it writes
        error = world.wait_for_master(f"checkpoint {step}", error, seconds=write_seconds(model))
        if error:
            sys.exit(f"error: {error}" if world.master else 1)
        self.saved_step = step  # on every rank alike


def write_seconds(model):
    """How long writing model's checkpoint may take before a rank waiting for it gives up: long enough for the
    slowest disk a cluster is likely to have."""
    return 600 + checkpoint_bytes(sum(p.numel() for p in model.parameters())) / SLOW_DISK


def shard_like(whole, tensor):
    """A whole tensor from a checkpoint, cut as tensor is: this rank's shard if FSDP shards it (a DTensor).
    Every rank read the same file, so each cuts its own part (src_data_rank=None: nothing is sent)."""
    if not isinstance(tensor, DTensor):
        return whole
    return distribute_tensor(whole.to(tensor.device), tensor.device_mesh, tensor.placements, src_data_rank=None)


def restore_checkpoint(checkpoint, model, optimizer, train_loader):
    """Continue where a checkpoint left off (weights, optimizer, data position, random state): the step to run
    next. A file holds whole tensors, whether DDP, FSDP or one process wrote it; a model sharded by FSDP takes
    its shards of them. A sharded checkpoint is read by each rank for its own shards, however many ranks wrote
    it. The checkpoint is emptied as it is used: it is 1.5 GB at 124M."""
    # this device's AdamW kernel, not the saving one's, set before loading: torch puts each state tensor where the
    # kernel in the groups wants it, and the fused CUDA kernel wants the step counters on the GPU, not where a CPU
    # run saved them (it refuses mixed devices: pytorch#124133)
    here = [{"fused": group["fused"]} for group in optimizer.param_groups]
    def kernel_here(saved_groups):
        return [{**saved, **mine} for saved, mine in zip(saved_groups, here)]
    if "sharded" in checkpoint:
        model_state = get_model_state_dict(model)
        optimizer_state = get_optimizer_state_dict(model, optimizer)  # AdamW's moments made, to be read into
        read_shards({"model": model_state, "optimizer": optimizer_state["state"]}, checkpoint["sharded"],
                    alone=not dist.is_initialized())
        set_model_state_dict(model, model_state)
        set_optimizer_state_dict(model, optimizer, {**optimizer_state, "param_groups": kernel_here(checkpoint["param_groups"])})
    else:
        current = model.state_dict()
        model.load_state_dict({k: shard_like(v, current[k]) for k, v in checkpoint.pop("model").items()})
        optimizer_state = checkpoint.pop("optimizer")
        params = [p for group in optimizer.param_groups for p in group["params"]]  # the state's keys index these
        for i, state in optimizer_state["state"].items():
            for k, v in state.items():
                if k != "step":  # AdamW's moments have their parameter's shape; the step count is a scalar
                    state[k] = shard_like(v, params[i])
        optimizer.load_state_dict({**optimizer_state, "param_groups": kernel_here(optimizer_state["param_groups"])})
    train_loader.load_state_dict(checkpoint["train_loader"])
    # CUDA generators are not restored: training draws none, and a checkpoint saved where 8 GPUs
    # were visible holds 8 states that a 1-GPU machine cannot take
    torch.set_rng_state(checkpoint["rng"]["cpu"])
    step = checkpoint["step"]
    checkpoint.clear()
    return step


def whole_state(model, optimizer, keep):
    """The model's and the optimizer's state dicts, with every tensor whole: FSDP's shards (DTensors) are
    gathered onto the CPU, tensor by tensor. Gathering is a collective, so every rank calls this, in the same
    order; the tensors are kept where keep (rank 0, which writes them). One file, whoever wrote it."""
    def whole(x):
        if not isinstance(x, DTensor):
            return x
        x = x.full_tensor()
        return x.cpu() if keep else None
    tied = {}  # wte and lm_head are one parameter: gathered, and saved, once
    first_name = {name: tied.setdefault(id(p), name) for name, p in model.named_parameters(remove_duplicate=False)}
    model_state = {}
    for k, v in model.state_dict().items():
        model_state[k] = model_state[first_name[k]] if first_name.get(k, k) != k else whole(v)
    optimizer_state = optimizer.state_dict()
    optimizer_state["state"] = {i: {k: whole(v) for k, v in state.items()}
                                for i, state in optimizer_state["state"].items()}
    return model_state, optimizer_state


def checkpoint_meta(step, model_config, train_loader, cfg):
    """All of a checkpoint but the weights and the optimizer's state, as plain data."""
    return {
        "model_config": asdict(model_config),
        "step": step,  # the next step to run
        "train_loader": train_loader.state_dict(),
        # the CPU generator only: nothing in training draws CUDA random numbers (sampling has its own)
        "rng": {"cpu": torch.get_rng_state()},
        "config": asdict(cfg),
    }


def fsync(path):
    """path's bytes (a file's, or a directory's list of names) on the disk, not only in the OS's cache: after a crash
    of the machine, a checkpoint that was renamed into place is whole."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint_file(path, state, meta):
    """Everything needed to continue exactly, as tensors and plain data (loads with weights_only=True)."""
    model_state, optimizer_state = state
    tmp = path + ".tmp"
    try:
        torch.save({"model": model_state, "optimizer": optimizer_state, **meta}, tmp)
        fsync(tmp)  # on the disk before it takes the name, which is on the disk before any older one is deleted
        os.replace(tmp, path)  # atomic: a crash mid-write never leaves a truncated checkpoint
        fsync(os.path.dirname(path) or ".")
    except BaseException:  # a full disk, say: never leave 1.5 GB of half a checkpoint behind
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_sharded_checkpoint(path, model, optimizer, meta, world):
    """A checkpoint no host holds whole: with torch.distributed.checkpoint every rank writes its own shards of
    the weights and of AdamW's moments into one directory (on a folder every node shares), then rank 0 adds
    meta.pt (the rest, as plain data) and gives the directory its name: a crash before that leaves no checkpoint
    to resume from, only a .tmp directory that the next run removes."""
    tmp = path + ".tmp"
    if world.master and os.path.isdir(tmp) and is_sharded_save(tmp):
        shutil.rmtree(tmp)  # a save of this step that died halfway
    optimizer_state = get_optimizer_state_dict(model, optimizer)  # keyed by parameter name, not position
    try:
        dcp.save({"model": get_model_state_dict(model), "optimizer": optimizer_state["state"]}, checkpoint_id=tmp)
        if world.master:
            torch.save({**meta, "param_groups": optimizer_state["param_groups"]}, os.path.join(tmp, META_FILE))
            for name in os.listdir(tmp):  # the shards every rank wrote (rank 0 sees them all on a shared folder)
                fsync(os.path.join(tmp, name))
            fsync(tmp)
            if os.path.isdir(path):
                shutil.rmtree(path)  # the same step saved before, by a run this one resumed from earlier
            os.replace(tmp, path)
            fsync(os.path.dirname(path) or ".")
    except BaseException:
        if world.master:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
