"""What the Trainer does at each optimizer step, watched from outside during two tiny runs: the
adversarial term is absent in epoch adv_start_epoch − 1 and present from adv_start_epoch on (0-based,
as --adv-start-epoch is), the gradient the optimizer steps with has norm min(‖g‖, --grad-clip), and
the learning rate follows the schedule to its final fraction."""
import importlib
import json
import math

import pytest
import torch

from aerl_fast.config import RunOptions, TrainConfig
from aerl_fast.train import Trainer

trainer_module = importlib.import_module("aerl_fast.train.trainer")
TINY = dict(dataset="shapes", model="alicnn", width=0.125, train_subset=160, batch_size=48, epochs=3)
CLIP = 1e-3   # far below any gradient norm of a fresh network: every step is clipped


def _watch(cfg, tmp_path):
    """Train `cfg`; returns (per step: epoch, adversarial term present, gradient norm at the
    optimizer step, learning rate of that step), the log lines and the steps per epoch."""
    steps = []
    original = trainer_module.train_step
    with pytest.MonkeyPatch.context() as mp:
        tr = Trainer(cfg, RunOptions(out=str(tmp_path), progress=False, device="cpu"), tmp_path, log=lambda m: None)

        def step(*a, **k):
            out = original(*a, **k)
            steps.append([tr.epoch, out.loss_adv is not None])
            return out

        def at_optimizer_step(opt, args, kwargs):
            grads = [p.grad.double().flatten() for p in tr.model.parameters() if p.grad is not None]
            steps[-1] += [float(torch.cat(grads).norm()), opt.param_groups[0]["lr"]]

        mp.setattr(trainer_module, "train_step", step)
        tr.optimizer.register_step_pre_hook(at_optimizer_step)
        tr.run()
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    return steps, log, len(tr.loader)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread while these runs train (restored after: later tests' digests depend on it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def adversarial_run(tmp_path_factory):
    cfg = TrainConfig(**TINY, objective="sl-adv", adv_start_epoch=2, grad_clip=CLIP, lr=2e-3,
                      schedule="warmup-linear", warmup_epochs=1, final_lr_frac=0.1).validate()
    return _watch(cfg, tmp_path_factory.mktemp("adv"))


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    cfg = TrainConfig(**TINY, objective="sl", adv_start_epoch=0, grad_clip=0.0, lr=2e-3).validate()
    return _watch(cfg, tmp_path_factory.mktemp("plain"))


def test_the_adversarial_term_starts_at_adv_start_epoch(adversarial_run):
    steps, log, spe = adversarial_run
    assert spe >= 2 and len(steps) == 3 * spe
    assert [adv for epoch, adv, *_ in steps] == [epoch >= 2 for epoch, *_ in steps]
    assert [line["adv_active"] for line in log] == [False, False, True]
    assert ["train_loss_adv" in line for line in log] == [False, False, True]
    assert log[2]["train_loss_adv"] > 0


def test_a_plain_objective_never_gets_the_adversarial_term(plain_run):
    steps, log, _ = plain_run
    assert not any(adv for _, adv, *_ in steps)
    assert not any(line["adv_active"] or "train_loss_adv" in line for line in log)


def test_the_optimizer_steps_with_the_clipped_gradient(adversarial_run, plain_run):
    clipped = [norm for *_, norm, _ in adversarial_run[0]]
    assert clipped == pytest.approx([CLIP] * len(clipped), rel=1e-4)
    unclipped = [norm for *_, norm, _ in plain_run[0]]
    assert min(unclipped) > 100 * CLIP             # without --grad-clip the gradient is left alone


def test_the_learning_rate_warms_up_decays_and_ends_at_the_final_fraction(adversarial_run, plain_run):
    steps, log, spe = adversarial_run
    total = 3 * spe
    rates = [lr for *_, lr in steps]
    expected = [(s + 1) / spe if s < spe else 1 - 0.9 * (s - spe) / (total - spe) for s in range(total)]
    assert rates == pytest.approx([2e-3 * f for f in expected], rel=1e-9)
    # each epoch's log line shows the rate after its last step: the last one the final fraction
    assert [line["lr"] for line in log] == pytest.approx([2e-3, 2e-3 * (1 - 0.9 / 2), 2e-3 * 0.1], rel=1e-9)
    assert all(lr == 2e-3 for *_, lr in plain_run[0]) and [line["lr"] for line in plain_run[1]] == [2e-3] * 3
    assert all(math.isfinite(line["train_loss"]) for line in log)
