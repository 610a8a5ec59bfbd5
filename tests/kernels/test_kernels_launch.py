"""How the fused ops launch: fallbacks that warn and are recorded, the strict mode, the device a
launch runs on, and exploration streams drawn from a CPU generator for another device's logits.

The kernels run under the interpreter on CPU tensors; CUDA's current-device query is mocked."""
import types
import warnings

import pytest
import torch

import aerl_fast.kernels as K
from aerl_fast.kernels import eps_greedy_pg_loss, pgd_step
from aerl_fast.kernels import pg_loss as P
from aerl_fast.kernels import pg_loss_triton as T
from aerl_fast.kernels import pgd_update as PM
from aerl_fast.kernels.device import launch_device
from kernel_refs import pg_loss_f64

pytestmark = pytest.mark.skipif(not P.triton_enabled("cpu"), reason="needs TRITON_INTERPRET=1")


@pytest.fixture(autouse=True)
def fresh_dispatch_state(monkeypatch):
    """Each test starts as a fresh process does: nothing verified, failed or recorded."""
    monkeypatch.setattr(K, "_FAILED", set())
    monkeypatch.setattr(K, "_VERIFIED", set())
    monkeypatch.setattr(K, "_FALLBACKS", [])


def _case(gen, B=6, C=10):
    labels = torch.randint(0, C, (B,), generator=gen)
    logits = torch.randn(B, C, generator=gen)
    actions = torch.where(torch.arange(B) % 2 == 0, labels, (labels + 1) % C)
    return logits, labels, actions


def _raising(exc):
    def launch(*a, **k):
        raise exc
    return launch


def test_a_working_launch_records_nothing_and_warns_nothing(gen):
    logits, labels, actions = _case(gen)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        eps_greedy_pg_loss(logits, labels, 0.1, actions=actions)
        pgd_step(torch.rand(3, 4), torch.rand(3, 4), torch.randn(3, 4), 0.1, 0.2)
    assert K.fallbacks() == []
    assert K.backend("cpu") == "triton"


def test_a_failed_first_launch_warns_once_is_recorded_and_falls_back(monkeypatch, gen):
    monkeypatch.setattr(P, "_pg_fwd_triton", _raising(RuntimeError("no driver\nsecond line")))
    logits, labels, actions = _case(gen)
    with pytest.warns(RuntimeWarning, match=r"eps_greedy_pg_loss failed on cpu \(RuntimeError: "
                                            r"no driver\).*from now on"):
        out = eps_greedy_pg_loss(logits, labels, 0.1, actions=actions)
    ref_loss, _ = pg_loss_f64(logits, labels, actions)
    torch.testing.assert_close(out.loss.double(), ref_loss, atol=2e-5, rtol=2e-5)
    assert K.fallbacks() == [{"op": "eps_greedy_pg_loss", "device": "cpu",
                              "error": "RuntimeError: no driver", "scope": "device"}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once: the second call is silent
        eps_greedy_pg_loss(logits, labels, 0.1, actions=actions)
    assert len(K.fallbacks()) == 1
    assert K.backend("cpu", "eps_greedy_pg_loss") == "reference"
    assert K.backend("cpu", "pgd_step") == "triton"  # the other op is untouched


def test_fallbacks_returns_copies(monkeypatch, gen):
    monkeypatch.setattr(PM, "_pgd_triton", _raising(RuntimeError("bad")))
    with pytest.warns(RuntimeWarning, match="pgd_step failed on cpu"):
        pgd_step(torch.rand(3, 4), torch.rand(3, 4), torch.randn(3, 4), 0.1, 0.2)
    K.fallbacks()[0]["op"] = "edited"
    assert K.fallbacks()[0]["op"] == "pgd_step"


@pytest.mark.parametrize("op", ["pg_loss", "pgd"])
def test_strict_mode_raises_instead_of_falling_back(monkeypatch, gen, op):
    monkeypatch.setenv("AERL_FAST_KERNELS", "triton")
    monkeypatch.setattr(P, "_pg_fwd_triton", _raising(RuntimeError("no driver")))
    monkeypatch.setattr(PM, "_pgd_triton", _raising(RuntimeError("no driver")))
    logits, labels, actions = _case(gen)
    with pytest.raises(RuntimeError, match="no driver"):
        if op == "pg_loss":
            eps_greedy_pg_loss(logits, labels, 0.1, actions=actions)
        else:
            pgd_step(torch.rand(3, 4), torch.rand(3, 4), torch.randn(3, 4), 0.1, 0.2)
    assert K.fallbacks() == []


def test_strict_mode_refuses_a_device_triton_cannot_serve(monkeypatch, gen):
    monkeypatch.setenv("AERL_FAST_KERNELS", "triton")
    monkeypatch.setattr(P, "triton_enabled", lambda device: False)
    monkeypatch.setitem(K._ENABLED, "eps_greedy_pg_loss", P.triton_enabled)
    logits, labels, _ = _case(gen)
    with pytest.raises(RuntimeError, match="AERL_FAST_KERNELS=triton: the Triton eps_greedy_pg_loss "
                                           "cannot run on cpu tensors"):
        eps_greedy_pg_loss(logits, labels, 0.1)
    assert K.backend("cpu", "eps_greedy_pg_loss") == "reference"  # a query, not an error


def test_out_of_memory_is_raised_not_hidden(monkeypatch, gen):
    monkeypatch.setattr(P, "_pg_fwd_triton", _raising(torch.cuda.OutOfMemoryError("CUDA out of memory")))
    logits, labels, actions = _case(gen)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        eps_greedy_pg_loss(logits, labels, 0.1, actions=actions)
    assert K.fallbacks() == [] and K.backend("cpu") == "triton"


def test_out_of_resources_falls_back_for_that_call_only(monkeypatch, gen):
    real = P._pg_fwd_triton
    monkeypatch.setattr(P, "_pg_fwd_triton", _raising(K.OutOfResources(98304, 65536, "shared memory")))
    logits, labels, actions = _case(gen)
    with pytest.warns(RuntimeWarning, match="OutOfResources.*for this call"):
        out = eps_greedy_pg_loss(logits, labels, 0.1, actions=actions)
    torch.testing.assert_close(out.loss.double(), pg_loss_f64(logits, labels, actions)[0],
                               atol=2e-5, rtol=2e-5)
    assert [f["scope"] for f in K.fallbacks()] == ["call"]
    assert K.backend("cpu", "eps_greedy_pg_loss") == "triton"  # not disabled for the device
    calls = []
    monkeypatch.setattr(P, "_pg_fwd_triton", lambda *a: calls.append(1) or real(*a))
    eps_greedy_pg_loss(logits, labels, 0.1, actions=actions)
    assert calls == [1]


def test_an_unknown_mode_is_a_clear_error(monkeypatch, gen):
    monkeypatch.setenv("AERL_FAST_KERNELS", "tritn")
    logits, labels, _ = _case(gen)
    with pytest.raises(ValueError, match="AERL_FAST_KERNELS must be one of auto, triton, reference, "
                                         "got 'tritn'"):
        eps_greedy_pg_loss(logits, labels, 0.1)


# ── the device a launch runs on ───────────────────────────────────────────────────────────────
class FakeCurrentDevice:
    """torch.cuda's current-device state, mocked: what `torch.cuda.device` exchanges."""

    def __init__(self, monkeypatch, current=0):
        self.current, self.changes = current, []
        monkeypatch.setattr(torch.cuda, "_exchange_device", self.exchange)
        monkeypatch.setattr(torch.cuda, "_maybe_exchange_device", self.exchange)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.current)

    def exchange(self, idx):
        prev = self.current
        if idx >= 0:
            self.current = idx
            self.changes.append(idx)
        return prev


def test_launch_device_makes_the_tensors_gpu_current(monkeypatch):
    cuda = FakeCurrentDevice(monkeypatch, current=0)
    on_gpu1 = types.SimpleNamespace(device=torch.device("cuda", 1))
    with launch_device(on_gpu1):
        assert torch.cuda.current_device() == 1
    assert torch.cuda.current_device() == 0 and cuda.changes == [1, 0]
    with launch_device(torch.zeros(1)):  # CPU tensors (the interpreter): CUDA is not touched
        assert torch.cuda.current_device() == 0
    assert cuda.changes == [1, 0]


class GuardedKernel:
    """Stands in for a @triton.jit kernel: records whether it was launched inside launch_device
    for the tensor it was given, then launches the real kernel."""

    def __init__(self, kernel, active, launches):
        self.kernel, self.active, self.launches = kernel, active, launches

    def __getitem__(self, grid):
        def launch(first, *args, **kwargs):
            self.launches.append(list(self.active))
            return self.kernel[grid](first, *args, **kwargs)
        return launch


def test_every_launch_helper_launches_under_its_tensors_device(monkeypatch, gen):
    active, launches = [], []

    class Recording:
        def __init__(self, t):
            self.device = t.device

        def __enter__(self):
            active.append(self.device)

        def __exit__(self, *exc):
            active.pop()

    for mod in (T, PM):
        monkeypatch.setattr(mod, "launch_device", Recording)
    for mod, name in ((T, "_pg_fwd_kernel"), (T, "_pg_bwd_kernel"), (PM, "_pgd_linf_kernel"),
                      (PM, "_pgd_l2_kernel")):
        monkeypatch.setattr(mod, name, GuardedKernel(getattr(mod, name), active, launches))
    logits, labels, actions = _case(gen)
    x = logits.clone().requires_grad_(True)
    eps_greedy_pg_loss(x, labels, 0.1, seed=3).loss.backward()
    for norm in ("linf", "l2"):
        pgd_step(torch.rand(3, 4), torch.rand(3, 4), torch.randn(3, 4), 0.1, 0.2, norm=norm)
    assert launches == [[torch.device("cpu")]] * 4  # fwd, bwd, L∞, L2: each inside its guard


# ── exploration draws from a CPU generator, for logits on another device ─────────────────────
def _expected_draw(seed):
    return int(torch.randint(0, 2 ** 62, (1,), generator=torch.Generator().manual_seed(seed)))


def test_kernel_seed_from_a_cpu_generator_is_one_host_draw_filled_on_the_device(monkeypatch):
    fills = []
    real_full = torch.full
    monkeypatch.setattr(torch, "full", lambda size, value, **kw: fills.append((value, kw["device"]))
                        or real_full(size, value, **kw))
    g = torch.Generator().manual_seed(11)
    seed_t = P.kernel_seed(torch.device("meta"), generator=g)  # meta: no RNG, no data at all
    assert seed_t.device.type == "meta" and seed_t.shape == (1,)
    assert fills == [(_expected_draw(11), torch.device("meta"))]
    after_one = torch.Generator().manual_seed(11)
    P.host_draw(after_one)
    assert torch.equal(g.get_state(), after_one.get_state())  # exactly one draw taken
    # on the CPU the key is the same number: the stream does not depend on the device
    assert int(P.kernel_seed(torch.device("cpu"), generator=torch.Generator().manual_seed(11))) \
        == _expected_draw(11)


def test_reference_sampler_seeds_a_device_generator_from_a_cpu_one(monkeypatch):
    made = []

    class FakeDeviceGenerator:
        def __init__(self, device):
            self.device = torch.device(device)

        def manual_seed(self, s):
            made.append((self.device, s))
            return self

    g = torch.Generator().manual_seed(4)  # the real class, before the fake replaces it
    want = _expected_draw(4)
    monkeypatch.setattr(torch, "Generator", FakeDeviceGenerator)
    out = P.make_generator(torch.device("cuda"), generator=g)
    assert isinstance(out, FakeDeviceGenerator)
    assert made == [(torch.device("cuda"), want)]
    assert P.make_generator(torch.device("cpu"), generator=g) is g  # same device: used as is
