"""On a machine with CUDA: the compiled Triton kernels on the device against float64 formulas.

The rest of tests/kernels runs the kernels' Python in the interpreter on CPU; this runs what a
GPU user gets.  TRITON_INTERPRET is read when triton is imported, so the checks run in a fresh
process without it.  The same script runs here on CPU under the interpreter, and with a kernel
made to fail, which must fail the script: in strict mode (AERL_FAST_KERNELS=triton) the launch
raises; without it the op would fall back to the reference, and the script's closing check that
nothing fell back (`aerl_fast.kernels.fallbacks()`) catches it.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

SCRIPT = textwrap.dedent(r"""
    import sys
    import torch
    sys.path.insert(0, sys.argv[2])
    import aerl_fast.kernels as K
    from aerl_fast.kernels.pg_loss import eps_greedy_pg_loss_fused
    from kernel_refs import pg_loss_f64, pgd_f64
    from scipy import stats
    dev = sys.argv[1]
    if sys.argv[3] == "broken":  # a kernel made to fail at launch: the script must not pass
        def broken(*a, **k):
            raise RuntimeError("kernel made to fail")
        K._pgd.__dict__["_pgd_triton"] = broken  # the PGD checks still pass on the reference
    assert K.backend(dev) == "triton", K.backend(dev)
    g = torch.Generator().manual_seed(0)
    if sys.argv[3] != "broken":  # (a broken run goes straight to the PGD checks)
        for B, C, dt in [(7, 10, torch.float32), (256, 1000, torch.bfloat16), (5, 5000, torch.float16)]:
            y = torch.randint(0, C, (B,), generator=g)
            x = 2 * torch.randn(B, C, generator=g)
            x[torch.arange(B), y] += 12  # most sampled actions earn reward, even at C = 5000
            xd = x.to(dev, dt).requires_grad_(True)
            out = K.eps_greedy_pg_loss(xd, y.to(dev), 0.1, seed=1, prob_floor=1e-6)
            out.loss.backward()
            a = out.actions.cpu()
            ref_loss, ref_grad = pg_loss_f64(x.to(dt), y, a, 1e-6)
            assert float(ref_grad.abs().sum()) > 0
            torch.testing.assert_close(out.loss.cpu().double(), ref_loss, atol=2e-5, rtol=2e-5)
            tol = 2e-6 if dt == torch.float32 else 1e-2
            torch.testing.assert_close(xd.grad.cpu().double(), ref_grad, atol=tol, rtol=max(tol, 2e-5))
        row = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, -3.0, 0.2, 0.8])
        n = 20000
        acts = eps_greedy_pg_loss_fused(row.expand(n, 10).to(dev), torch.zeros(n, dtype=torch.long, device=dev),
                                        0.0, seed=3, block_c=4).actions.cpu()
        counts = torch.bincount(acts, minlength=10).double().numpy()
        p = stats.chisquare(counts, (torch.softmax(row.double(), 0) * n).numpy()).pvalue
        assert p > 1e-3, p
    for norm in ("linf", "l2"):
        x0 = torch.rand(8, 3, 16, 16, generator=g)
        xa = (x0 + 0.02 * torch.randn(x0.shape, generator=g)).clamp(0, 1)
        gr = torch.randn(x0.shape, generator=g)
        eps = torch.linspace(0.0, 0.5, 8)
        xd = xa.clone().to(dev)  # .to is a no-op on CPU: keep xa intact
        K.pgd_step(xd, x0.to(dev), gr.to(dev), 0.05, eps.to(dev), norm=norm)
        torch.testing.assert_close(xd.cpu().double(), pgd_f64(xa, x0, gr, 0.05, eps, norm),
                                   atol=2e-6, rtol=1e-5)
    assert K.fallbacks() == [], K.fallbacks()  # every check above ran the fused kernels
    print("GPU-CHECKS-OK")
""")


def run_checks(device, interpret, tmp_path, strict=True, kernel="working"):
    """Run SCRIPT in a fresh process; (returncode, stdout, stderr)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "AERL_FAST_KERNELS")}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    if strict:
        env["AERL_FAST_KERNELS"] = "triton"
    script = tmp_path / "gpu_checks.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(script), device, os.path.dirname(__file__), kernel],
                          env=env, capture_output=True, text=True, timeout=900)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_compiled_kernels_on_cuda(tmp_path):
    rc, out, err = run_checks("cuda", False, tmp_path)
    assert rc == 0 and "GPU-CHECKS-OK" in out, err[-4000:]


@pytest.mark.slow
def test_the_checks_pass_under_the_interpreter_on_cpu(tmp_path):
    rc, out, err = run_checks("cpu", True, tmp_path)
    assert rc == 0 and "GPU-CHECKS-OK" in out, err[-4000:]


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "auto"])
def test_a_kernel_made_to_fail_fails_the_checks(tmp_path, strict):
    rc, out, err = run_checks("cpu", True, tmp_path, strict=strict, kernel="broken")
    assert rc != 0 and "GPU-CHECKS-OK" not in out
    if strict:  # the launch raised
        assert "RuntimeError: kernel made to fail" in err.splitlines()[-1], err[-2000:]
    else:  # the reference stood in, and only the closing check noticed
        assert err.splitlines()[-1].startswith("AssertionError: [{'op': 'pgd_step'"), err[-2000:]
