"""pytest-benchmark: the data loader and the training step, each against the study's way in the same run.

    python -m pytest bench/bench_training.py --benchmark-only -s

The loader comparison (the study's per-image PIL pipeline, defined here as `study_pil_loader`,
against the tensor and DALI loaders) runs in bench/bench_speed.py.

Groups (the first case of each group is its baseline; every case prints its ratio to it):
- step <model>: one optimizer step (batch 128; 32 for the full-width cnn6): the study's RL update (softmax + 1e-6,
  per-batch python exploration coin, multinomial, isnan check with .item()) and its RL-adv update
  (four forwards, two backwards), against aerl_fast's SL, RL and RL-adv steps (RL-adv: two forwards,
  two backwards).  Target: RL ≥ 1.0× and RL-adv ≥ 1.6× the study's; our RL-adv ≤ 2.2× our SL.
  Our steps run as the Trainer runs them: a channels_last model where `runtime.prefers_channels_last`
  says so (the CPU too), the batch laid out as `runtime.channels_last_batches` says (NCHW on the
  CPU); the study's code runs NCHW throughout.
"""
import os
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from aerl_fast import runtime
from aerl_fast.models import build_model
from aerl_fast.objectives import ObjectiveConfig, train_step
from baselines import baseline_of, record, set_baseline


SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _images():
    folder = SHARED / "cifar-10-batches-py"
    if (folder / "data_batch_1").exists():
        from aerl_fast.data.cifar import load_cifar
        s = load_cifar("cifar10", folder, "test" if os.environ.get("BENCH_SMALL") else "train")
        return s.images, s.labels
    from aerl_fast.data.shapes import generate_shapes
    s = generate_shapes(10000)
    return s.images, s.labels


# ----------------------------------------------------------------------------------------- loader

def study_pil_loader(images, labels, batch_size=128):
    """The study's input pipeline: per-image PIL transforms in a torch DataLoader (one process)."""
    from PIL import Image
    from torchvision import transforms
    tf = transforms.Compose([transforms.RandomHorizontalFlip(), transforms.RandomVerticalFlip(),
                             transforms.RandomAffine(0, translate=(0.1, 0.1)), transforms.ToTensor()])

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(labels)

        def __getitem__(self, i):
            return tf(Image.fromarray(images[i])), int(labels[i])
    return torch.utils.data.DataLoader(DS(), batch_size=batch_size, shuffle=True, num_workers=0)


# ------------------------------------------------------------------------------------------- steps

def study_rl_update(model, opt, x, y, eps=0.1, adv=False, adv_eps=0.01, beta=1.0):
    """The study's agent update, as its code does it (python exploration coin per batch,
    softmax + 1e-6 renormalised, isnan check with a host sync: one forward, one backward; RL-adv:
    a forward/backward for the FGSM gradient, clean and adversarial forwards again, and a no-grad
    forward for its accuracy — four forwards, two backwards, as counted on our CPU machines)."""
    def pg_loss(logits):
        probs = F.softmax(logits, dim=1) + 1e-6
        probs = probs / probs.sum(1, keepdim=True)
        if random.random() < eps:
            actions = torch.randint(0, logits.shape[1], (logits.shape[0],))
        else:
            actions = torch.multinomial(probs, 1).squeeze(1)
        rewards = (actions == y).float()
        return -(rewards * torch.log(probs.gather(1, actions[:, None]).squeeze(1) + 1e-6)).mean()

    if adv:
        xg = x.clone().requires_grad_(True)
        gx, = torch.autograd.grad(pg_loss(model(xg)), xg)          # forward 1, backward 1
        x_adv = (x + adv_eps * gx.sign()).clamp(0, 1)
        loss = pg_loss(model(x)) + beta * pg_loss(model(x_adv))     # forwards 2 and 3
    else:
        loss = pg_loss(model(x))
    if torch.isnan(loss).item():
        return
    opt.zero_grad()
    loss.backward()                                                  # backward 2
    opt.step()
    if adv:
        with torch.no_grad():
            (model(x).argmax(1) == y).float().mean().item()         # forward 4: the study's accuracy


def _ours(kind):
    cfg = ObjectiveConfig(kind)
    gen = torch.Generator()

    def update(model, opt, x, y):
        opt.zero_grad(set_to_none=True)
        train_step(model, x, y, cfg, adv_active=True, generator=gen)
        opt.step()
    return update


CASES = [("study rl", lambda m, o, x, y: study_rl_update(m, o, x, y), True),
         ("ours sl", _ours("sl"), False),
         ("ours rl", _ours("rl"), False),
         ("study rl-adv", lambda m, o, x, y: study_rl_update(m, o, x, y, adv=True), False),
         ("ours rl-adv", _ours("rl-adv"), False)]
# (model, width, batch, rounds): the study's 6-layer CNN at full width is ~16x the FLOPs of w0.25,
# so it runs a smaller batch and fewer rounds to keep the suite in minutes on a CPU
MODELS = [("alicnn", 1.0, 128, 5), ("cnn6", 0.25, 128, 5), ("cnn6", 1.0, 32, 3)]


@pytest.mark.parametrize("model_name, width, batch, rounds", MODELS, ids=[f"{m}-w{w}" for m, w, _, _ in MODELS])
@pytest.mark.parametrize("case", range(len(CASES)), ids=[c[0].replace(" ", "_") for c in CASES])
def test_step(benchmark, model_name, width, batch, rounds, case):
    name, update, baseline = CASES[case]
    torch.manual_seed(0)
    model = build_model(model_name, 10, width=width).train()
    x = torch.rand(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    if name.startswith("ours") and runtime.prefers_channels_last(x.device):  # as the Trainer does
        model = model.to(memory_format=torch.channels_last)
    if name.startswith("ours") and runtime.channels_last_batches(x.device):
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    update(model, opt, x, y)  # warm-up
    benchmark.pedantic(lambda: update(model, opt, x, y), rounds=rounds, iterations=1, warmup_rounds=1)
    group = f"step {model_name} w{width} b{batch}"
    record(benchmark, group, name, benchmark.stats.stats.median, "step", baseline=baseline)
    if name == "ours rl-adv":  # also against the study's RL-adv update, run earlier in the group
        base = baseline_of(group + " rl-adv")
        if base:
            benchmark.extra_info["speedup_vs_study_rl_adv"] = round(base / benchmark.stats.stats.median, 3)
            print(f"[{group}] ours rl-adv vs study rl-adv: {base / benchmark.stats.stats.median:.2f}x")
    elif name == "study rl-adv":
        set_baseline(group + " rl-adv", benchmark.stats.stats.median)
