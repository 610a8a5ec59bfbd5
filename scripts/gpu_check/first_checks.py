"""Step "first" of scripts/gpu_check.sh: the correctness checks that come before any timing.

    python -m gpu_check.first_checks --out OUT [--device cuda] [--small] [--budget SECONDS]

The CUDA grad_stats kernel against the float64 reference (fp32/bf16/fp64, B in {1, 33, 1024}, D up
to 150528, non-contiguous input); the PG loss at bf16 8192x32768 (several tiles) and at
B·C > 2^31 against the float64 formula with fixed actions; the PGD update at bf16 channels_last
[256, 3, 224, 224], L-inf and L2, in place; one RL / RL-adv step and one PGD loop with host syncs
made errors; a 2-epoch RL-adv run with --compile --amp counting recompiles and graph breaks; and on
a second GPU both ops without set_device.  `--small --device cpu` runs the same code at small sizes
(tests/test_gpu_check.py, the kernels under the Triton interpreter).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "kernels"))  # the float64 formulas the kernel tests use

from kernel_refs import pg_loss_f64, pgd_f64  # noqa: E402

import aerl_fast.kernels as K  # noqa: E402
from gpu_check.figures import train_key  # noqa: E402
from gpu_check.record import Skip, StepRecord, step_args  # noqa: E402


@contextlib.contextmanager
def no_host_sync(device: torch.device):
    """On CUDA a host sync inside the block raises (torch.cuda.set_sync_debug_mode("error"))."""
    if device.type != "cuda":
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _close(got, want, atol, rtol, what):
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    err = (got - want).abs()
    bad = err > atol + rtol * want.abs()
    if bool(bad.any()):
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} values off, max error "
                             f"{float(err.max()):.3g}")
    return float(err.max())


def check_grad_stats(device, small):
    from aerl_fast.analysis import grad_stats, grad_stats_backend, grad_stats_reference
    if grad_stats_backend(device) != "extension":
        raise AssertionError(f"grad_stats runs the torch fallback on {device}: aerl_fast._C has no "
                             "kernel for it (was the CUDA extension built?)")
    torch.manual_seed(0)
    worst, cases = 0.0, 0
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-5}[dtype]
        for B in ((1, 33) if small else (1, 33, 1024)):
            for D in ((7, 300) if small else (3072, 150528)):
                wide = torch.randn(B, 2 * D, device=device)
                g = wide.to(dtype)[:, ::2]  # every other column: not contiguous
                p = (0.6 * wide[:, ::2] + 0.4 * torch.randn(B, D, device=device)).to(dtype)
                got = grad_stats(g, p)
                want = grad_stats_reference(g.double(), p.double())
                for name, a, b in zip(got._fields, got, want):
                    worst = max(worst, _close(a, b, tol, 10 * tol, f"{name} {dtype} B={B} D={D}"))
                cases += 1
    return f"{cases} cases, max abs error {worst:.2e}"


def _pg_case(B, C, device, dtype, gen_seed):
    g = torch.Generator(device=device).manual_seed(gen_seed)
    labels = torch.randint(0, C, (B,), device=device, generator=g)
    logits = (2 * torch.randn(B, C, device=device, generator=g)).to(dtype)
    logits[torch.arange(B, device=device), labels] += 8
    flip = torch.rand(B, device=device, generator=g) < 0.5
    actions = torch.where(flip, labels, (labels + 1) % C)
    return logits, labels, actions


def check_pg_loss_tiles(device, small):
    from aerl_fast.kernels.pg_loss import eps_greedy_pg_loss_fused
    from aerl_fast.kernels.pg_loss_triton import MAX_BLOCK_C
    B, C = (6, 40) if small else (8192, 32768)
    logits, labels, actions = _pg_case(B, C, device, torch.bfloat16, 1)
    x = logits.clone().requires_grad_(True)
    block_c = 16 if small else 0  # small: force several tiles; full: C / 4096 of them
    out = eps_greedy_pg_loss_fused(x, labels, 0.1, actions=actions, prob_floor=1e-6, block_c=block_c)
    out.loss.backward()
    ref_loss, ref_grad = pg_loss_f64(logits, labels, actions, 1e-6)
    _close(out.loss, ref_loss, 1e-4, 1e-4, "loss")
    err = _close(x.grad, ref_grad, 1e-2 / B, 1e-2, "gradient")
    tiles = -(-C // (block_c or min(MAX_BLOCK_C, C)))
    return f"[{B}, {C}] bf16, {tiles} tiles per row, max gradient error {err:.2e}"


def check_pg_loss_int64_offsets(device, small):
    """B·C > 2^31 elements: row offsets past int32 (the kernels compute them in int64)."""
    C = 32768
    B = 2 ** 31 // C + 1
    need = 2 * B * C * 2 + (1 << 30)
    if small or device.type != "cuda" or torch.cuda.mem_get_info(device)[0] < need:
        raise Skip(f"needs a GPU with {need / 2 ** 30:.0f} GiB free ([{B}, {C}] bf16 logits and gradient)")
    logits, labels, actions = _pg_case(B, C, device, torch.bfloat16, 2)
    x = logits.requires_grad_(True)
    out = K.eps_greedy_pg_loss(x, labels, 0.0, actions=actions, reduction="none", validate=False)
    out.loss.sum().backward()
    worst = 0.0
    for lo in range(0, B, 4096):  # float64 formula per chunk of rows, the last ones included
        hi = min(B, lo + 4096)
        ref_loss, ref_grad = pg_loss_f64(logits[lo:hi].detach(), labels[lo:hi], actions[lo:hi],
                                         reduction="none")
        _close(out.loss[lo:hi], ref_loss, 1e-4, 1e-4, f"loss rows {lo}-{hi}")
        if lo == 0 or hi == B:
            worst = max(worst, _close(x.grad[lo:hi], ref_grad, 1e-2, 1e-2, f"gradient rows {lo}-{hi}"))
    return f"[{B}, {C}] = {B * C} elements (> 2^31), max gradient error {worst:.2e}"


def check_pgd_bf16_channels_last(device, small):
    shape = (4, 3, 9, 9) if small else (256, 3, 224, 224)
    torch.manual_seed(1)
    cl = torch.channels_last
    x0 = torch.rand(shape, device=device).to(torch.bfloat16).contiguous(memory_format=cl)
    grad = torch.randn(shape, device=device).to(torch.bfloat16).contiguous(memory_format=cl)
    details = []
    for norm, step, eps_max in (("linf", 2 / 255, 8 / 255), ("l2", 0.2, 3.0)):
        xa = (x0.float() + 0.02 * torch.randn(shape, device=device)).clamp(0, 1).to(torch.bfloat16) \
            .contiguous(memory_format=cl)
        before, ptr = xa.clone(), xa.data_ptr()
        eps = torch.linspace(0.0, eps_max, shape[0], device=device)
        K.pgd_step(xa, x0, grad, step, eps, norm=norm)
        if xa.data_ptr() != ptr or not xa.is_contiguous(memory_format=cl):
            raise AssertionError(f"{norm}: x_adv was not updated in place in its channels_last memory")
        want = pgd_f64(before, x0, grad, step, eps.cpu(), norm)
        details.append(f"{norm} max error {_close(xa, want, 4e-3, 0.0, norm):.1e}")
    return f"{list(shape)} bf16 channels_last, in place; " + ", ".join(details)


def _training_setup(device, small):
    from aerl_fast.models import build_model
    from aerl_fast.rng_state import exploration_generator
    torch.manual_seed(0)
    width, batch = (0.25, 16) if small else (1.0, 256)
    model = build_model("alicnn", 10, width=width).to(device).to(memory_format=torch.channels_last)
    x = torch.rand(batch, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)
    return model, x, y, exploration_generator(0)


def check_train_step_sync_free(device, objective, small):
    from aerl_fast.objectives import ObjectiveConfig, train_step
    model, x, y, gen = _training_setup(device, small)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None
    cfg = ObjectiveConfig(objective)

    def step():
        opt.zero_grad(set_to_none=True)
        train_step(model, x, y, cfg, adv_active=True, generator=gen, autocast=autocast)
        opt.step()
    step()  # warm-up: kernel compilation and the first (synchronised) launch
    with no_host_sync(device):
        step()
    return "no host sync" if device.type == "cuda" else "ran (sync detection needs CUDA)"


def check_pgd_loop_sync_free(device, small):
    from aerl_fast.attacks import attack_loss, attack_mode
    model, x0, y, _ = _training_setup(device, small)
    xa = x0.clone()
    with attack_mode(model):
        def step():
            xi = xa.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(attack_loss(model(xi), y, "ce", False), xi)
            K.pgd_step(xa, x0, g, 0.1, 1.0, norm="l2", validate=False)
        step()
        with no_host_sync(device):
            for _ in range(10):
                step()
    return "10 steps, no host sync" if device.type == "cuda" else "ran (sync detection needs CUDA)"


def count_compile_events(log: str) -> tuple:
    """(recompiles, graph breaks) in a TORCH_LOGS="recompiles,graph_breaks" log."""
    recompiles = len(re.findall(r"Recompiling function", log))
    breaks = len(re.findall(r"Graph break", log))
    return recompiles, breaks


def check_compile_run(device, small, out, budget, rec):
    if device.type != "cuda":
        raise Skip("torch.compile on the CPU takes minutes here (the log counting is tested)")
    run = Path(out) / "runs" / "compile-alicnn-rl-adv"
    cmd = [sys.executable, "-m", "aerl_fast.train", "--dataset", "shapes", "--model", "alicnn",
           "--width", "1.0", "--objective", "rl-adv", "--epochs", "2", "--batch-size", "256",
           "--compile", "--amp", "--device", str(device), "--out", str(run), "--overwrite",
           "--no-progress", "--checkpoint-minutes", "0"]
    env = dict(os.environ, TORCH_LOGS="recompiles,graph_breaks")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=max(10, budget))
    (Path(out) / "compile-run.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
    recompiles, breaks = count_compile_events(proc.stderr)
    rec.figure("compile_recompiles", recompiles, "recompiles", "2-epoch RL-adv alicnn --compile --amp")
    rec.figure("compile_graph_breaks", breaks, "graph breaks", "same run")
    epochs = [json.loads(ln) for ln in (run / "log.jsonl").read_text().splitlines() if ln.strip()]
    rec.figure(train_key("alicnn", "rl-adv", "compiled bf16"), round(epochs[-1]["images_per_s"]),
               "img/s", "epoch 2 (epoch 1 compiles)")
    return f"{recompiles} recompiles, {breaks} graph breaks (log: compile-run.log)"


def check_second_gpu():
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        raise Skip("one GPU")
    current = torch.cuda.current_device()
    dev = torch.device("cuda", 1 if current != 1 else 0)  # the GPU that is not current
    logits, labels, actions = _pg_case(64, 1000, dev, torch.float32, 3)
    x = logits.clone().requires_grad_(True)
    K.eps_greedy_pg_loss(x, labels, 0.1, actions=actions).loss.backward()
    ref_loss, ref_grad = pg_loss_f64(logits, labels, actions)
    _close(x.grad, ref_grad, 2e-6, 2e-5, "gradient")
    K.eps_greedy_pg_loss(logits, labels, 0.1, generator=torch.Generator().manual_seed(0))
    x0 = torch.rand(8, 3, 32, 32, device=dev)
    g = torch.randn(8, 3, 32, 32, device=dev)
    xa = x0.clone()
    K.pgd_step(xa, x0, g, 0.05, 0.5, norm="l2")
    _close(xa, pgd_f64(x0, x0, g, 0.05, 0.5, "l2"), 2e-6, 1e-5, "pgd")
    torch.cuda.synchronize(dev)
    if torch.cuda.current_device() != current:
        raise AssertionError("the current device changed")
    return f"both ops on {dev} with cuda:{current} current"


def check_no_fallback():
    if K.fallbacks():
        raise AssertionError(f"fell back: {K.fallbacks()}")
    return "none"


def main(argv=None):
    args = step_args(__doc__, argv, 85)
    t0 = time.monotonic()
    device = torch.device(args.device)
    rec = StepRecord(args.out, "first", str(device))
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        rec.note(f"{p.name}, {p.total_memory / 2 ** 30:.0f} GiB, sm_{p.major}{p.minor}, "
                 f"{torch.cuda.device_count()} GPU(s); torch {torch.__version__}, CUDA {torch.version.cuda}")
    rec.check("grad_stats kernel vs float64 reference", lambda: check_grad_stats(device, args.small))
    rec.check("PG loss bf16, several tiles, vs float64", lambda: check_pg_loss_tiles(device, args.small))
    rec.check("PG loss B·C > 2^31 vs float64", lambda: check_pg_loss_int64_offsets(device, args.small))
    rec.check("PGD bf16 channels_last in place vs float64",
              lambda: check_pgd_bf16_channels_last(device, args.small))
    for objective in ("rl", "rl-adv"):
        rec.check(f"{objective} training step without host sync",
                  lambda: check_train_step_sync_free(device, objective, args.small))
    rec.check("PGD loop without host sync", lambda: check_pgd_loop_sync_free(device, args.small))
    rec.check("second GPU without set_device", check_second_gpu)
    rec.check("no kernel fell back to the reference", check_no_fallback)
    left = args.budget - (time.monotonic() - t0) - 5
    rec.check("2-epoch RL-adv --compile --amp: recompiles, graph breaks",
              lambda: check_compile_run(device, args.small, args.out, left, rec))
    return rec


if __name__ == "__main__":
    sys.exit(1 if main().failed else 0)
