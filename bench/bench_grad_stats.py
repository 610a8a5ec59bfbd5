"""pytest-benchmark: per-step gradient statistics, the compiled op against torch, and their cost in PGD.

Run (CPU):  python -m pytest bench/bench_grad_stats.py --benchmark-only [--benchmark-json=out.json]
Threads:    BENCH_THREADS (default 1; set for the whole session in bench/conftest.py).
Optional:   BENCH_COMPILE=1 adds a torch.compile (inductor) version of the vectorised torch code
            (about 30-60 s of compile time on this CPU).

Groups:
- "grad_stats B=256 D=3072": one attack step's statistics for a batch of CIFAR-sized gradients:
  * study_passes: the study's per-step code shape, a separate pass (and a .item() sync) for each
    of mean norm, cosine to last step, sign consistency and within-batch dispersion;
  * torch_vectorised: best-effort vectorised torch (vector_norm, vecdot, one sign comparison,
    the mean direction as a matrix-vector product), no host syncs;
  * extension: torch.ops.aerl_fast.grad_stats (one pass);
  * tracker_update: GradStatsTracker.update, i.e. the op plus the per-step records.
- "minimal PGD": a PGD-L2 loop written here (aerl_fast.attacks has no PGD yet) on a small CNN,
  with and without GradStatsTracker.update per step; the ratio is the cost of the statistics.
"""
import os
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from aerl_fast.analysis import GradStatsTracker, grad_stats_backend
from baselines import record


B, D = 256, 3072
GROUP = f"grad_stats B={B} D={D} threads={torch.get_num_threads()}"


def _inputs():
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(B, D, generator=gen)
    p = 0.6 * g + 0.4 * torch.randn(B, D, generator=gen)
    return g, p


def study_passes(g, p):
    """The study's per-step statistics: separate passes, each synchronised with .item()."""
    mean_norm = g.norm(dim=1).mean().item()
    cos = F.cosine_similarity(g, p, dim=1).mean().item()
    sign = (torch.sign(g) == torch.sign(p)).float().mean().item()
    u = F.normalize(g, dim=1)
    m = u.mean(0)
    dispersion = 1 - (u @ (m / m.norm())).mean().item()
    return mean_norm, cos, sign, dispersion


def torch_vectorised(g, p):
    """Best-effort vectorised torch with the op's conventions and outputs, no host syncs."""
    n = torch.linalg.vector_norm(g, dim=1)
    pn = torch.linalg.vector_norm(p, dim=1)
    dot = torch.linalg.vecdot(g, p)
    cos = torch.where((n > 0) & (pn > 0), dot / (n * pn), 0.0).clamp(-1, 1)
    sign = (torch.sign(g) == torch.sign(p)).sum(1) / g.shape[1]
    inv = torch.where(n > 0, 1.0 / n, 0.0)
    mean_dir = (inv @ g) / g.shape[0]
    return n, cos, sign, mean_dir


def _check_same(a, b):
    for x, y in zip(a, b):
        torch.testing.assert_close(x.float(), y.float(), rtol=1e-4, atol=1e-5)


def test_study_passes(benchmark):
    benchmark.group = GROUP
    g, p = _inputs()
    out = benchmark(study_passes, g, p)
    ref = torch_vectorised(g, p)
    assert abs(out[1] - ref[1].mean().item()) < 1e-4


def test_torch_vectorised(benchmark):
    benchmark.group = GROUP
    g, p = _inputs()
    benchmark(torch_vectorised, g, p)


@pytest.mark.skipif(not os.environ.get("BENCH_COMPILE"), reason="set BENCH_COMPILE=1")
def test_torch_compiled(benchmark):
    benchmark.group = GROUP
    g, p = _inputs()
    compiled = torch.compile(torch_vectorised, dynamic=False)
    _check_same(compiled(g, p), torch_vectorised(g, p))
    benchmark(compiled, g, p)


@pytest.mark.skipif(grad_stats_backend("cpu") != "extension", reason="aerl_fast._C not built")
def test_extension(benchmark):
    benchmark.group = GROUP
    g, p = _inputs()
    op = torch.ops.aerl_fast.grad_stats
    _check_same(op(g, p), torch_vectorised(g, p))
    benchmark(op, g, p)


needs_cuda_op = pytest.mark.skipif(not torch.cuda.is_available() or grad_stats_backend("cuda") != "extension",
                                   reason="needs a CUDA device and aerl_fast._C built with CUDA")


@needs_cuda_op
@pytest.mark.parametrize("D", [3072, 150528])
@pytest.mark.parametrize("case", ["torch vectorised (baseline)", "extension"])
def test_cuda(benchmark, D, case):
    """One step's statistics on the GPU at CIFAR and ImageNet sizes; traffic = g and g_prev read once."""
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(B, D, generator=gen).cuda()
    p = (0.6 * g + 0.4 * torch.randn(B, D, generator=gen).cuda())
    op = torch.ops.aerl_fast.grad_stats
    fn = torch_vectorised if case.startswith("torch") else op
    _check_same(op(g, p), torch_vectorised(g, p))
    group = f"grad_stats cuda B={B} D={D}"
    benchmark.group = group
    benchmark(lambda: (fn(g, p), torch.cuda.synchronize()))
    record(benchmark, group, case, benchmark.stats.stats.median, "call", baseline=case.startswith("torch"),
           fallback=lambda: _cuda_seconds(torch_vectorised, g, p))
    benchmark.extra_info["bytes_per_s"] = 2 * g.numel() * 4 / benchmark.stats.stats.median


def _cuda_seconds(fn, g, p, reps=20):
    fn(g, p)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn(g, p)
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps


def test_tracker_update(benchmark):
    """One tracker step (op + per-step records); every call after the first has a previous step."""
    benchmark.group = GROUP
    g, p = _inputs()
    tracker = GradStatsTracker()
    tracker.update(p)
    benchmark(tracker.update, g)
    assert tracker.steps > 1


# ------------------------------------------------------------------------ minimal PGD (labelled)

class SmallCNN(nn.Module):
    """AliCNN-shaped (conv 32, 64 | pool | 128 | pool | 128 | pool | fc), for the overhead figure."""

    def __init__(self, classes=10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(128, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(128 * 16, 256), nn.ReLU(),
                                  nn.Linear(256, classes))

    def forward(self, x):
        return self.head(self.features(x))


def minimal_pgd_l2(model, x, y, eps=1.0, alpha=0.1, steps=10, tracker=None):
    """PGD-L2 with random start and per-sample (summed) loss; no [0,1] clamp, as in the study."""
    delta = torch.randn_like(x)
    delta = delta / delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * eps * torch.rand(len(x), 1, 1, 1)
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model(x + delta), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, delta)
        if tracker is not None:
            tracker.update(grad)
        gn = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        delta = delta.detach() + alpha * grad / gn
        dn = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        delta = delta * torch.clamp(eps / dn.clamp_min(1e-12), max=1.0)
    return (x + delta).detach()


PGD_BATCH = 64


@pytest.fixture(scope="module")
def pgd_setup():
    torch.manual_seed(0)
    model = SmallCNN().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.rand(PGD_BATCH, 3, 32, 32)
    y = torch.randint(0, 10, (PGD_BATCH,))
    minimal_pgd_l2(model, x, y, steps=2)  # warm-up
    return model, x, y


def test_minimal_pgd_without_stats(benchmark, pgd_setup):
    benchmark.group = f"minimal PGD-L2 10 steps, B={PGD_BATCH}, SmallCNN"
    model, x, y = pgd_setup
    benchmark.pedantic(minimal_pgd_l2, args=(model, x, y), rounds=8, iterations=1)


def test_minimal_pgd_with_stats(benchmark, pgd_setup):
    benchmark.group = f"minimal PGD-L2 10 steps, B={PGD_BATCH}, SmallCNN"
    model, x, y = pgd_setup
    tracker = GradStatsTracker()

    def run():
        tracker.reset()
        out = minimal_pgd_l2(model, x, y, tracker=tracker)
        tracker.summary()  # the one host sync, as an evaluator would do per batch
        return out

    benchmark.pedantic(run, rounds=8, iterations=1)
    assert tracker.steps == 10


def test_minimal_pgd_overhead_interleaved(benchmark, pgd_setup):
    """The same comparison with the two variants interleaved (fairer on a busy machine).

    Prints min and median over 8 rounds each; asserts only that statistics were gathered, since
    wall-clock ratios on a shared machine are not a reliable pass/fail signal.  The interleaved run
    is itself the benchmark (one round), so it runs under --benchmark-only.
    """
    model, x, y = pgd_setup
    tracker = GradStatsTracker()
    times = {"without": [], "with": []}

    def interleaved():
        for _ in range(8):
            for name in ("without", "with"):
                t0 = time.perf_counter()
                if name == "with":
                    tracker.reset()
                    minimal_pgd_l2(model, x, y, tracker=tracker)
                    tracker.summary()
                else:
                    minimal_pgd_l2(model, x, y)
                times[name].append(time.perf_counter() - t0)
    benchmark.group = "minimal PGD with/without statistics (interleaved comparison)"
    benchmark.pedantic(interleaved, rounds=1, iterations=1)
    for name, ts in times.items():
        ts.sort()
        print(f"\nminimal PGD {name:>7} stats: min {ts[0] * 1e3:.1f} ms, median {ts[4] * 1e3:.1f} ms")
    print(f"overhead (min): {times['with'][0] / times['without'][0] - 1:+.2%}, "
          f"(median): {times['with'][4] / times['without'][4] - 1:+.2%}")
    benchmark.extra_info["overhead (min, median)"] = [round(times['with'][0] / times['without'][0] - 1, 4),
                                                      round(times['with'][4] / times['without'][4] - 1, 4)]
    assert tracker.steps == 10
    # The statistics alone, on gradients of the attack's shape: a figure that machine noise
    # (which swamps the end-to-end difference) does not move much.
    grads = [torch.randn_like(x) for _ in range(10)]
    stats_times = []
    for _ in range(20):
        t0 = time.perf_counter()
        tracker.reset()
        for gr in grads:
            tracker.update(gr)
        tracker.summary()
        stats_times.append(time.perf_counter() - t0)
    stats_min = min(stats_times)
    print(f"statistics alone for 10 steps: {stats_min * 1e3:.2f} ms = "
          f"{stats_min / times['without'][0]:.3%} of the PGD run without them")
