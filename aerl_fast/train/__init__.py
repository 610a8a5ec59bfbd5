"""Train one model of the study.

From Python:

    from aerl_fast.config import TrainConfig, RunOptions
    from aerl_fast import train
    summary = train.run(TrainConfig(objective="rl", epochs=6), RunOptions(out="runs/rl"))
    summary = train.resume("runs/rl", changes={"epochs": 12})

From the shell: `python -m aerl_fast.train [--preset NAME] [flags]` (cli.py, a thin shell).

Data flows one way: source (uint8 arrays) → DeviceLoader (device-resident, batched augmentation)
→ objective (aerl_fast.objectives, through aerl_fast.kernels) → AdamW (aerl_fast.optim).  Each
epoch appends a line to log.jsonl and writes last.pt (and best.pt on a new best validation
accuracy) atomically; a run killed at any point continues with `resume` from its last checkpoint,
mid-epoch included, and reproduces the uninterrupted run.  Under `torchrun --nproc_per_node=N`
the same calls train with DistributedDataParallel (aerl_fast.distributed).
"""
from aerl_fast.optim import lr_factor

from .cli import main
from .data import accuracy, prepare_data
from .stage import RunSummary, resume, run
from .trainer import DivergedError, Trainer

__all__ = ["DivergedError", "RunSummary", "Trainer", "accuracy", "lr_factor", "main", "prepare_data",
           "resume", "run"]
