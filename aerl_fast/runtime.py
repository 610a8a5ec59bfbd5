"""Device, mixed precision and compilation choices, made once and reported once."""
from __future__ import annotations

import contextlib
import copy
import ctypes
import functools
import sys

import torch

from aerl_fast.errors import ConfigError


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not (name.startswith("cuda:") and name[5:].isdigit()):
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: no CUDA device is available on this machine (use --device cpu)")
        if ":" in name and int(name[5:]) >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(name)


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    """True when the CPU executes bf16 natively (AVX512-BF16 or AMX-BF16).

    Without it, oneDNN emulates bf16 and autocast runs ~19× slower than fp32 (measured on our AVX2
    machines), so `--amp` falls back to fp32 there.
    """
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def amp_dtype(device: torch.device, amp: bool, log=print, what: str = "training"):
    """bf16 autocast on CUDA or a CPU with native bf16; otherwise None (fp32), said once.
    `what` names the work in that one line ("training", "attacking")."""
    if not amp:
        return None
    if device.type == "cuda":
        return torch.bfloat16
    if cpu_has_native_bf16():
        return torch.bfloat16
    log(f"--amp: this CPU has no native bf16 (bf16 would be ~19x slower than fp32); {what} in fp32")
    return None


def autocast_context(device: torch.device, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def prefers_channels_last(device: torch.device) -> bool:
    """Whether the model's weights go channels_last (NHWC memory) on `device`: yes on CUDA (tensor
    cores) and on the CPU, where oneDNN's convolutions then skip their per-call weight reorders.
    Measured on our CPU (1 thread, RL step): alicnn w0.5 b64 fp32 104 -> 74 ms, bf16 69 -> 42 ms;
    cnn6 w0.25 b128 951 -> 798 ms; resnet18 w0.25 101 -> 84 ms; densenet121 2120 -> 1903 ms;
    PGD-10 on alicnn b128 4.7-5.0 -> 3.5-3.7 s.  `load_model` still hands out NCHW models: a
    channels_last model returns channels_last input gradients, which peer attack libraries
    (torchattacks, AutoAttack) `.view()` and fail on."""
    return device.type in ("cuda", "cpu")


def fast_eval_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A channels_last copy of an (eval-mode) model for aerl_fast's own attacks, or the model itself
    where channels_last does not pay: a device that does not prefer it, a model without 4-D
    (convolution) weights, or one whose 4-D weights are channels_last already.  A copy, because
    the original goes to peer libraries that `.view()` input gradients, which a channels_last model
    returns channels_last (and because the caller's module is not ours to change).  A model that
    cannot be deep-copied is returned as it is.  The copy costs ~6 ms for an AliCNN and ~0.1 s for
    a ResNet-50 on our CPU, next to seconds for any attack."""
    p = next(model.parameters(), None)
    if p is None or not prefers_channels_last(p.device):
        return model
    convs = [q for q in model.parameters() if q.dim() == 4]
    if not convs or all(q.is_contiguous(memory_format=torch.channels_last) for q in convs):
        return model
    try:
        clone = copy.deepcopy(model)
    except Exception:  # noqa: BLE001 - any object a module may hold can refuse to be copied
        return model
    return clone.to(memory_format=torch.channels_last)


def channels_last_batches(device: torch.device) -> bool:
    """Whether the loader hands out channels_last batches: on CUDA only.  On the CPU a channels_last
    model takes NCHW input at the same speed (the first convolution re-lays it; measured alicnn b128
    505-518 ms with NCHW input against 524-525 ms channels_last), while laying the batch out in the
    loader costs a strided copy that halves the loader's rate (185k -> 110-116k img/s)."""
    return device.type == "cuda"


_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # glibc's mallopt parameters


@functools.lru_cache(maxsize=None)
def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed blocks (up to 32 MiB each) in the heap instead of returning
    them to the OS, so every training step does not page-fault its activations and gradients in
    afresh.  Measured on our CPU (1 thread, RL-adv step at batch 128, channels_last): cnn6 w0.25
    1567 -> 1375 ms, alicnn 909 -> 860 ms; the cost is that the process keeps its peak memory.
    Once per process; False (and nothing changed) where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return all([mallopt(_M_MMAP_THRESHOLD, 32 << 20) == 1,   # the largest glibc allows
                mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1,
                mallopt(_M_TOP_PAD, 64 << 20) == 1])


def should_compile(device: torch.device, requested) -> bool:
    """--compile default: on for CUDA, off for CPU (measured: ~30 s compile, no gain on these CNNs)."""
    return (device.type == "cuda") if requested is None else bool(requested)




def environment(device) -> dict:
    """What a results folder records so a number can be traced: package versions, the git commit of
    this checkout (when it is one), the resolved device and the date."""
    import datetime  # noqa: PLC0415
    import importlib.metadata as md  # noqa: PLC0415
    import os  # noqa: PLC0415
    import subprocess  # noqa: PLC0415

    def version(dist):
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return None
    commit = None
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        r = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                           stdin=subprocess.DEVNULL)
        if r.returncode == 0:
            commit = r.stdout.strip()
            dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=5, stdin=subprocess.DEVNULL)
            if dirty.returncode == 0 and dirty.stdout.strip():
                commit += "+uncommitted"
    except (OSError, subprocess.SubprocessError):
        pass
    dev = torch.device(device)
    return {"aerl_fast": version("aerl_fast"), "torch": torch.__version__, "triton": version("triton"),
            "pyautoattack": version("pyautoattack"), "git_commit": commit, "device": str(dev),
            "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
