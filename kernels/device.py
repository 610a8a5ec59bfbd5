"""Where a Triton launch runs.

Triton launches on the *current* CUDA device and its current stream, not on the device of the
tensors it is given: with tensors on cuda:1 and cuda:0 current, a kernel runs on GPU 0 with GPU 1
pointers (an illegal address, reported asynchronously).  Every launch helper enters
`launch_device(tensor)` first.
"""
from __future__ import annotations

import contextlib

import torch


def launch_device(t: torch.Tensor):
    """Context making t's GPU the current CUDA device (and its current stream the launch stream);
    nothing for tensors elsewhere (the interpreter runs CPU tensors)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()
