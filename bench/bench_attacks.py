"""pytest-benchmark: aerl_fast.attacks PGD against torchattacks and against the study's loop.

Run (CPU):  python -m pytest bench/bench_attacks.py -s [--benchmark-json=out.json]
            (-s shows the interleaved ratios; BENCH_RUNS_DIR keeps the trained models between runs)
Threads:    BENCH_THREADS (default 1; set for the whole session in bench/conftest.py).
Strict:     BENCH_STRICT=1 turns the issue's targets into assertions (ratios on a shared machine
            are noisy, so by default they are only printed).

Groups (the PGD and early-stop variants also run as separate pytest-benchmark tests, for its
table; the interleaved `test_ratio_*` figures are the ones to compare):
- Every attack gets the same NCHW model, as a user calling the Python API would hand it over; our
  `pgd` attacks a channels_last copy of it internally (`runtime.fast_eval_copy`, the copy's cost
  included in the times).
- "pgd-l2 alicnn-w1 B=128 10 steps" (untrained AliCNN at the study's width, eval mode, no early
  stop): ours (last iterate, clamp) vs torchattacks.PGDL2; ours (no clamp, the study's preset,
  with and without statistics) vs a cleverhans-style loop like the study's: trainable parameters
  (every backward also computes all parameter gradients), mean-reduced CE and `.backward()`,
  four per-step statistics each read with `.item()`.
- early stop (L2 eps 1.0, step 0.1, 100 steps, B=128), ours early-stopped vs torchattacks.PGDL2
  (last iterate), with the robust accuracy of both, on two SL models: an AliCNN (width 0.5)
  trained ~70 s on the CIFAR-10 images in ../shared/data (the study's regime: PGD leaves a few
  percent; BENCH_CIFAR_DIR overrides the folder, skipped when absent), and the tests' shapes AliCNN
  (width 0.25), which keeps ~38% robust at eps 1.0: the least favourable case, since every robust
  sample runs all 100 steps (speed-up <= steps * B / gradient evaluations).
- tracking overhead: ours last-iterate with GradStatsTracker.update every step (+ one summary)
  vs the same without.
The `test_ratio_*` tests time the variants interleaved (round-robin, fairer on a busy machine)
and print min/median times, images/s and the ratios.
"""
import os
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import aerl_fast  # noqa: E402
from aerl_fast.analysis import GradStatsTracker  # noqa: E402
from aerl_fast.attacks import pgd  # noqa: E402
from aerl_fast.models import build_model  # noqa: E402
from cifar_runs import CIFAR_DIR, cifar_available, cifar_test, train_cifar  # noqa: E402
from eval_fixtures import trained_runs  # noqa: E402

torchattacks = pytest.importorskip("torchattacks")
STRICT = os.environ.get("BENCH_STRICT") == "1"
THREADS = torch.get_num_threads()

B, STEPS, EPS, ALPHA = 128, 10, 1.0, 0.1
ES_STEPS = 100
GROUP = f"pgd-l2 alicnn-w1 B={B} {STEPS} steps threads={THREADS}"
ES_GROUP = f"early stop, L2 eps {EPS} step {ALPHA}, B={B} {ES_STEPS} steps threads={THREADS}"
TRACK_GROUP = f"tracking overhead alicnn-w1 B={B} {STEPS} steps threads={THREADS}"


# ----------------------------------------------------------------------------- the baselines

def study_style_pgd_l2(model, x, y, eps=EPS, alpha=ALPHA, steps=STEPS):
    """The study's PGD-L2 loop shape: parameters keep requires_grad (the backward computes all
    parameter gradients too), mean CE, .backward(), per-step statistics each synced by .item(),
    random start, no [0,1] clamp."""
    d = torch.randn_like(x)
    d = d * (torch.rand(x.shape[0], 1, 1, 1) * eps / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1))
    x_adv = (x + d).detach()
    prev, stats = None, []
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y)
        model.zero_grad()
        loss.backward()
        g = x_adv.grad.detach().flatten(1)
        stats.append(g.norm(dim=1).mean().item())
        if prev is not None:
            stats.append(F.cosine_similarity(g, prev, dim=1).mean().item())
            stats.append((torch.sign(g) == torch.sign(prev)).float().mean().item())
        u = F.normalize(g, dim=1)
        m = u.mean(0)
        stats.append(1 - (u @ (m / m.norm())).mean().item())
        prev = g
        step = alpha * g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)
        delta = (x_adv.detach() - x).flatten(1) + step
        delta = delta * torch.clamp(eps / delta.norm(dim=1, keepdim=True).clamp_min(1e-12), max=1.0)
        x_adv = (x + delta.view_as(x)).detach()
    return x_adv, stats


def ours_last(model, x, y, clamp=True, steps=STEPS, tracker=None):
    out = pgd(model, x, y, eps=EPS, step=ALPHA, steps=steps, norm="l2", clamp=clamp, seed=0,
              tracker=tracker)
    if tracker is not None:
        tracker.summary()  # the one host read of the statistics
    return out


def ours_with_stats(model, x, y, clamp=False):
    tracker = GradStatsTracker()
    return ours_last(model, x, y, clamp=clamp, tracker=tracker)


# -------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def wide():
    """AliCNN at the study's width, untrained (throughput only), parameters trainable as after
    training; the data is random images in [0, 1]."""
    torch.manual_seed(0)
    model = build_model("alicnn", 10, width=1.0).eval()
    x = torch.rand(B, 3, 32, 32)
    y = torch.randint(0, 10, (B,))
    ours_last(model, x, y, steps=1)  # warm-up
    return model, x, y


def _runs_root(tmp_path_factory):
    return Path(os.environ.get("BENCH_RUNS_DIR") or tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module", params=["cifar10-alicnn-w0.5", "shapes-alicnn-w0.25"])
def trained(request, tmp_path_factory):
    """(label, SL model, first B test images, labels)."""
    root = _runs_root(tmp_path_factory)
    if request.param.startswith("cifar10"):
        if not cifar_available():
            pytest.skip(f"no CIFAR-10 at {CIFAR_DIR} (set BENCH_CIFAR_DIR)")
        x, y = cifar_test(B)
        return request.param, aerl_fast.load_model(train_cifar(root, "sl")), x, y
    runs = trained_runs(root)
    return request.param, aerl_fast.load_model(runs.dirs["sl"]), runs.x[:B].clone(), runs.y[:B].clone()


def _interleaved(fns, rounds):
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: (min(v), statistics.median(v)) for k, v in times.items()}


def _compare(benchmark, title, fns):
    """The interleaved comparison is itself the benchmark (one round: its time is the whole
    round-robin), so it runs under --benchmark-only; min/median per variant come back."""
    benchmark.group = f"{title} (interleaved comparison)"
    return benchmark.pedantic(_interleaved, args=(fns,), kwargs={"rounds": int(os.environ.get("BENCH_ROUNDS", "3"))},
                              rounds=1, iterations=1)


def _report(title, times, pairs, n_images, benchmark=None):
    print(f"\n{title}")
    for name, (tmin, tmed) in times.items():
        print(f"  {name:<34} min {tmin * 1e3:8.1f} ms  median {tmed * 1e3:8.1f} ms  "
              f"{n_images / tmin:8.0f} img/s (best)")
    ratios = {}
    for fast, slow in pairs:
        r_min = times[slow][0] / times[fast][0]
        r_med = times[slow][1] / times[fast][1]
        ratios[f"{fast} vs {slow}"] = (r_min, r_med)
        print(f"  speed-up {fast} vs {slow}: {r_min:.2f}x (min), {r_med:.2f}x (median)")
    if benchmark is not None:
        benchmark.extra_info.update({f"{k} (min, median)": [round(a, 3), round(b, 3)] for k, (a, b) in ratios.items()})
    return ratios


def _robust(model, x, x_adv, y):
    with torch.no_grad():
        return float(((model(x).argmax(1) == y) & (model(x_adv).argmax(1) == y)).double().mean())


# ------------------------------------------------------- no early stop: ours vs the baselines

def test_ours_last_iterate(benchmark, wide):
    benchmark.group = GROUP
    model, x, y = wide
    benchmark.pedantic(ours_last, args=(model, x, y), rounds=3, iterations=1)


def test_torchattacks_pgdl2(benchmark, wide):
    benchmark.group = GROUP
    model, x, y = wide
    atk = torchattacks.PGDL2(model, eps=EPS, alpha=ALPHA, steps=STEPS, random_start=True)
    benchmark.pedantic(atk, args=(x, y), rounds=3, iterations=1)


def test_study_style_loop(benchmark, wide):
    benchmark.group = GROUP
    model, x, y = wide
    benchmark.pedantic(study_style_pgd_l2, args=(model, x, y), rounds=3, iterations=1)


def test_ratio_no_early_stop(benchmark, wide):
    model, x, y = wide
    atk = torchattacks.PGDL2(model, eps=EPS, alpha=ALPHA, steps=STEPS, random_start=True)
    times = _compare(benchmark, GROUP, {
        "ours (clamp)": lambda: ours_last(model, x, y),
        "torchattacks PGDL2": lambda: atk(x, y),
        "ours (no clamp)": lambda: ours_last(model, x, y, clamp=False),
        "ours (no clamp) + statistics": lambda: ours_with_stats(model, x, y),
        "study-style loop + statistics": lambda: study_style_pgd_l2(model, x, y),
    })
    ratios = _report(GROUP, times, [("ours (clamp)", "torchattacks PGDL2"),
                                    ("ours (no clamp)", "study-style loop + statistics"),
                                    ("ours (no clamp) + statistics", "study-style loop + statistics")],
                     B, benchmark)
    assert all(p.requires_grad for p in model.parameters())  # our attack left the caller's model alone
    if STRICT:
        assert ratios["ours (clamp) vs torchattacks PGDL2"][0] >= 1.0
        assert ratios["ours (no clamp) + statistics vs study-style loop + statistics"][0] >= 1.3


# -------------------------------------------------------------- early stop vs torchattacks

def test_ours_early_stop(benchmark, trained):
    label, model, x, y = trained
    benchmark.group = f"{ES_GROUP}, SL {label}"
    benchmark.pedantic(lambda: pgd(model, x, y, eps=EPS, step=ALPHA, steps=ES_STEPS, norm="l2",
                                   early_stop=True, seed=0), rounds=2, iterations=1)


def test_torchattacks_last_iterate(benchmark, trained):
    label, model, x, y = trained
    benchmark.group = f"{ES_GROUP}, SL {label}"
    atk = torchattacks.PGDL2(model, eps=EPS, alpha=ALPHA, steps=ES_STEPS, random_start=True)
    benchmark.pedantic(atk, args=(x, y), rounds=2, iterations=1)


def test_ratio_early_stop(benchmark, trained):
    label, model, x, y = trained
    atk = torchattacks.PGDL2(model, eps=EPS, alpha=ALPHA, steps=ES_STEPS, random_start=True)
    out = {}

    def ours():
        out["ours"] = pgd(model, x, y, eps=EPS, step=ALPHA, steps=ES_STEPS, norm="l2",
                          early_stop=True, seed=0, return_result=True)

    def theirs():
        out["theirs"] = atk(x, y)

    times = _compare(benchmark, f"{ES_GROUP}, SL {label}", {"ours early stop": ours, "torchattacks PGDL2": theirs})
    ratios = _report(f"{ES_GROUP}, SL {label}", times, [("ours early stop", "torchattacks PGDL2")], B, benchmark)
    with torch.no_grad():
        clean = model(x).argmax(1) == y
    acc_ours = float((clean & ~out["ours"].fooled).double().mean())
    acc_theirs = _robust(model, x, out["theirs"], y)
    print(f"  robust accuracy: ours {acc_ours:.1%}, torchattacks {acc_theirs:.1%}; clean "
          f"{float(clean.double().mean()):.1%}; our gradient evaluations {out['ours'].grad_evals} "
          f"vs {ES_STEPS * B} for {ES_STEPS} full steps")
    assert acc_ours <= acc_theirs  # early stop is never the weaker attack
    if STRICT and label.startswith("cifar10"):
        assert ratios["ours early stop vs torchattacks PGDL2"][0] >= 3.0


# -------------------------------------------------------------------- statistics overhead

def test_ratio_tracking_overhead(benchmark, wide):
    model, x, y = wide
    times = _compare(benchmark, TRACK_GROUP, {
        "ours": lambda: ours_last(model, x, y),
        "ours + GradStatsTracker": lambda: ours_last(model, x, y, tracker=GradStatsTracker()),
    })
    _report(TRACK_GROUP, times, [], B)
    over_min = times["ours + GradStatsTracker"][0] / times["ours"][0] - 1
    over_med = times["ours + GradStatsTracker"][1] / times["ours"][1] - 1
    print(f"  overhead of the statistics: {over_min:+.1%} (min), {over_med:+.1%} (median)")
    benchmark.extra_info["statistics overhead (min, median)"] = [round(over_min, 4), round(over_med, 4)]
    if STRICT:
        assert over_min <= 0.10
