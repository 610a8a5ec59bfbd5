"""torchattacks-style objects over the functional attacks: configure once, call on batches.

    atk = PGD(model, eps=8/255, alpha=2/255, steps=10)
    x_adv = atk(images, labels)

Names follow torchattacks (`alpha` is the functional API's `step`); the device is the images'.
"""
from __future__ import annotations

from typing import Optional

from .gradient import fgsm, pgd


class Attack:
    """Base: holds the model and the settings; `attack(images, labels)` returns adversarial images."""

    def __init__(self, model):
        self.model = model

    def forward(self, images, labels):  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, images, labels):
        return self.forward(images, labels)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k != "model")
        return f"{type(self).__name__}({args})"


class FGSM(Attack):
    """Fast gradient sign method (L-inf), or its L2 form with norm="l2"."""

    def __init__(self, model, eps: float = 8 / 255, norm: str = "linf", clamp=True,
                 targeted: bool = False, loss: str = "ce"):
        super().__init__(model)
        self.eps, self.norm, self.clamp, self.targeted, self.loss = eps, norm, clamp, targeted, loss

    def forward(self, images, labels):
        return fgsm(self.model, images, labels, eps=self.eps, norm=self.norm, clamp=self.clamp,
                    targeted=self.targeted, loss=self.loss)


class PGD(Attack):
    """Projected gradient descent; L-inf by default (torchattacks' PGD), norm="l2" for PGDL2."""

    def __init__(self, model, eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 10,
                 random_start: bool = True, norm: str = "linf", early_stop: bool = False,
                 restarts: int = 1, clamp=True, seed: Optional[int] = None,
                 targeted: bool = False, loss: str = "ce"):
        super().__init__(model)
        self.eps, self.alpha, self.steps, self.random_start = eps, alpha, steps, random_start
        self.norm, self.early_stop, self.restarts, self.clamp = norm, early_stop, restarts, clamp
        self.seed, self.targeted, self.loss = seed, targeted, loss

    def forward(self, images, labels):
        return pgd(self.model, images, labels, eps=self.eps, step=self.alpha, steps=self.steps,
                   norm=self.norm, random_start=self.random_start, early_stop=self.early_stop,
                   clamp=self.clamp, seed=self.seed, restarts=self.restarts,
                   targeted=self.targeted, loss=self.loss)


class PGDL2(PGD):
    """PGD in the L2 threat model, with torchattacks' PGDL2 defaults (ε 1.0, step 0.2)."""

    def __init__(self, model, eps: float = 1.0, alpha: float = 0.2, steps: int = 10, **kwargs):
        kwargs.setdefault("norm", "l2")
        super().__init__(model, eps=eps, alpha=alpha, steps=steps, **kwargs)
