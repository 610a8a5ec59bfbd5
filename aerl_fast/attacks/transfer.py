"""Transfer matrix: adversarial images crafted on model A, accuracy of model B on them, all pairs.

Entry [a, b] is the fraction of samples model b classifies correctly both clean and on the images
crafted against model a, the same definition as white-box robust accuracy, so the diagonal *is*
the white-box result of the crafting attack.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Mapping, NamedTuple, Optional

import numpy as np
import torch

from aerl_fast.errors import UserError

from ._common import check_batch


class TransferError(UserError, ValueError):
    """The models of a transfer matrix cannot share inputs (class counts or shapes differ)."""


class TransferResult(NamedTuple):
    names: List[str]
    accuracy: np.ndarray  # [N, N]: row = model the images were crafted on, column = model evaluated
    clean: np.ndarray     # [N] clean accuracy of each model on the same samples
    robust: torch.Tensor  # [N, N, n] bool on the CPU: sample correct both clean and on the crafted image


def num_classes(model, probe: Optional[torch.Tensor] = None) -> int:
    """Class count from the checkpoint spec, else from one forward of `probe`."""
    spec = getattr(model, "aerl_spec", None)
    if isinstance(spec, dict) and "num_classes" in spec:
        return int(spec["num_classes"])
    if probe is None:
        raise TransferError("cannot tell the model's class count without a probe input")
    with torch.no_grad():
        was = model.training
        model.eval()
        out = model(probe[:1])
        model.train(was)
    return int(out.shape[-1])


def check_same_classes(models: Mapping[str, torch.nn.Module], probe: Optional[torch.Tensor] = None):
    counts = {name: num_classes(m, probe) for name, m in models.items()}
    if len(set(counts.values())) > 1:
        listing = ", ".join(f"{n}: {c}" for n, c in counts.items())
        raise TransferError(f"transfer needs models with the same classes; class counts differ ({listing})")
    return next(iter(counts.values()))


def _predict(model, x, batch_size):
    with torch.no_grad():
        return torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, x.shape[0], batch_size)])


def transfer_matrix(models: Mapping[str, torch.nn.Module], x: torch.Tensor, y: torch.Tensor,
                    attack: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor], *,
                    batch_size: int = 256,
                    adversarials: Optional[Dict[str, torch.Tensor]] = None,
                    progress=None) -> TransferResult:
    """Craft with `attack(model, x_batch, y_batch) -> x_adv` on each model, evaluate on all.

    adversarials: images already crafted on some models (name -> [N, ...]) are reused, not
    re-crafted. progress: an optional callable(n) called after each crafted batch.
    """
    check_batch(x, y)
    names = list(models)
    if not names:
        raise TransferError("transfer matrix: no models given")
    check_same_classes(models, x)
    for m in models.values():
        m.eval()
    n = x.shape[0]
    clean_ok = torch.stack([_predict(models[b], x, batch_size) == y for b in names])  # [N, n]
    per_sample = torch.zeros(len(names), len(names), n, dtype=torch.bool)
    for a, src in enumerate(names):
        for i in range(0, n, batch_size):
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]
            if adversarials is not None and src in adversarials:
                adv = adversarials[src][i:i + batch_size].to(x.device)
            else:
                adv = attack(models[src], xb, yb)
                if progress is not None:
                    progress(xb.shape[0])
            for b, tgt in enumerate(names):
                ok = (_predict(models[tgt], adv, batch_size) == yb) & clean_ok[b, i:i + batch_size]
                per_sample[a, b, i:i + xb.shape[0]] = ok.cpu()
    acc = per_sample.double().mean(2).numpy()
    return TransferResult(names, acc, clean_ok.double().mean(1).cpu().numpy(), per_sample)
