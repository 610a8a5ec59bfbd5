"""Bounds on what an input file may make the product allocate.

A file of a few bytes can claim a 10^13-element array, a billion classes or a 30000×30000 image;
every reader checks such a claim against these bounds before allocating, so the answer is a
one-line error naming the file and the value instead of an exhausted machine.
"""
from __future__ import annotations

import math
import os
import resource
from pathlib import Path

MAX_CLASSES = 100_000                  # class count of a dataset or model (ImageNet-21k has 21,841)
MAX_IMAGE_PIXELS = 8192 * 8192         # width × height of one encoded image before it is resized
MAX_IMAGE_SIDE = 4096                  # side of the square images a model is built for
DEFLATE_MAX_RATIO = 1032               # deflate's best case: uncompressed bytes per compressed byte
_CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def memory_bytes() -> int:
    """Memory this process may use at most: physical memory, lowered by an address-space rlimit or
    a cgroup limit when one is set."""
    limits = [os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")]
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        limits.append(soft)
    for path in _CGROUP_LIMITS:
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            limits.append(int(text))
    return min(limits)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def require_memory(nbytes: int, what: str, error: type) -> None:
    """Raise `error` when `what` (a phrase naming the file and the claim) needs more than this
    machine's memory."""
    available = memory_bytes()
    if nbytes > available:
        raise error(f"{what} needs {format_bytes(nbytes)} but this machine allows "
                    f"{format_bytes(available)}; refused before allocating")


def array_bytes(shape, itemsize: int) -> int:
    return math.prod(int(d) for d in shape) * int(itemsize)
