"""FAB-T (Croce & Hein, ICML 2020), the one stage of AutoAttack standard that autoattack_fast leaves
out by default, run through pyautoattack's implementation when it is installed.

FAB-T rarely changes AutoAttack's result: it is a minimum-norm attack, and by the time it runs
APGD-T has already tried the same 9 target classes.  `stages=("apgd-ce", "apgd-t", "fab-t",
"square")` adds it with AutoAttack's settings (targeted, 9 targets, 100 iterations, 1 restart).
Its random draws are pyautoattack's (torch's global generator, re-seeded per call and restored
afterwards), so this stage alone does not give batch-independent results.  Passes are counted by
a wrapper around the model; FAB does not report which rows each pass served, so the per-sample
counts of this stage are the stage's total spread evenly over the points it attacked.
"""
from __future__ import annotations

import torch

from ._active import Target
from ._common import AttackError

_NORM_NAMES = {"linf": "Linf", "l2": "L2"}


class _Counting(torch.nn.Module):
    """The model, counting forward rows and backward rows (a hook on the output)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.forwards, self.backwards = model, 0, 0

    def forward(self, x):
        out = self.model(x)
        self.forwards += out.shape[0]
        if out.requires_grad:
            def count(grad):
                self.backwards += grad.shape[0]
            out.register_hook(count)
        return out


def load_fab():
    """pyautoattack's FAB class (AutoAttackMissing with the install command when absent)."""
    from .auto import load_autoattack  # noqa: PLC0415
    _, package = load_autoattack()
    if package == "pyautoattack":
        from pyautoattack.fab_pt import FABAttack_PT  # noqa: PLC0415
    else:
        from autoattack.fab_pt import FABAttack_PT  # noqa: PLC0415
    return FABAttack_PT


def run_fab_t(tg: Target, idx: torch.Tensor, out: torch.Tensor, fooled: torch.Tensor, *,
              steps: int, targets: int, model: torch.nn.Module) -> None:
    """FAB-T on the samples `idx` of `tg` (one run per distinct ε); fills `out`/`fooled`.
    `model`: the caller's (NCHW) module in attack mode; pyautoattack `.view()`s tensors a
    channels_last copy would hand it in that layout."""
    if tg.box != (0.0, 1.0):
        raise AttackError("fab-t (pyautoattack) keeps images in [0, 1]: use clamp=True with it")
    fab_cls = load_fab()
    net = _Counting(model)
    dev = tg.x0.device
    for e in torch.unique(tg.eps[idx]).tolist():
        sub = idx[tg.eps[idx] == e]
        fab = fab_cls(net, norm=_NORM_NAMES[tg.norm], n_restarts=1, n_iter=steps, eps=e, seed=tg.seed,
                      targeted=True, n_target_classes=targets, device=dev, verbose=False)
        net.forwards = net.backwards = 0
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            adv = fab.perturb(tg.x0[sub], tg.y[sub])
            with torch.no_grad():
                hit = net(adv).argmax(1) != tg.y[sub]
        n = sub.numel()
        tg.forwards[sub] += -(-net.forwards // n)
        tg.backwards[sub] += -(-net.backwards // n)
        done = sub[hit]
        out[done] = adv[hit]
        fooled[done] = True
