"""aerl_fast.analysis.grad_stats: the compiled op and its torch fallback against a float64 reference.

The reference below is written independently of both implementations (torch.sign, vector_norm,
explicit per-row loops for the tracker) so that a shared mistake cannot pass unnoticed.
"""
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from aerl_fast.analysis import (GradStatsTracker, grad_stats, grad_stats_backend,
                                grad_stats_reference)
from aerl_fast.analysis import gradient_stats as gs_module
HAS_EXT = grad_stats_backend("cpu") == "extension"
needs_ext = pytest.mark.skipif(
    not HAS_EXT, reason="aerl_fast._C not in use (not built, or AERL_FAST_GRAD_STATS=torch)")

# Both implementations; the extension entry is skipped when it is not built.
IMPLS = [
    pytest.param(lambda g, p: grad_stats(g, p), id="dispatch"),
    pytest.param(lambda g, p: torch.ops.aerl_fast.grad_stats(g, p), id="op", marks=needs_ext),
    pytest.param(lambda g, p: grad_stats_reference(g, p), id="fallback"),
]


def ref64(g, p):
    """Float64 reference, straight from the definitions in the module docstring."""
    g64 = g.double()
    norm = torch.linalg.vector_norm(g64, dim=1)
    units = torch.stack([row / n if n > 0 else torch.zeros_like(row) for row, n in zip(g64, norm)])
    mean_dir = units.mean(0)
    if p is None:
        nan = torch.full_like(norm, math.nan)
        return norm, nan, nan.clone(), mean_dir
    p64 = p.double()
    pnorm = torch.linalg.vector_norm(p64, dim=1)
    cos = torch.tensor([float((a @ b) / (na * nb)) if na > 0 and nb > 0 else 0.0
                        for a, b, na, nb in zip(g64, p64, norm, pnorm)], dtype=torch.float64)
    sign = (torch.sign(g64) == torch.sign(p64)).double().mean(1)
    return norm, cos.clamp(-1, 1), sign, mean_dir


def dispersion64(g):
    """Within-batch dispersion as the study defines it, in float64: 1 − mean_i ⟨u_i, m/‖m‖⟩ with u_i
    each sample's unit gradient (0 for a zero gradient) and m their mean."""
    units = [row / row.norm() if row.norm() > 0 else row * 0 for row in g.flatten(1).double()]
    m = torch.stack(units).mean(0)
    return 1 - sum(float(u @ (m / m.norm())) for u in units) / len(units)


def assert_close_stats(out, ref, dtype):
    norm, cos, sign, mean_dir = out
    rn, rc, rs, rm = ref
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert all(t.dtype == out_dtype for t in out)
    assert norm.shape == rn.shape and mean_dir.shape == rm.shape
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(norm.double(), rn, rtol=tol, atol=tol)
    torch.testing.assert_close(cos.double(), rc, rtol=0, atol=tol, equal_nan=True)
    torch.testing.assert_close(sign.double(), rs, rtol=0, atol=1e-7, equal_nan=True)
    torch.testing.assert_close(mean_dir.double(), rm, rtol=0, atol=tol / 4)


def make(B, D, dtype, layout, seed):
    """Random gradients and previous gradients with exact zeros (elements and whole rows); 'slice'
    has a row stride > D, 'transposed' a column stride > 1, 'contiguous' neither."""
    gen = torch.Generator().manual_seed(seed)
    def one():
        if layout == "slice":
            return torch.randn(B, D + 5, generator=gen)[:, 2:D + 2].to(dtype)
        if layout == "transposed":
            return torch.randn(D, B, generator=gen).to(dtype).t()
        return torch.randn(B, D, generator=gen).to(dtype)
    g, p = one(), one()
    # correlate p with g so cosines are not all near zero, and plant exact zeros in both
    p = (0.7 * g.double() + 0.3 * p.double()).to(dtype) if D > 1 else p
    if D > 3:
        g[:, 0] = 0
        p[:, 0] = 0
        p[:, 1] = 0
    if B > 3:  # a zero gradient now, and one that was zero last step
        g[B // 2] = 0
        p[B // 3] = 0
    return g, p


CASES = [  # (B, D, dtype, layout)
    (1, 1, torch.float32, "contiguous"),
    (3, 7, torch.float64, "contiguous"),
    (5, 5000, torch.float32, "slice"),
    (17, 1023, torch.float32, "transposed"),
    (256, 3072, torch.float32, "contiguous"),
    (300, 513, torch.float64, "slice"),
    (129, 4097, torch.float16, "contiguous"),
    (64, 999, torch.bfloat16, "transposed"),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("B,D,dtype,layout", CASES)
def test_matches_float64_reference(impl, B, D, dtype, layout):
    g, p = make(B, D, dtype, layout, seed=B * 7919 + D)
    assert_close_stats(impl(g, p), ref64(g, p), dtype)
    assert_close_stats(impl(g, None), ref64(g, None), dtype)


@pytest.mark.parametrize("impl", IMPLS)
def test_first_step_is_nan_for_cos_and_sign(impl):
    g = torch.randn(9, 33)
    norm, cos, sign, mean_dir = impl(g, None)
    assert torch.isnan(cos).all() and torch.isnan(sign).all()
    assert torch.isfinite(norm).all() and torch.isfinite(mean_dir).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_rows(impl):
    g = torch.randn(6, 50)
    p = torch.randn(6, 50)
    g[1] = 0          # zero now, nonzero before
    p[2] = 0          # nonzero now, zero before
    g[3] = 0
    p[3] = 0          # zero both times
    norm, cos, sign, mean_dir = impl(g, p)
    assert norm[1] == 0 and norm[3] == 0
    assert cos[1] == 0 and cos[2] == 0 and cos[3] == 0
    assert sign[3] == 1.0          # every element 0 == 0
    assert sign[1] == 0.0 and sign[2] == 0.0  # random rows have no exact zeros
    units = [g[i] / g[i].norm() for i in (0, 2, 4, 5)]
    torch.testing.assert_close(mean_dir, torch.stack(units).sum(0) / 6, rtol=0, atol=1e-6)
    assert_close_stats((norm, cos, sign, mean_dir), ref64(g, p), torch.float32)


@pytest.mark.parametrize("impl", IMPLS)
def test_all_zero_batch_has_dispersion_one(impl):
    out = impl(torch.zeros(4, 8), torch.zeros(4, 8))
    assert (out[3] == 0).all() and (out[1] == 0).all() and (out[2] == 1).all()


@needs_ext
@pytest.mark.parametrize("B,D,dtype", [(256, 3072, torch.float32), (7, 5001, torch.float64),
                                       (33, 100, torch.bfloat16)])
def test_fallback_agrees_with_extension(B, D, dtype):
    g, p = make(B, D, dtype, "contiguous", seed=3)
    for prev in (p, None):
        ext = torch.ops.aerl_fast.grad_stats(g, prev)
        fb = grad_stats_reference(g, prev)
        tol = 1e-13 if dtype == torch.float64 else 1e-6
        for a, b in zip(ext, fb):
            assert a.dtype == b.dtype and a.shape == b.shape
            torch.testing.assert_close(a, b, rtol=tol, atol=tol, equal_nan=True)
        assert torch.equal(ext[2].isnan(), fb[2].isnan())
        if prev is not None:
            assert torch.equal(ext[2], fb[2])  # sign fractions are exact counts / D


def test_flattens_per_sample_gradients():
    g = torch.randn(4, 3, 5, 7)
    p = torch.randn(4, 3, 5, 7)
    a = grad_stats(g, p)
    b = grad_stats(g.reshape(4, -1), p.reshape(4, -1))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, equal_nan=True)
    assert a.mean_dir.shape == (105,)
    g[1] = 0                                      # a zero gradient has no direction: dispersion rises
    for grads in (g, p):
        assert float(grad_stats(grads, None).dispersion) == pytest.approx(dispersion64(grads), abs=1e-6)


def test_requires_grad_input_is_detached():
    x = torch.randn(3, 10, requires_grad=True)
    out = grad_stats(x * 2, None)
    assert not out.norm.requires_grad


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype):
    g = torch.randn(5, 37, dtype=dtype)
    p = torch.randn(5, 37, dtype=dtype)
    torch.library.opcheck(torch.ops.aerl_fast.grad_stats.default, (g, p))
    # First step: cos/sign_agree are NaN by convention, and opcheck's aot_dispatch_dynamic check
    # compares outputs without equal_nan, so it is covered by test_torch_compile_traces_the_op.
    torch.library.opcheck(torch.ops.aerl_fast.grad_stats.default, (g, None),
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor"))


@needs_ext
def test_meta_tensors_give_shapes():
    out = torch.ops.aerl_fast.grad_stats(torch.empty(8, 20, device="meta", dtype=torch.half),
                                         torch.empty(8, 20, device="meta", dtype=torch.half))
    assert [tuple(t.shape) for t in out] == [(8,), (8,), (8,), (20,)]
    assert all(t.dtype == torch.float32 and t.device.type == "meta" for t in out)


@needs_ext
def test_torch_compile_traces_the_op():
    def step(g, p):
        n, c, s, m = torch.ops.aerl_fast.grad_stats(g, p)
        return n.mean(), c.mean(), s.mean(), 1 - m.norm()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True, dynamic=True)
    for B, D in [(16, 40), (9, 77)]:
        g, p = torch.randn(B, D), torch.randn(B, D)
        for prev in (p, None):
            for a, b in zip(compiled(g, prev), step(g, prev)):
                torch.testing.assert_close(a, b, equal_nan=True)


# ------------------------------------------------------------------------------ bad input

ERROR_IMPLS = [
    pytest.param(lambda g, p: torch.ops.aerl_fast.grad_stats(g, p), id="op", marks=needs_ext),
    pytest.param(lambda g, p: grad_stats_reference(g, p), id="fallback"),
]


@pytest.mark.parametrize("impl", ERROR_IMPLS)
@pytest.mark.parametrize("g,p,match", [
    (torch.ones(4, 5, dtype=torch.long), None, "floating-point"),
    (torch.ones(4, 5, dtype=torch.bool), None, "floating-point"),
    (torch.ones(4, 5).to(torch.float8_e4m3fn), None, "floating-point"),
    (torch.ones(4, 5, dtype=torch.complex64), None, "floating-point"),
    (torch.ones(4, 5, 2), None, "2-D"),
    (torch.ones(0, 5), None, "at least one sample"),
    (torch.ones(4, 0), None, "at least one sample"),
    (torch.ones(4, 5), torch.ones(4, 6), "shape"),
    (torch.ones(4, 5), torch.ones(8, 5), "another batch"),
    (torch.ones(4, 5), torch.ones(4, 5, dtype=torch.float64), "dtype"),
    (torch.ones(4, 5), torch.ones(4, 5, device="meta"), "same device"),
])
def test_bad_input_raises_clear_error(impl, g, p, match):
    with pytest.raises(RuntimeError, match=match):
        impl(g, p)


def test_python_entry_rejects_non_tensors_and_scalars():
    with pytest.raises(TypeError):
        grad_stats([[1.0, 2.0]])
    with pytest.raises(RuntimeError, match="0-d"):
        grad_stats(torch.tensor(1.0))


# ------------------------------------------------------------------------------ backend choice

def test_backend_reports_extension_when_built():
    import importlib.util
    built = importlib.util.find_spec("aerl_fast._C") is not None
    forced = os.environ.get("AERL_FAST_GRAD_STATS", "").lower() == "torch"
    assert grad_stats_backend("cpu") == ("extension" if built and not forced else "torch")


def test_forced_fallback_is_announced_once_and_matches_float64():
    code = textwrap.dedent("""
        import json, warnings, torch
        warnings.simplefilter("always")
        from aerl_fast.analysis import grad_stats, grad_stats_backend
        assert grad_stats_backend("cpu") == "torch", grad_stats_backend("cpu")
        g, p = torch.randn(6, 10), torch.randn(6, 10)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            for _ in range(3):
                out = grad_stats(g, p)
            grad_stats(g)
        msgs = [str(w.message) for w in seen if "fallback" in str(w.message)]
        assert len(msgs) == 1, msgs
        assert "AERL_FAST_GRAD_STATS=torch" in msgs[0], msgs[0]
        print("RESULT" + json.dumps({"g": g.tolist(), "p": p.tolist(), "out": [t.tolist() for t in out]}))
    """)
    env = dict(os.environ, AERL_FAST_GRAD_STATS="torch")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1][len("RESULT"):])
    g, p = torch.tensor(got["g"]), torch.tensor(got["p"])
    assert_close_stats(tuple(torch.tensor(t) for t in got["out"]), ref64(g, p), torch.float32)


def test_missing_extension_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(gs_module, "_EXT", None)
    monkeypatch.setattr(gs_module, "_EXT_MISSING", "the C++ extension aerl_fast._C is not built")
    monkeypatch.setattr(gs_module, "_announced", False)
    assert grad_stats_backend("cpu") == "torch"
    g = torch.randn(3, 4)
    with pytest.warns(RuntimeWarning, match="not built"):
        out = grad_stats(g, g)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grad_stats(g, g)  # second call: silent
    assert torch.equal(out.sign_agree, torch.ones(3))


# ------------------------------------------------------------------------------ tracker

def test_tracker_records_and_over_time_dispersion():
    torch.manual_seed(0)
    B, D, T = 12, 40, 5
    base = torch.randn(B, D)
    grads = [base + 0.8 * t * torch.randn(B, D) for t in range(T)]
    grads[2][0] = 0  # a zero row mid-way
    tr = GradStatsTracker(keep_per_sample=True)
    for g in grads:
        tr.update(g.clone())
    assert tr.steps == T
    rec = tr.records()
    prev = None
    dirs = []
    for t, g in enumerate(grads):
        n, c, s, m = ref64(g, prev)
        torch.testing.assert_close(rec["norm"][t].double(), n.mean(), rtol=1e-5, atol=0)
        assert float(rec["dispersion"][t]) == pytest.approx(dispersion64(g), abs=1e-5)
        if t == 0:
            assert math.isnan(rec["cos"][0]) and math.isnan(rec["sign_agree"][0])
        else:
            torch.testing.assert_close(rec["cos"][t].double(), c.mean(), rtol=0, atol=1e-5)
            torch.testing.assert_close(rec["sign_agree"][t].double(), s.mean(), rtol=0, atol=1e-6)
        dirs.append(m / m.norm())
        prev = g
    pair_cos = [float(dirs[i] @ dirs[j]) for i in range(T) for j in range(T) if i < j]
    expected = 1 - sum(pair_cos) / len(pair_cos)
    assert tr.over_time_dispersion().item() == pytest.approx(expected, abs=1e-6)
    summary = tr.summary()
    assert summary["steps"] == T
    assert summary["cos"] == pytest.approx(rec["cos"][1:].double().mean().item(), abs=1e-6)
    assert summary["over_time_dispersion"] == pytest.approx(expected, abs=1e-6)
    per = tr.per_sample()
    assert per["norm"].shape == (T, B) and per["norm"][2, 0] == 0


def test_tracker_first_step_and_reset():
    tr = GradStatsTracker()
    assert math.isnan(tr.over_time_dispersion().item())
    with pytest.raises(RuntimeError, match="no step"):
        tr.records()
    tr.update(torch.randn(4, 6))
    tr.update(torch.randn(4, 6))
    with pytest.raises(RuntimeError, match="another batch"):
        tr.update(torch.randn(8, 6))  # new batch without reset
    assert tr.steps == 2  # the failed update left the state alone
    tr.reset()
    st = tr.update(torch.randn(8, 6))
    assert tr.steps == 1 and torch.isnan(st.cos).all()


def test_tracker_detects_in_place_change_of_previous_gradient():
    grad = torch.randn(4, 6)
    tr = GradStatsTracker()
    tr.update(grad)
    grad.zero_()  # what x.grad.zero_() does between attack steps
    with pytest.raises(RuntimeError, match="copy=True"):
        tr.update(torch.randn(4, 6))
    grad = torch.randn(4, 6)
    kept = grad.clone()
    tr2 = GradStatsTracker(copy=True)
    tr2.update(grad)
    grad.zero_()
    new = torch.randn(4, 6)
    st = tr2.update(new)
    torch.testing.assert_close(st.cos, grad_stats(new, kept).cos)
