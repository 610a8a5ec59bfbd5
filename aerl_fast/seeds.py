"""The one seed mixer of the training streams: data order, augmentation, and the streams a process
re-derives on resume, all from integer keys (seed, epoch, step, rank, ...).

numpy's SeedSequence (a hash designed for this) is kept rather than replaced, so that existing runs
resume to bit-identical weights.  The attacks use their own counter-based mixer
(`aerl_fast.attacks._rng`: splitmix64, because its twin on int64 tensors draws per-sample streams
on the device without a host round trip)."""
from __future__ import annotations

import numpy as np


def derived_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0] >> 1)
