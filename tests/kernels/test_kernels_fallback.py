"""Without the interpreter and without CUDA the ops must run the torch reference, silently (no
launch failed: nothing is recorded in fallbacks()), and say so through backend(), giving the
float64 formulas' numbers; the strict mode refuses instead.  Triton reads TRITON_INTERPRET at import, so these run in a fresh
Python process: once with triton importable, once with triton made unimportable."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from kernel_refs import pg_loss_f64, pgd_f64

SCRIPT = textwrap.dedent(r"""
    import json, sys
    if sys.argv[1] == "no-triton":
        sys.modules["triton"] = None  # import triton → ImportError
    import torch
    import aerl_fast.kernels as K
    from aerl_fast.kernels import pg_loss as P
    import aerl_fast.kernels.pgd_update as PM
    res = {"backend": K.backend("cpu"), "triton_cpu": P.triton_enabled("cpu")}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 12, generator=g, requires_grad=True)
    y = torch.randint(0, 12, (9,), generator=g)
    a = torch.where(torch.arange(9) % 2 == 0, y, (y + 1) % 12)
    res.update(x=x.tolist(), y=y.tolist(), a=a.tolist())
    # the public op and the torch.library op's CPU kernel, for fixed actions: loss and gradient,
    # checked against the float64 formula by the parent process
    for name, op in (("public", K.eps_greedy_pg_loss), ("op", P.eps_greedy_pg_loss_fused)):
        out = op(x, y, 0.0, actions=a, prob_floor=0.01, reduction="sum")
        (grad,) = torch.autograd.grad(out.loss, x)
        res[name] = {"loss": float(out.loss), "grad": grad.tolist()}
    sampled = K.eps_greedy_pg_loss(x, y, 0.3, seed=5, prob_floor=1e-6)
    res["sampled"] = {"actions": sampled.actions.tolist(), "loss": float(sampled.loss)}
    seed = torch.tensor([7])
    torch.library.opcheck(P.pg_loss_fwd_op, (x, y, None, seed, 0.2, False, 1e-6))
    x0 = torch.rand(4, 3, 5, 5, generator=g)
    gr = torch.randn(4, 3, 5, 5, generator=g)
    res["pgd"] = {"x0": x0.tolist(), "g": gr.tolist()}
    for name, step in (("public", K.pgd_step), ("op", PM.pgd_step_fused)):
        xa = x0.clone()
        step(xa, x0, gr, 0.05, torch.tensor([0.0, 0.1, 0.2, 0.3]), norm="l2")
        res["pgd"][name] = xa.tolist()
    res["fallbacks"] = K.fallbacks()  # no launch was attempted: nothing fell back
    import os
    os.environ["AERL_FAST_KERNELS"] = "triton"  # strict: no Triton for CPU tensors is an error
    try:
        K.eps_greedy_pg_loss(x, y, 0.3, seed=5)
        res["strict"] = "ran"
    except RuntimeError as exc:
        res["strict"] = str(exc)
    print("RESULT" + json.dumps(res))
""")


@pytest.mark.parametrize("mode", ["triton-no-interpreter", "no-triton"])
def test_reference_fallback_in_fresh_process(mode):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "AERL_FAST_KERNELS")}
    env["CUDA_VISIBLE_DEVICES"] = ""  # no GPU even where one exists: the CPU fallback is tested
    proc = subprocess.run([sys.executable, "-c", SCRIPT, mode], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
    res = json.loads(line[len("RESULT"):])
    assert res["backend"] == "reference" and res["triton_cpu"] is False
    x, y, a = torch.tensor(res["x"]), torch.tensor(res["y"]), torch.tensor(res["a"])
    loss, grad = pg_loss_f64(x, y, a, 0.01, "sum")
    for name in ("public", "op"):
        assert res[name]["loss"] == pytest.approx(float(loss), rel=1e-5)
        torch.testing.assert_close(torch.tensor(res[name]["grad"]).double(), grad, rtol=1e-5, atol=1e-6)
    sampled = torch.tensor(res["sampled"]["actions"])   # drawn by the op: its loss is the formula's
    assert res["sampled"]["loss"] == pytest.approx(float(pg_loss_f64(x, y, sampled, 1e-6)[0]), rel=1e-5)
    x0, g = torch.tensor(res["pgd"]["x0"]), torch.tensor(res["pgd"]["g"])
    expected = pgd_f64(x0, x0, g, 0.05, torch.tensor([0.0, 0.1, 0.2, 0.3]), "l2")
    assert float((expected - x0.double()).abs().max()) > 0.01      # the step moved the images
    for name in ("public", "op"):
        torch.testing.assert_close(torch.tensor(res["pgd"][name]).double(), expected, rtol=0, atol=1e-6)
    assert res["fallbacks"] == []
    assert res["strict"].startswith("AERL_FAST_KERNELS=triton: the Triton eps_greedy_pg_loss cannot "
                                    "run on cpu tensors"), res["strict"]
