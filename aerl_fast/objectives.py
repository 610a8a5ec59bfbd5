"""The study's four training objectives, and the one training step that applies them.

    SL       cross-entropy on the label
    RL       ε-greedy REINFORCE: −mean(r · log π(a|x)), r = 1[a == y]   (aerl_fast.kernels)
    SL-adv   L(x) + β · L(x_adv),  x_adv = clamp(x + ε_adv · sign(∇ₓ L(x)), 0, 1)
    RL-adv   the same with the policy-gradient loss (the FGSM gradient is the PG loss's)

The adversarial step costs two forwards and two backwards: the clean backward produces the
parameter gradients *and* ∇ₓ L(x) at once, then the FGSM forward/backward accumulates β·∇θ L(x_adv).
The study's code spends four forwards and two backwards on the same thing.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from aerl_fast.kernels import eps_greedy_pg_loss

OBJECTIVES = ("sl", "rl", "sl-adv", "rl-adv")


@dataclass(frozen=True)
class ObjectiveConfig:
    kind: str = "rl"                 # sl | rl | sl-adv | rl-adv
    explore_eps: float = 0.1         # ε of ε-greedy (RL)
    explore: str = "sample"          # per-sample coin, or one coin per batch as the study's code does
    prob_floor: float = 0.0          # the study adds 1e-6 to the softmax and renormalises
    adv_eps: float = 0.01            # FGSM step in [0,1] pixel units
    adv_beta: float = 1.0            # weight of the adversarial term

    def __post_init__(self):
        # each range message starts with the field's name: TrainConfig.validate turns it into the flag
        if self.kind not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.kind!r}; choose one of {', '.join(OBJECTIVES)}")
        if not 0.0 <= self.explore_eps <= 1.0:
            raise ValueError(f"explore_eps must be in [0, 1], got {self.explore_eps}")
        if self.explore not in ("sample", "batch"):
            raise ValueError(f"explore must be 'sample' or 'batch', got {self.explore!r}")
        if self.adv_eps < 0:
            raise ValueError(f"adv_eps must be >= 0, got {self.adv_eps}")
        if self.adv_beta < 0:
            raise ValueError(f"adv_beta must be >= 0, got {self.adv_beta}")
        if not 0.0 <= self.prob_floor < 1.0:
            raise ValueError(f"prob_floor must be in [0, 1), got {self.prob_floor}")

    @property
    def is_rl(self) -> bool:
        return self.kind.startswith("rl")

    @property
    def is_adv(self) -> bool:
        return self.kind.endswith("-adv")


@dataclass
class StepResult:
    """Detached per-step values, left on the device (no host sync in the step)."""
    loss: torch.Tensor           # total loss that was backpropagated
    loss_clean: torch.Tensor
    loss_adv: Optional[torch.Tensor]
    logits: torch.Tensor         # clean logits (train mode)
    reward: Optional[torch.Tensor]  # mean reward of the clean batch (RL)


def objective_loss(cfg: ObjectiveConfig, logits: torch.Tensor, labels: torch.Tensor,
                   generator: Optional[torch.Generator] = None):
    """(loss, mean reward or None) of the base objective (SL or RL) on one batch of logits."""
    if cfg.is_rl:
        # labels were range-checked when the dataset was loaded: skip the per-call check (a host
        # sync on CUDA)
        out = eps_greedy_pg_loss(logits, labels, cfg.explore_eps, explore=cfg.explore,
                                 prob_floor=cfg.prob_floor, generator=generator, validate=False)
        return out.loss, out.rewards.mean()
    return F.cross_entropy(logits.float(), labels), None


def fgsm_from_grad(x: torch.Tensor, grad: torch.Tensor, eps: float) -> torch.Tensor:
    """x_adv = clamp(x + ε · sign(g), 0, 1) — the study's FGSM, in pixel space."""
    return (x + eps * grad.sign()).clamp_(0.0, 1.0)


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: ObjectiveConfig, *,
               adv_active: bool, generator: Optional[torch.Generator] = None,
               autocast: Optional[torch.autocast] = None) -> StepResult:
    """Forward/backward of one batch; parameter gradients are accumulated in `.grad`
    (the caller zeroes them, clips and steps the optimizer)."""
    use_adv = cfg.is_adv and adv_active and cfg.adv_beta > 0
    ctx = autocast if autocast is not None else nullcontext()
    if use_adv:
        x = x.detach().requires_grad_(True)
    # adversarial step under DistributedDataParallel: the clean pass's parameter gradients stay local
    # (no_sync) and the adversarial backward all-reduces them with its own, once per step, not twice
    defer_sync = use_adv and hasattr(model, "no_sync")
    with model.no_sync() if defer_sync else nullcontext():
        with ctx:
            logits = model(x)
        loss_clean, reward = objective_loss(cfg, logits, y, generator)
        loss_clean.backward()  # adversarial: ∇θ L(x) into .grad and ∇ₓ L(x) into x.grad, in one backward
    if not use_adv:
        return StepResult(loss_clean.detach(), loss_clean.detach(), None, logits.detach(), reward)
    x_adv = fgsm_from_grad(x.detach(), x.grad, cfg.adv_eps)
    with ctx:
        logits_adv = model(x_adv)
    loss_adv, _ = objective_loss(cfg, logits_adv, y, generator)
    (cfg.adv_beta * loss_adv).backward()
    total = loss_clean.detach() + cfg.adv_beta * loss_adv.detach()
    return StepResult(total, loss_clean.detach(), loss_adv.detach(), logits.detach(), reward)

