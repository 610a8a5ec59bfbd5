"""A training run's random streams in its checkpoint, restorable on another device.

Data order and augmentation are counter-based (aerl_fast.data.loader) and need no state.  What a
checkpoint carries is torch's CPU RNG, the ε-greedy exploration generator and, on CUDA, CUDA's RNG
(dropout there).  The exploration generator lives on the CPU whatever the training device (the
fused loss takes one host draw per call from it, without a host sync), so its state has the same
shape everywhere and a run resumed on another device continues the same exploration stream.
States this device cannot take — an exploration state saved by a CUDA generator, or no CUDA state
for a run moved onto a GPU — are replaced by fresh streams derived from the caller's seed, and said.
"""
from __future__ import annotations

import torch

from aerl_fast.distributed import RANK_PRIME
from aerl_fast.seeds import derived_seed
from aerl_fast.errors import CheckpointError

EXPLORE_OFFSET = 7919  # the exploration stream's seed offset from the run's seed
CUDA_STATE_BYTES = 16  # a CUDA (Philox) generator's state: seed and offset


def exploration_generator(seed: int, rank: int = 0) -> torch.Generator:
    """The ε-greedy stream of process `rank` (0 outside torchrun), on the CPU."""
    return torch.Generator().manual_seed(seed + EXPLORE_OFFSET + rank * RANK_PRIME)


def capture(explore_gen: torch.Generator, device: torch.device) -> dict:
    """The checkpoint's "rng" entry: CPU RNG, exploration generator, and CUDA's RNG on CUDA."""
    rng = {"cpu": torch.get_rng_state(), "explore": explore_gen.get_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


def restore(rng: dict, explore_gen: torch.Generator, device: torch.device, fresh_seed: int) -> list:
    """Set the streams from a checkpoint's "rng" entry for a run on `device`.  Returns one line per
    stream that had to start afresh (from `fresh_seed`, e.g. derived from seed, rank, epoch, step)."""
    notes = []
    torch.set_rng_state(rng["cpu"])
    state = rng["explore"]
    if state.numel() == explore_gen.get_state().numel():
        explore_gen.set_state(state)
    elif state.numel() == CUDA_STATE_BYTES:
        explore_gen.manual_seed(derived_seed(fresh_seed, EXPLORE_OFFSET))
        notes.append("the checkpoint's exploration stream is a CUDA generator's (an older run); "
                     "exploration continues from a fresh CPU stream")
    else:
        raise CheckpointError(f"checkpoint: the exploration RNG state has {state.numel()} bytes, "
                              f"expected {explore_gen.get_state().numel()} (CPU) or {CUDA_STATE_BYTES} (CUDA)")
    if device.type == "cuda":
        if "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], device)
        else:
            torch.cuda.manual_seed(derived_seed(fresh_seed, 1))
            notes.append("the checkpoint was saved without a GPU: CUDA's random stream (dropout) "
                         "starts afresh")
    return notes
