"""Step "ext" of scripts/gpu_check.sh: the extension's CUDA op and the CUDA loaders against their
CPU results.

    python -m gpu_check.ext_ops --out OUT [--device cuda] [--small]

grad_stats on the device against the CPU op on the same numbers, and torch.library.opcheck on
device tensors; the CUDA tensor loader's batches against the CPU loader's (one C++ pass,
augment_gather) bit for bit, the promise that lets --device and --loader change on resume; DALI's
GPU pipeline against the tensor loader when nvidia.dali imports ("not run: DALI not installed"
otherwise).
"""
from __future__ import annotations

import sys

import numpy as np
import torch

from gpu_check.record import NotRun, StepRecord, step_args


def check_grad_stats_op(device, small):
    from aerl_fast.analysis import grad_stats_backend
    if grad_stats_backend(device) != "extension":
        raise AssertionError(f"no aerl_fast._C kernel for {device} tensors")
    op = torch.ops.aerl_fast.grad_stats
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for B, D in ((3, 50), (33, 700)) if small else ((1, 3072), (256, 3072), (64, 150528)):
        x = torch.randn(B, D, generator=g)
        p = 0.5 * x + torch.randn(B, D, generator=g)
        for a, b in zip(op(x.to(device), p.to(device)), op(x, p)):
            torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-6)
            worst = max(worst, float((a.cpu() - b).abs().max()))
    x = torch.randn(8, 100, generator=g).to(device)
    torch.library.opcheck(op.default, (x, x.flip(0)))
    # first step: NaN cos/sign by convention, which the aot_dispatch check compares without equal_nan
    torch.library.opcheck(op.default, (x, None), test_utils=("test_schema", "test_autograd_registration",
                                                           "test_faketensor"))
    return f"device op = CPU op (max difference {worst:.1e}); opcheck passed"


def _images(n, size=32):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), rng.integers(0, 10, n)


def _same_batches(a, b, epochs=(0, 3)):
    n = 0
    for epoch in epochs:
        for (xa, ya), (xb, yb) in zip(a.epoch(epoch), b.epoch(epoch), strict=True):
            if not (torch.equal(xa.cpu(), xb.cpu()) and torch.equal(ya.cpu(), yb.cpu())):
                raise AssertionError(f"epoch {epoch}, batch {n}: the batches differ")
            n += 1
    return n


def check_tensor_loader(device, small):
    from aerl_fast.data.loader import Augment, DeviceLoader
    x, y = _images(300 if small else 5000)
    kw = dict(augment=Augment(), seed=7)
    here = DeviceLoader(x, y, 64, device=device, channels_last=device.type == "cuda", **kw)
    cpu = DeviceLoader(x, y, 64, device="cpu", **kw)
    n = _same_batches(here, cpu)
    return f"{n} batches on {device} equal the CPU loader's (C++ augment_gather: {cpu.fused is not None})"


def check_dali_loader(device, small):
    from aerl_fast.data.dali import dali_available
    if not dali_available():
        raise NotRun("DALI not installed")
    from aerl_fast.data.dali import DaliLoader
    from aerl_fast.data.loader import Augment, DeviceLoader
    x, y = _images(300 if small else 5000)
    kw = dict(augment=Augment(), seed=7, channels_last=True)
    n = _same_batches(DaliLoader(x, y, 64, device=device, **kw), DeviceLoader(x, y, 64, device=device, **kw))
    return f"{n} batches of DALI's {'GPU' if device.type == 'cuda' else 'CPU'} pipeline equal the tensor loader's"


def main(argv=None):
    args = step_args(__doc__, argv)
    device = torch.device(args.device)
    rec = StepRecord(args.out, "ext", str(device))
    rec.check("grad_stats op on the device vs the CPU op, opcheck",
              lambda: check_grad_stats_op(device, args.small))
    rec.check("tensor loader on the device vs the CPU loader, bit for bit",
              lambda: check_tensor_loader(device, args.small))
    rec.check("DALI GPU loader vs the tensor loader, bit for bit",
              lambda: check_dali_loader(device, args.small))
    return rec


if __name__ == "__main__":
    sys.exit(1 if main().failed else 0)
