"""The attacks' input guards: images in the wrong units (0-255, normalised) are refused with the
fix named, never with clamp=False as the advice; norm names as AutoAttack and torchattacks spell
them.  Each guard gets an input that must trigger it and one that must not."""
import pytest
import torch

from aerl_fast.attacks import AttackError, autoattack, pgd
from eval_fixtures import cpu_eval_env, tiny_models, tiny_runs  # noqa: F401 - fixtures

pytestmark = pytest.mark.usefixtures("cpu_eval_env")
SETTINGS = {"linf": dict(eps=4 / 255, step=1 / 255), "l2": dict(eps=0.25, step=0.05)}


@pytest.fixture(scope="module")
def sl(tiny_models):  # noqa: F811
    return tiny_models["sl"]


@pytest.fixture(scope="module")
def data(tiny_runs):  # noqa: F811
    return tiny_runs.x[:16].clone(), tiny_runs.y[:16].clone()


@pytest.mark.parametrize("clamp", [True, False])
def test_input_range_guard_names_the_fix(sl, data, clamp):
    x, y = data
    x4, y4 = x[:4].clone(), y[:4]
    kw = dict(eps=0.1, step=0.05, steps=1, clamp=clamp, seed=0)
    with pytest.raises(AttackError, match="divide them by 255") as err:
        pgd(sl, x4 * 255, y4, **kw)
    assert "clamp=False" not in str(err.value)
    with pytest.raises(AttackError, match=r"aerl_fast\.models\.Normalize") as err:
        pgd(sl, (x4 - 0.5) / 0.25, y4, **kw)
    assert "clamp=False" not in str(err.value)
    x4[0].zero_()
    x4[1].fill_(1.0)  # the range's very ends are fine
    pgd(sl, x4, y4, **kw)
    over = x4.clone()
    over[2, 0, 0, 0] = 1.2
    if clamp:
        with pytest.raises(AttackError, match="outside the clamp box"):
            pgd(sl, over, y4, **kw)
    else:  # no box: 1.2 is no unit mistake
        pgd(sl, over, y4, **kw)


def test_custom_box_states_the_range(sl, data):
    x, y = data
    pgd(sl, x[:4] * 255, y[:4], eps=2.0, step=1.0, steps=1, clamp=(0, 255), seed=0)
    with pytest.raises(AttackError, match="outside the clamp box"):
        pgd(sl, x[:4] * 255 + 1, y[:4], eps=2.0, step=1.0, steps=1, clamp=(0, 255), seed=0)


@pytest.mark.parametrize("spelled, norm", [("Linf", "linf"), ("L2", "l2"), ("LINF", "linf")])
def test_norm_names_as_autoattack_spells_them(sl, data, spelled, norm):
    x, y = data
    s = SETTINGS[norm]
    a = pgd(sl, x[:8], y[:8], norm=spelled, steps=2, seed=0, **s)
    b = pgd(sl, x[:8], y[:8], norm=norm, steps=2, seed=0, **s)
    assert torch.equal(a, b)
    with pytest.raises(AttackError, match="unknown norm 'L1'"):
        pgd(sl, x[:8], y[:8], norm="L1", steps=1, **s)


def test_autoattack_refuses_0_255_images(sl, data):
    x, y = data
    with pytest.raises(AttackError, match="divide them by 255"):
        autoattack(sl, x[:4] * 255, y[:4], eps=0.5, norm="L2")
