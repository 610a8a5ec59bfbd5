"""The fused PGD update against an independent float64 loop (`kernel_refs.pgd_f64`) and the torch
reference, through the Triton interpreter on CPU (see conftest.py)."""
import pytest
import torch

import aerl_fast.kernels as K
from aerl_fast.kernels import pgd_step
from aerl_fast.kernels import pgd_update as PM
from aerl_fast.kernels.pgd_update import (_pgd_triton, pgd_step_op, pgd_step_reference,
                                          triton_enabled)
from kernel_refs import pgd_f64

pytestmark = pytest.mark.skipif(
    not triton_enabled("cpu"),
    reason="Triton not runnable on CPU here: triton missing, or triton was imported before "
           "TRITON_INTERPRET=1 was set (run `TRITON_INTERPRET=1 pytest tests/kernels`)")

SHAPE = (6, 3, 5, 7)  # N = 105: not a power of two, one partial tile


def ball_points(gen, shape, eps, where):
    """x0 in (0.2, 0.8) (so the box clamp is not what the test measures) and x_adv with
    ‖x_adv − x0‖ = eps ('on'), 2·eps ('outside') or eps/2 ('inside'), per sample."""
    B = shape[0]
    x0 = 0.2 + 0.6 * torch.rand(shape, generator=gen)
    d = torch.randn(shape, generator=gen)
    eps_v = eps.view(B, *([1] * (len(shape) - 1)))
    scale = {"on": 1.0, "outside": 2.0, "inside": 0.5}[where]
    return x0, d, eps_v, scale


def make_case(gen, norm, where, shape=SHAPE):
    B = shape[0]
    eps = torch.tensor([0.0, 0.01, 0.05, 0.1, 0.3, 1.0])[:B]
    x0, d, eps_v, scale = ball_points(gen, shape, eps, where)
    if norm == "l2":
        unit = d / d.flatten(1).norm(dim=1).view_as(eps_v)
    else:
        unit = d.sign() * torch.rand(shape, generator=gen)  # ‖·‖∞ < 1 …
        unit.view(B, -1)[:, 0] = 1.0                        # … = 1 exactly
    x_adv = x0 + scale * eps_v * unit
    grad = torch.randn(shape, generator=gen)
    grad[1] = 0.0  # a zero gradient: zero step, no division by zero
    return x_adv, x0, grad, eps


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("where", ["inside", "on", "outside"])
@pytest.mark.parametrize("step", [0.0, 0.02, "per-sample"])
def test_matches_f64_and_reference(gen, norm, where, step):
    x_adv, x0, grad, eps = make_case(gen, norm, where)
    if step == "per-sample":
        step = torch.linspace(0.0, 0.2, x0.shape[0])
    expected = pgd_f64(x_adv, x0, grad, step, eps, norm)
    ref = pgd_step_reference(x_adv.clone(), x0, grad, step, eps, norm=norm)
    out = x_adv.clone()
    ret = pgd_step(out, x0, grad, step, eps, norm=norm)
    assert ret is out  # in place
    torch.testing.assert_close(out.double(), expected, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(ref.double(), expected, atol=2e-6, rtol=1e-5)
    # the result lies in the ball (up to fp32 rounding)
    d = (out.double() - x0.double()).flatten(1)
    n = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    assert bool((n <= eps.double() * (1 + 1e-5) + 1e-6).all())


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_box_clamp_and_no_clamp(gen, norm):
    x0 = torch.rand(SHAPE, generator=gen)  # near 0 and 1: the box is active
    grad = torch.randn(SHAPE, generator=gen)
    for clamp in [(0.0, 1.0), (0.1, 0.9), None]:
        x_adv = x0.clone()
        pgd_step(x_adv, x0, grad, 0.3, 0.5, norm=norm, clamp=clamp)
        torch.testing.assert_close(x_adv.double(), pgd_f64(x0, x0, grad, 0.3, 0.5, norm, clamp),
                                   atol=2e-6, rtol=1e-5)
    assert float(x_adv.max()) > 1.0 or float(x_adv.min()) < 0.0  # clamp=None really skipped


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_layouts_and_dtypes(gen, norm):
    """channels_last (updated in its own memory), a non-contiguous x_adv (copied back), fp16."""
    x_adv, x0, grad, eps = make_case(gen, norm, "on")
    expected = pgd_f64(x_adv, x0, grad, 0.05, eps, norm)
    cl = [t.to(memory_format=torch.channels_last) for t in (x_adv, x0, grad)]
    ptr = cl[0].data_ptr()
    pgd_step(*cl, 0.05, eps, norm=norm)
    assert cl[0].data_ptr() == ptr and cl[0].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(cl[0].double(), expected, atol=2e-6, rtol=1e-5)

    xt = x_adv.transpose(2, 3).contiguous().transpose(2, 3)  # same values, odd strides
    assert not xt.is_contiguous()
    pgd_step(xt, x0, grad, 0.05, eps, norm=norm)
    torch.testing.assert_close(xt.double(), expected, atol=2e-6, rtol=1e-5)

    xh = x_adv.half()
    pgd_step(xh, x0.half(), grad.half(), 0.05, eps, norm=norm)
    assert xh.dtype == torch.float16
    torch.testing.assert_close(xh.double(), pgd_f64(x_adv.half(), x0.half(), grad.half(), 0.05,
                                                   eps, norm), atol=2e-3, rtol=2e-3)


def test_robustness_curve_as_one_batch(gen):
    """The same image at several ε in one call equals separate calls at each ε."""
    x0 = torch.rand(1, 3, 4, 4, generator=gen).expand(4, 3, 4, 4).contiguous()
    grad = torch.randn(1, 3, 4, 4, generator=gen).expand(4, 3, 4, 4).contiguous()
    eps = torch.tensor([0.01, 0.03, 0.1, 0.3])
    batch = x0.clone()
    for _ in range(3):
        pgd_step(batch, x0, grad, eps / 4, eps, norm="l2")
    for i, e in enumerate(eps.tolist()):
        single = x0[i:i + 1].clone()
        for _ in range(3):
            pgd_step(single, x0[i:i + 1], grad[i:i + 1], e / 4, e, norm="l2")
        torch.testing.assert_close(batch[i:i + 1], single)


def test_many_tiles_l2(gen):
    """N larger than one tile (4096): the per-sample sums cross tiles."""
    shape = (2, 3, 40, 40)  # N = 4800
    x0 = torch.rand(shape, generator=gen)
    x_adv = x0 + 0.05 * torch.randn(shape, generator=gen)  # ‖δ₀‖ ≈ 3.5: outside both balls
    grad = torch.randn(shape, generator=gen)
    eps = torch.tensor([0.5, 1.0])
    out = x_adv.clone()
    pgd_step(out, x0, grad, 0.5, eps, norm="l2", clamp=None)
    torch.testing.assert_close(out.double(), pgd_f64(x_adv, x0, grad, 0.5, eps, "l2", None),
                               atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("args,exc,match", [
    (dict(step=-0.1), ValueError, "step must be >= 0"),
    (dict(eps=torch.tensor([0.1, -0.1, 0.1])), ValueError, "eps must be >= 0"),
    (dict(eps=torch.tensor([0.1, 0.1])), ValueError, r"eps must be a float or a \[3\] tensor"),
    (dict(x0=torch.rand(3, 5)), ValueError, "shape mismatch"),
    (dict(grad=torch.ones(3, 4, dtype=torch.long)), TypeError, "grad must be a float tensor"),
    (dict(x_adv=torch.rand(0, 4), x0=torch.rand(0, 4), grad=torch.rand(0, 4)), ValueError,
     "empty batch"),
    (dict(norm="l1"), ValueError, "norm must be one of"),
    (dict(clamp=(1.0, 0.0)), ValueError, "clamp must be"),
])
def test_bad_inputs_raise_before_launch(monkeypatch, args, exc, match):
    def boom(*a, **k):
        raise AssertionError("a kernel was launched before the input check")
    monkeypatch.setattr(PM, "_pgd_triton", boom)
    kw = dict(x_adv=torch.rand(3, 4), x0=torch.rand(3, 4), grad=torch.rand(3, 4), step=0.1,
              eps=0.1, norm="linf", clamp=(0.0, 1.0))
    kw.update(args)
    with pytest.raises(exc, match=match):
        pgd_step(**kw)


def test_opcheck(gen):
    x_adv, x0, grad, eps = make_case(gen, "l2", "on")
    step = torch.full((x0.shape[0],), 0.05)
    for l2 in (False, True):
        torch.library.opcheck(pgd_step_op, (x_adv.clone(), x0, grad, step, eps, l2, 0.0, 1.0))
    torch.library.opcheck(pgd_step_op, (x_adv.clone(), x0, grad, step, eps, True, None, None))


def test_torch_compile_traces_the_op(gen):
    x_adv, x0, grad, eps = make_case(gen, "linf", "on")

    def attack_step(xa):
        return pgd_step(xa, x0, grad, 0.01, eps, norm="linf")

    compiled = torch.compile(attack_step, backend="aot_eager", fullgraph=True)
    a, b = x_adv.clone(), x_adv.clone()
    attack_step(a)
    compiled(b)
    torch.testing.assert_close(a, b)


def test_backend_and_triton_path_used(monkeypatch, gen):
    assert triton_enabled("cpu") and K.backend("cpu", "pgd_step") == "triton"
    calls = []
    monkeypatch.setattr(PM, "_pgd_triton",
                        lambda *a: calls.append(1) or _pgd_triton(*a))
    x_adv, x0, grad, eps = make_case(gen, "linf", "on")
    pgd_step(x_adv, x0, grad, 0.01, eps)
    assert calls == [1]


def test_validate_false_skips_only_the_value_read(monkeypatch):
    """validate=False: tensor step/ε are not read (no host sync on CUDA) — shapes are still checked,
    and the update equals the validated one."""
    gen = torch.Generator().manual_seed(11)
    x0, grad = torch.rand(5, 7, generator=gen), torch.randn(5, 7, generator=gen)
    eps = torch.rand(5, generator=gen) * 0.2
    want = pgd_step(x0.clone(), x0, grad, eps / 3, eps, norm="l2")
    got = pgd_step(x0.clone(), x0, grad, eps / 3, eps, norm="l2", validate=False)
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match=r"eps must be a float or a \[5\] tensor"):
        pgd_step(x0.clone(), x0, grad, 0.1, eps[:4], validate=False)
    reads = []
    real_any = torch.Tensor.any
    monkeypatch.setattr(torch.Tensor, "any", lambda self, *a, **k: reads.append(1) or real_any(self, *a, **k))
    pgd_step(x0.clone(), x0, grad, eps / 3, eps, validate=False)
    assert not reads
    pgd_step(x0.clone(), x0, grad, eps / 3, eps)
    assert reads  # the default reads the values, once per tensor


def _tensors_from_python_numbers(monkeypatch):
    """Record every torch.tensor / as_tensor / scalar_tensor call made from Python data: on CUDA
    each is a host-to-device copy and a host sync."""
    made = []
    for name in ("tensor", "as_tensor", "scalar_tensor"):
        real = getattr(torch, name)

        def wrapped(data, *a, _real=real, _name=name, **k):
            if not isinstance(data, torch.Tensor):
                made.append((_name, data))
            return _real(data, *a, **k)
        monkeypatch.setattr(torch, name, wrapped)
    return made


@pytest.mark.parametrize("mode", ["triton", "reference"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_float_step_and_eps_are_filled_on_the_device_not_copied(monkeypatch, gen, mode, norm):
    monkeypatch.setenv("AERL_FAST_KERNELS", mode)
    x0 = torch.rand(4, 3, 5, 5, generator=gen)
    grad = torch.randn(x0.shape, generator=gen)
    want = x0.clone()
    for _ in range(3):
        want = pgd_f64(want, x0, grad, 0.01, 0.03, norm).float()
    xa = x0.clone()
    made = _tensors_from_python_numbers(monkeypatch)
    for _ in range(3):
        pgd_step(xa, x0, grad, 0.01, 0.03, norm=norm)
    assert made == []
    torch.testing.assert_close(xa, want, atol=2e-6, rtol=1e-5)


def test_an_attack_creates_no_tensor_from_python_numbers_per_step(monkeypatch, gen):
    """The whole PGD loop (aerl_fast.attacks.pgd, float ε and step): whatever setup creates, the
    count does not grow with the number of steps."""
    from aerl_fast.attacks import pgd
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 5))
    x = torch.rand(6, 3, 4, 4, generator=gen)
    y = torch.randint(0, 5, (6,), generator=gen)
    counts = []
    for steps in (1, 4):
        made = _tensors_from_python_numbers(monkeypatch)
        pgd(model, x, y, eps=0.5, step=0.1, steps=steps, norm="l2", seed=0)
        counts.append(len(made))
        monkeypatch.undo()
    assert counts[0] == counts[1], counts
