"""What a production run needs beyond the lecture: the run's machinery, kept out of the lesson.

train_gpt2.py is the lesson (the model, its data, its training loop); this package holds the rest, one
module a concern, each usable on its own:

- cli.py: one-line errors and exit codes, the on/off flag types, shared by every script
- shards.py: the token shard format that fineweb.py writes and the loader reads
- world.py: the device, and the processes torchrun starts: who is who, and how they agree
- perf.py: FLOPs per token, device peaks, MFU and the time left in each step line
- settings.py: every setting of a run (TrainConfig), the --model presets, their checks, the dry run
- inputs.py: what a user hands the trainer besides flags (a text file, Hugging Face weights), checked
- locks.py: one process at a time in a directory (a run's --log_dir, fineweb.py's --local_dir)
- run_dir.py: the --log_dir a run owns: its lock, log.txt, checkpoint names, curves.png
- fsdp.py: FSDP2, the model's weights, gradients and AdamW's moments sharded across the processes
- checkpoints.py: reading, checking, writing and restoring checkpoints, FSDP's shards included; CheckpointManager,
  what the training loop calls: the checkpoint to resume, when to save, names, rotation, one file or shards
- stopping.py: signals that ask a run to stop with a checkpoint, and the exit code that says so

Nothing here imports train_gpt2.py: where a module needs the model, it is handed the class or a model.
"""
