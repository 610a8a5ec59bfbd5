"""The study's training objectives, the ablations that take RL apart, and the one training step
that applies them.

    sl           cross-entropy on the label: −log π(y|x)
    rl           ε-greedy REINFORCE: −mean(r · log π(a|x)), r = 1[a == y]   (aerl_fast.kernels)
    rl-expected  rl's update averaged over the draw: −mean(sg[q(y)] · log π(y|x)), q(y) the
                 probability that the sampler picks the label; without a floor q(y) = (1−ε)·π(y) + ε/C
                 and the gradient is that of −(1−ε)·π(y|x) − (ε/C)·log π(y|x)
    prob         −mean π(y|x), the expected reward itself (rl-expected at ε = 0)
    rl-baseline  REINFORCE with a baseline: −mean((r − g·b) · log π(a|x)), b the batch's mean
                 π(y|x) (detached), g = 0 where the ε coin chose the action (see aerl_fast.kernels.
                 pg_loss for why): rl's expected update with other noise, less than rl's while the
                 policy is unsure, far more once it is confident (a rare wrong action is pushed
                 down with weight b where rl ignores it)
    X-adv        L(x) + β · L(x_adv),  x_adv = clamp(x + ε_adv · sign(∇ₓ L(x)), 0, 1), the FGSM
                 gradient being the objective's own

SL and RL differ in three ways at once, and the ablations switch them on one at a time: the shape
(π_y, whose gradient π_y·∇log π_y vanishes for confident answers right or wrong, against log π_y:
sl vs prob), exploration (prob vs rl-expected, the ε/C·log π_y term) and the sampling noise of
REINFORCE (rl-expected vs rl-baseline vs rl, all with the same expected update).

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
from aerl_fast.kernels.pg_loss import floored_probs, pg_loss_given_actions

BASE_OBJECTIVES = ("sl", "rl", "rl-expected", "prob", "rl-baseline")
OBJECTIVES = tuple(k for base in BASE_OBJECTIVES for k in (base, base + "-adv"))
SAMPLED = ("rl", "rl-baseline")  # draw actions from the policy (the ε-greedy generator's consumers)


@dataclass(frozen=True)
class ObjectiveConfig:
    kind: str = "rl"                 # one of OBJECTIVES
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
    def base(self) -> str:
        """The objective without its adversarial term."""
        return self.kind[:-len("-adv")] if self.is_adv else self.kind

    @property
    def is_rl(self) -> bool:
        """A policy objective: it reports the batch's reward (realised when sampled, else expected)."""
        return self.base != "sl"

    @property
    def samples_actions(self) -> bool:
        """Draws ε-greedy actions (consumes the exploration generator)."""
        return self.base in SAMPLED

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
    reward: Optional[torch.Tensor]  # mean (or expected) reward of the clean batch (policy objectives)


def label_probs(logits: torch.Tensor, labels: torch.Tensor, prob_floor: float) -> torch.Tensor:
    """π(y|x) [B] as the sampler draws it (the floored softmax), with gradient."""
    return floored_probs(logits, prob_floor).gather(1, labels[:, None]).squeeze(1)


def expected_pg_loss(logits, labels, epsilon: float, prob_floor: float = 0.0):
    """rl-expected: (−mean(sg[q(y)] · log π(y|x)), mean q(y)).  q(y) = (1−ε)·π(y) + ε/C is the
    probability that ε-greedy sampling picks the label (per sample or per batch alike), and log π
    is rl's own (the floor enters as it enters rl), so the gradient is exactly E_a[∇ rl]; the value
    is E_a[rl's loss]."""
    log_term, _, _ = pg_loss_given_actions(logits, labels, labels, prob_floor, "none")  # −log π(y)
    with torch.no_grad():
        q_label = (1.0 - epsilon) * label_probs(logits, labels, prob_floor) + epsilon / logits.shape[1]
    return (q_label * log_term).mean(), q_label.mean()


def objective_loss(cfg: ObjectiveConfig, logits: torch.Tensor, labels: torch.Tensor,
                   generator: Optional[torch.Generator] = None):
    """(loss, mean reward or None) of the base objective on one batch of logits; the reward is
    the realised one for sampled objectives, its expectation for rl-expected and prob."""
    base = cfg.base
    if base == "sl":
        return F.cross_entropy(logits.float(), labels), None
    if base == "prob":
        p_label = label_probs(logits, labels, cfg.prob_floor)
        return -p_label.mean(), p_label.detach().mean()
    if base == "rl-expected":
        return expected_pg_loss(logits, labels, cfg.explore_eps, cfg.prob_floor)
    baseline = None
    if base == "rl-baseline":  # the batch's mean expected reward of the policy's own draws
        with torch.no_grad():
            baseline = label_probs(logits, labels, cfg.prob_floor).mean()
    # labels were range-checked when the dataset was loaded: skip the per-call check (a host sync
    # on CUDA)
    out = eps_greedy_pg_loss(logits, labels, cfg.explore_eps, explore=cfg.explore,
                             prob_floor=cfg.prob_floor, generator=generator, baseline=baseline,
                             validate=False)
    return out.loss, out.rewards.mean()


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

