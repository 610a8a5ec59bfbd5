"""Which loader feeds training (--loader auto|tensor|dali), decided once, in one place.

Measured on our CPU machine (2 cores, loaded; 1 thread; 10k CIFAR-shaped images, batch 128, flips +
translate): tensor DeviceLoader ~300k img/s (its batch is one C++ pass, augment_gather), DALI CPU
pipeline ~43k img/s (see bench/bench_speed.py).  So `auto` is the tensor loader on the CPU.

On CUDA the tensor loader keeps the whole uint8 set on the GPU and does one gather per batch with no
host work and no host-to-device copy; DALI, fed from host arrays, adds a host gather and a copy per
batch and only shines when it decodes files, which our sources do once, at load time.  So `auto`
keeps the tensor loader on CUDA too, unless the uint8 set does not fit in half of the free GPU memory:
then DALI streams batches from host memory (when installed).  The GPU columns of bench_speed.py
measure both, to revisit this rule on a GPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from aerl_fast.data.dali import INSTALL_HINT, dali_available
from aerl_fast.data.loader import Augment, DeviceLoader
from aerl_fast.errors import ConfigError
LOADERS = ("auto", "tensor", "dali")  # --loader
GPU_FRACTION = 0.5  # the device-resident set may take at most this share of the free GPU memory


@dataclass(frozen=True)
class LoaderChoice:
    name: str     # "tensor" or "dali"
    reason: str   # one line for the console and the run log


def _gpu_free_bytes(device: torch.device) -> int:
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def choose_loader(requested: str, device: torch.device, data_bytes: int, *, pad_mode: str = "zeros",
                  dali_ok: Optional[bool] = None,
                  gpu_free_bytes: Optional[Callable[[torch.device], int]] = None) -> LoaderChoice:
    """The loader for `requested` on `device` for a uint8 training set of `data_bytes`.

    Asks nothing of a GPU unless `device` is CUDA; `dali_ok`/`gpu_free_bytes` are injectable for tests."""
    if requested not in LOADERS:
        raise ConfigError(f"--loader must be one of {', '.join(LOADERS)}, got {requested!r}")
    dali_ok = dali_available() if dali_ok is None else dali_ok
    if requested == "tensor":
        return LoaderChoice("tensor", "requested")
    if requested == "dali":
        if not dali_ok:
            raise ConfigError(f"--loader dali: {INSTALL_HINT}")
        if pad_mode != "zeros":
            raise ConfigError(f"--loader dali fills translated pixels with zeros only; --pad-mode {pad_mode} "
                              f"needs --loader tensor")
        return LoaderChoice("dali", "requested")
    if device.type != "cuda":
        return LoaderChoice("tensor", "auto: CPU, the tensor loader (one C++ pass per batch) is ~7x faster than DALI's CPU pipeline")
    free = (gpu_free_bytes or _gpu_free_bytes)(device)
    if data_bytes <= GPU_FRACTION * free:
        return LoaderChoice("tensor", "auto: the uint8 set fits on the GPU; one on-device gather per batch")
    if dali_ok and pad_mode == "zeros":
        return LoaderChoice("dali", f"auto: the uint8 set ({data_bytes / 2**30:.1f} GiB) exceeds half the free "
                                    f"GPU memory ({free / 2**30:.1f} GiB); DALI streams it from host memory")
    return LoaderChoice("tensor", f"auto: the uint8 set ({data_bytes / 2**30:.1f} GiB) may not fit on the GPU "
                                  f"({free / 2**30:.1f} GiB free) and DALI "
                                  + ("is not installed" if not dali_ok else f"cannot pad with {pad_mode}"))


def make_loader(cfg, images, labels, device: torch.device, *, loader: str = "auto", channels_last: bool = False):
    """(training loader, LoaderChoice) for a TrainConfig and the --loader choice: the one place the
    Trainer builds it."""
    choice = choose_loader(loader, device, int(images.nbytes), pad_mode=cfg.pad_mode)
    aug = Augment(cfg.hflip, cfg.vflip, cfg.translate, cfg.pad_mode)
    kw = dict(device=device, shuffle=True, augment=aug, drop_last=len(labels) > cfg.batch_size,
              seed=cfg.seed, channels_last=channels_last)
    if choice.name == "dali":
        from aerl_fast.data.dali import DaliLoader
        return DaliLoader(images, labels, cfg.batch_size, **kw), choice
    return DeviceLoader(images, labels, cfg.batch_size, **kw), choice
