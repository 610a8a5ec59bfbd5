"""pytest-benchmark: the fused kernels against the eager torch reference and the study's own code.

    pytest bench/bench_kernels.py --benchmark-only            (CPU groups run, GPU groups skip)
    pytest bench/bench_kernels.py --benchmark-only -s         (also prints the ratio lines and
                                                               the bytes-per-row table)

Every group has a baseline measured in the same run (the study's formulation for the loss, a
torchattacks-style update for PGD); each other case stores its speed-up (baseline median / its
median, > 1: faster) in `benchmark.extra_info` and prints it (bench/baselines.py).  The baselines are imported from
tests/kernels/kernel_refs.py, so the tests and the benchmarks time and check the same code.

On a CPU the public ops run the torch reference (that is what `aerl_fast.kernels.backend()`
reports); the Triton cases need a CUDA device and skip here.  Under TRITON_INTERPRET=1 the CPU
"dispatch" cases skip too: the interpreter is a correctness tool, not something to time.
"""
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "kernels"))

from baselines import record  # noqa: E402
from kernel_refs import study_pg_loss  # noqa: E402

import aerl_fast.kernels as K  # noqa: E402
from aerl_fast.kernels import pgd_update as PM  # noqa: E402
from aerl_fast.kernels.pg_loss import eps_greedy_pg_loss_fused  # noqa: E402



EPS, FLOOR = 0.1, 1e-6  # the study's exploration rate and probability floor
CPU_SHAPES = [(256, 10), (256, 100), (256, 1000)]
GPU_SHAPES = [(256, 10), (256, 1000), (8192, 1000), (1024, 32768)]
HAS_CUDA = torch.cuda.is_available()
no_gpu = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device: the Triton kernels are timed on "
                                                 "a GPU only (CPU runs the torch reference)")
cpu_dispatch_is_reference = pytest.mark.skipif(
    K.backend("cpu") != "reference",
    reason="TRITON_INTERPRET=1: CPU tensors would go through the Triton interpreter")



def _inputs(B, C, device="cpu", dtype=torch.float32):
    g = torch.Generator(device="cpu").manual_seed(0)
    logits = torch.randn(B, C, generator=g).to(device=device, dtype=dtype)
    labels = torch.randint(0, C, (B,), generator=g).to(device)
    return logits, labels


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _median_seconds(fn, device, reps=21):
    fn()
    times = []
    for _ in range(reps):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return sorted(times)[reps // 2]


def _run(benchmark, group, name, fn, device="cpu", baseline=False):
    """Benchmark `fn`, then record and print its speed-up against the group's baseline (medians:
    a shared machine adds long outliers); a deselected baseline is timed here (`_BASELINE_FN`)."""
    benchmark.group = group

    def call():
        fn()
        _sync(device)

    benchmark(call)
    record(benchmark, group, name, benchmark.stats.stats.median, "call", baseline=baseline,
           fallback=lambda: _median_seconds(_BASELINE_FN[group], device))


_BASELINE_FN = {}


@pytest.fixture(scope="module", autouse=True)
def _warm_allocator():
    """Run every CPU case a few times before any is timed.  The first cases of a run otherwise pay
    for fresh multi-MB allocations (page faults until the allocator settles), which made the
    measured ratios depend on the order of the tests."""
    logits, labels = _inputs(256, 1000)
    gen = torch.Generator().manual_seed(1)
    x0 = torch.rand(256, 3, 32, 32)
    grad = torch.randn(256, 3, 32, 32)
    for _ in range(5):
        for step in (study_step, reference_step):
            step(logits, labels, gen)
        for norm in ("linf", "l2"):
            for fn in (torchattacks_style, _reference_pgd):
                fn(x0.clone(), x0, grad, 0.01, 0.03, norm)
    yield


# ── the three loss versions, forward + backward ───────────────────────────────────────────────
def study_step(logits, labels, gen):
    x = logits.detach().requires_grad_(True)
    loss, _ = study_pg_loss(x, labels, EPS, gen)
    loss.backward()


def reference_step(logits, labels, gen):
    x = logits.detach().requires_grad_(True)
    out = K.eps_greedy_pg_loss_reference(x, labels, EPS, explore="batch", prob_floor=FLOOR,
                                         generator=gen)
    out.loss.backward()


def dispatch_step(logits, labels, gen):
    x = logits.detach().requires_grad_(True)
    out = K.eps_greedy_pg_loss(x, labels, EPS, explore="batch", prob_floor=FLOOR, generator=gen)
    out.loss.backward()


def fused_step(logits, labels, gen):
    x = logits.detach().requires_grad_(True)
    out = eps_greedy_pg_loss_fused(x, labels, EPS, explore="batch", prob_floor=FLOOR,
                                   generator=gen)
    out.loss.backward()


_COPY_BW = {}  # bytes/s of the device's copy_, measured in this run (test_gpu_copy_bandwidth)


def _traffic(benchmark, bytes_moved: float):
    """Store the achieved bytes/s, its share of the copy bandwidth and the roofline time
    (bytes / copy bandwidth) of a GPU case whose median is known."""
    seconds = benchmark.stats.stats.median
    info = {"bytes_moved": round(bytes_moved), "bytes_per_s": bytes_moved / seconds}
    if "cuda" in _COPY_BW:
        info.update(copy_bw_share=info["bytes_per_s"] / _COPY_BW["cuda"],
                    roofline_s=bytes_moved / _COPY_BW["cuda"])
    benchmark.extra_info.update(info)
    print(f"  traffic {info['bytes_per_s'] / 1e9:.0f} GB/s" + (
        f" = {100 * info['copy_bw_share']:.0f}% of copy_" if "copy_bw_share" in info else ""))


def _loss_case(benchmark, B, C, device, name, step, baseline=False, dtype=torch.float32):
    logits, labels = _inputs(B, C, device, dtype)
    gen = torch.Generator(device=device).manual_seed(1)
    # the fused op draws from a CPU generator, as the trainer's exploration stream does
    own = torch.Generator().manual_seed(1) if step is fused_step else gen
    group = f"pg_loss fwd+bwd {device.split(':')[0]} {str(dtype)[6:]} B={B} C={C}"
    _BASELINE_FN.setdefault(group, lambda: study_step(logits, labels, gen))
    _run(benchmark, group, name, lambda: step(logits, labels, own), device, baseline)
    if device.startswith("cuda"):  # bytes counted on the CPU at the op boundary, per row
        _traffic(benchmark, count_bytes_per_row(step, min(B, 64), C, dtype)[0] * B)


@pytest.mark.parametrize("B,C", CPU_SHAPES)
def test_cpu_loss_study(benchmark, B, C):
    _loss_case(benchmark, B, C, "cpu", "study (baseline)", study_step, baseline=True)


@pytest.mark.parametrize("B,C", CPU_SHAPES)
def test_cpu_loss_reference(benchmark, B, C):
    _loss_case(benchmark, B, C, "cpu", "eager reference", reference_step)


@cpu_dispatch_is_reference
@pytest.mark.parametrize("B,C", CPU_SHAPES)
def test_cpu_loss_dispatch(benchmark, B, C):
    """What `aerl_fast.kernels.eps_greedy_pg_loss` costs on CPU: the reference plus dispatch."""
    _loss_case(benchmark, B, C, "cpu", "public op (reference backend)", dispatch_step)


GPU_DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])


@no_gpu
def test_gpu_copy_bandwidth(benchmark):
    """The device's copy bandwidth (1 GiB copy_, read + write counted), the yardstick of every
    GPU case's traffic below; measured first in the run."""
    src = torch.empty(2 ** 28, device="cuda")
    dst = torch.empty_like(src)
    benchmark.group = "copy bandwidth cuda"
    benchmark.pedantic(lambda: (dst.copy_(src), torch.cuda.synchronize()), rounds=10, warmup_rounds=2)
    _COPY_BW["cuda"] = 2 * src.numel() * 4 / benchmark.stats.stats.median
    benchmark.extra_info["bytes_per_s"] = _COPY_BW["cuda"]
    print(f"\n[copy bandwidth] {_COPY_BW['cuda'] / 1e9:.0f} GB/s")


@no_gpu
@GPU_DTYPES
@pytest.mark.parametrize("B,C", GPU_SHAPES)
def test_gpu_loss_study(benchmark, B, C, dtype):
    _loss_case(benchmark, B, C, "cuda", "study (baseline)", study_step, True, dtype)


@no_gpu
@GPU_DTYPES
@pytest.mark.parametrize("B,C", GPU_SHAPES)
def test_gpu_loss_reference(benchmark, B, C, dtype):
    _loss_case(benchmark, B, C, "cuda", "eager reference", reference_step, False, dtype)


@no_gpu
@GPU_DTYPES
@pytest.mark.parametrize("B,C", GPU_SHAPES)
def test_gpu_loss_triton(benchmark, B, C, dtype):
    assert K.backend("cuda") == "triton", "CUDA present but the Triton path is not used"
    _loss_case(benchmark, B, C, "cuda", "fused Triton", fused_step, False, dtype)


# ── PGD update ────────────────────────────────────────────────────────────────────────────────
def torchattacks_style(x_adv, x0, grad, step, eps, norm):
    """The usual eager PGD step (as torchattacks writes it), the baseline of the PGD group."""
    with torch.no_grad():
        if norm == "linf":
            x_new = x_adv + step * grad.sign()
            delta = torch.clamp(x_new - x0, min=-eps, max=eps)
        else:
            g = grad / (grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1) + 1e-10)
            delta = x_adv + step * g - x0
            n = delta.flatten(1).norm(dim=1)
            delta = delta * torch.clamp(eps / n, max=1.0).view(-1, 1, 1, 1)
        x_adv.copy_(torch.clamp(x0 + delta, 0, 1))


def _pgd_case(benchmark, device, norm, name, fn, baseline=False):
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(256, 3, 32, 32, generator=g).to(device)
    grad = torch.randn(256, 3, 32, 32, generator=g).to(device)
    x_adv = x0.clone()
    eps = 8 / 255 if norm == "linf" else 1.0
    step = eps / 4
    group = f"pgd_step {norm} {device.split(':')[0]} [256,3,32,32]"
    _BASELINE_FN.setdefault(group, lambda: torchattacks_style(x_adv, x0, grad, step, eps, norm))
    _run(benchmark, group, name, lambda: fn(x_adv, x0, grad, step, eps, norm), device, baseline)
    if device.startswith("cuda"):  # image-sized passes: counted at the op boundary, except the
        passes = 7 if (fn is _fused_pgd and norm == "l2") else None  # fused L2 reads inputs twice
        per_sample = passes * x0[0].numel() * 4 if passes else pgd_bytes_per_sample(fn, norm)[0]
        _traffic(benchmark, per_sample * x0.shape[0])


def _reference_pgd(x_adv, x0, grad, step, eps, norm):
    K.pgd_step_reference(x_adv, x0, grad, step, eps, norm=norm)


def _fused_pgd(x_adv, x0, grad, step, eps, norm):
    PM.pgd_step_fused(x_adv, x0, grad, step, eps, norm=norm)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_cpu_pgd_baseline(benchmark, norm):
    _pgd_case(benchmark, "cpu", norm, "torchattacks-style (baseline)", torchattacks_style, True)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_cpu_pgd_reference(benchmark, norm):
    _pgd_case(benchmark, "cpu", norm, "eager reference", _reference_pgd)


@no_gpu
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_gpu_pgd_baseline(benchmark, norm):
    _pgd_case(benchmark, "cuda", norm, "torchattacks-style (baseline)", torchattacks_style, True)


@no_gpu
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_gpu_pgd_triton(benchmark, norm):
    _pgd_case(benchmark, "cuda", norm, "fused Triton", _fused_pgd)


# ── bytes moved per row, counted at the ATen-op boundary ──────────────────────────────────────
class _ByteCounter(TorchDispatchMode):
    """Sums, over every op that runs, the bytes of the tensors it reads and writes (each tensor
    once per op, small ones included; views move nothing and are skipped).  A custom op (a fused
    kernel) counts as one op: what its kernel reads and writes.  Internal traffic of an ATen
    kernel (multinomial's scan, softmax's two passes) is not seen: the eager counts are lower
    bounds."""

    def __init__(self):
        super().__init__()
        self.bytes = 0
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = [t for t in torch.utils._pytree.tree_leaves((args, kwargs or {}))
               if isinstance(t, torch.Tensor)]
        outs = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        in_ptrs = {t.untyped_storage().data_ptr() for t in ins}
        if outs and all(t.untyped_storage().data_ptr() in in_ptrs for t in outs) \
                and not func._schema.is_mutable:
            return out  # a view (detach, expand, …): no bytes move
        seen = set()

        def add(t):
            if isinstance(t, torch.Tensor) and id(t) not in seen:
                seen.add(id(t))
                self.bytes += t.numel() * t.element_size()
        torch.utils._pytree.tree_map(add, (args, kwargs or {}, out))
        for i, a in enumerate(func._schema.arguments):  # written in place: read and written
            if a.alias_info is not None and a.alias_info.is_write and i < len(args) \
                    and isinstance(args[i], torch.Tensor):
                self.bytes += args[i].numel() * args[i].element_size()
        self.ops += 1
        return out


def count_bytes_per_row(step, B, C, dtype):
    logits, labels = _inputs(B, C, "cpu", dtype)
    gen = torch.Generator().manual_seed(1)
    x = logits.detach().requires_grad_(True)
    with _ByteCounter() as c:
        step(x, labels, gen)
    return c.bytes / B, c.ops


def test_bytes_per_row_table(benchmark):
    """A count, not a timing: prints bytes moved per row by each version (fwd+bwd) — the number a
    bandwidth-bound GPU run scales with.  The fused op's backward is counted as reading the
    logits of every row; on the device it skips rows with zero reward.  (The benchmark fixture
    times the counting, once, so the table is part of a --benchmark-only run.)"""
    rows = []

    def count():
        for dtype in (torch.float32, torch.bfloat16):
            for C in (10, 100, 1000, 32768):
                B = 64
                res = {n: count_bytes_per_row(f, B, C, dtype) for n, f in
                       (("study", study_step), ("reference", reference_step), ("fused", fused_step))}
                rows.append((str(dtype).split(".")[1], C, res))
    benchmark.group = "bytes moved per row (a count)"
    benchmark.pedantic(count, rounds=1, iterations=1)
    benchmark.extra_info["bytes_per_row"] = {f"{dt} C={C}": {k: round(v[0]) for k, v in r.items()} for dt, C, r in rows}
    print("\n dtype      C | study B/row (ops) | reference B/row (ops) | fused B/row (ops) | "
          "study/fused")
    for dt, C, r in rows:
        print(f" {dt:8s} {C:6d} | {r['study'][0]:10.0f} ({r['study'][1]:3d}) | "
              f"{r['reference'][0]:12.0f} ({r['reference'][1]:3d}) | "
              f"{r['fused'][0]:9.0f} ({r['fused'][1]:3d}) | {r['study'][0] / r['fused'][0]:5.1f}x")
    for dt, C, r in rows:  # the fused op must move less than either eager version
        assert r["fused"][0] < r["reference"][0] and r["fused"][0] < r["study"][0]


def pgd_bytes_per_sample(fn, norm, B=16):
    """Bytes one PGD update moves per [3, 32, 32] fp32 sample, counted on the CPU at the op boundary."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(B, 3, 32, 32, generator=g)
    grad = torch.randn(B, 3, 32, 32, generator=g)
    eps = 8 / 255 if norm == "linf" else 1.0
    with _ByteCounter() as c:
        fn(x0.clone(), x0, grad, eps / 4, eps, norm)
    return c.bytes / B, c.ops


def test_pgd_bytes_per_sample_table(benchmark):
    """A count, not a timing: bytes moved per sample by one PGD update, [3, 32, 32] fp32 images."""
    res = {}

    def count():
        for norm in ("linf", "l2"):
            for name, fn in (("torchattacks-style", torchattacks_style), ("reference", _reference_pgd),
                             ("fused", _fused_pgd)):
                res[norm, name] = pgd_bytes_per_sample(fn, norm)
    benchmark.group = "PGD bytes moved per sample (a count)"
    benchmark.pedantic(count, rounds=1, iterations=1)
    benchmark.extra_info["bytes_per_sample"] = {f"{n} {k}": round(v[0]) for (n, k), v in res.items()}
    n_bytes = 3 * 32 * 32 * 4
    print(f"\n PGD bytes/sample in images of {n_bytes} B (the fused L2 kernel reads its three "
          "inputs twice: 7 on the device, not the 4 counted at the op boundary):")
    for (norm, name), (b, ops) in res.items():
        print(f"   {norm:4s} {name:18s} {b / n_bytes:5.1f} ({ops} ops)")
    for norm in ("linf", "l2"):
        assert res[norm, "fused"][0] < res[norm, "torchattacks-style"][0]
