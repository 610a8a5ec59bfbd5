"""Without the interpreter and without CUDA the ops must run the torch reference, silently (no
launch failed: nothing is recorded in fallbacks()), and say so through backend(); the strict mode
refuses instead.  Triton reads TRITON_INTERPRET at import, so these run in a fresh
Python process: once with triton importable, once with triton made unimportable."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

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
    # the public op is exactly the reference (same generator stream → same actions)
    o1 = K.eps_greedy_pg_loss(x, y, 0.3, seed=5, prob_floor=1e-6)
    o2 = K.eps_greedy_pg_loss_reference(x, y, 0.3, seed=5, prob_floor=1e-6)
    res["same_actions"] = bool(torch.equal(o1.actions, o2.actions))
    # the torch.library op's CPU kernel: loss and grad equal the reference for fixed actions
    f = P.eps_greedy_pg_loss_fused(x, y, 0.0, actions=a, prob_floor=0.01, reduction="sum")
    (gf,) = torch.autograd.grad(f.loss, x)
    r = K.eps_greedy_pg_loss_reference(x, y, 0.0, actions=a, prob_floor=0.01, reduction="sum")
    (gr,) = torch.autograd.grad(r.loss, x)
    res["op_loss_err"] = float((f.loss - r.loss).abs())
    res["op_grad_err"] = float((gf - gr).abs().max())
    seed = torch.tensor([7])
    torch.library.opcheck(P.pg_loss_fwd_op, (x, y, None, seed, 0.2, False, 1e-6))
    x0 = torch.rand(4, 3, 5, 5, generator=g)
    gr = torch.randn(4, 3, 5, 5, generator=g)
    xa, xb = x0.clone(), x0.clone()
    K.pgd_step(xa, x0, gr, 0.05, torch.tensor([0.0, 0.1, 0.2, 0.3]), norm="l2")
    PM.pgd_step_fused(xb, x0, gr, 0.05, torch.tensor([0.0, 0.1, 0.2, 0.3]), norm="l2")
    res["pgd_err"] = float((xa - xb).abs().max())
    res["pgd_moved"] = float((xa - x0).abs().max())
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
    assert res["same_actions"]
    assert res["op_loss_err"] < 1e-5 and res["op_grad_err"] < 1e-6
    assert res["pgd_err"] == 0.0 and res["pgd_moved"] > 0.01
    assert res["fallbacks"] == []
    assert res["strict"].startswith("AERL_FAST_KERNELS=triton: the Triton eps_greedy_pg_loss cannot "
                                    "run on cpu tensors"), res["strict"]
