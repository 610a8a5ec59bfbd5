"""autoattack_fast: AutoAttack's standard cascade, ours: APGD-CE -> APGD-T (9 targets) -> Square
(5000 queries), each stage on the points still robust, each point leaving its batch the moment it
breaks.

    res = autoattack_fast(model, x, y, eps=8/255, norm="Linf")
    res.robust            # [B] bool: clean-correct and unbroken by every stage
    res.robust_accuracy, res.stages, res.broken_by, res.forwards, res.backwards

What it adds to AutoAttack (see `AutoAttackFastResult` for the outputs):
- results independent of the batch size and of sharding (`aa_shard`): every random draw comes
  from the point's own counter-based stream (seed, sample id, stage, restart);
- budget="fast" (default) stops spending on points that make no progress (`budget.StallRule`);
  budget="full" spends AutoAttack's whole budget on every point;
- amp=True attacks under bf16 autocast where the device has it; every adversarial example is
  then re-checked by the caller's model in fp32, and a point counts as broken only when that
  check agrees (the disagreements are counted);
- per-sample and per-stage forward/backward pass counts and times;
- the attack runs on a channels_last copy of the model where that pays (`runtime.fast_eval_copy`);
  the caller's module is used, unchanged, for the clean and fp32 decisions.

FAB-T, the fourth stage of AutoAttack standard, is left out by default (`fab_bridge` says why and
how to add it).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from aerl_fast.runtime import fast_eval_copy

from ._active import Target, setup_target
from ._common import AttackError, attack_mode, check_batch, check_count
from .apgd_attack import check_target_classes, run_apgd_stage
from .budget import rule_for
from .fab_bridge import load_fab, run_fab_t
from .model_checks import check_model
from .square_attack import run_square

STAGES = ("apgd-ce", "apgd-t", "fab-t", "square")
STANDARD = ("apgd-ce", "apgd-t", "square")


@dataclass
class StageReport:
    """One stage of the cascade: points attacked and broken (fp32-confirmed), the passes spent on
    them, the batched model calls they took (sequential steps: what bounds a GPU's time when the
    batches are small), wall seconds, and broken decisions the fp32 re-check overturned."""
    name: str
    attacked: int = 0
    broken: int = 0
    forwards: int = 0
    backwards: int = 0
    seconds: float = 0.0
    disagreements: int = 0
    calls: int = 0


@dataclass
class AutoAttackFastResult:
    """Per-sample outcome of `autoattack_fast` (all [B] tensors on the images' device).

    broken_by: index into `stage_names` of the stage that broke the sample, -1 when it was not
    broken (robust, or misclassified clean: see `clean`).  forwards/backwards: passes spent on the
    sample, the clean pass and the fp32 re-checks included.  x_adv: the adversarial image of each
    broken sample, the clean image elsewhere (None when not asked for)."""
    robust: torch.Tensor
    clean: torch.Tensor
    broken_by: torch.Tensor
    forwards: torch.Tensor
    backwards: torch.Tensor
    stage_names: List[str]
    stages: List[StageReport]
    x_adv: Optional[torch.Tensor] = None
    settings: Dict[str, object] = field(default_factory=dict)

    @property
    def disagreements(self) -> int:
        """Points an attack stage counted as broken that the fp32 re-check did not confirm."""
        return sum(s.disagreements for s in self.stages)

    @property
    def robust_accuracy(self) -> float:
        return float(self.robust.double().mean())

    @property
    def clean_accuracy(self) -> float:
        return float(self.clean.double().mean())

    def broken_by_name(self) -> List[Optional[str]]:
        return [self.stage_names[i] if i >= 0 else None for i in self.broken_by.tolist()]

    def summary(self) -> dict:
        """JSON-ready totals: accuracies, settings, per-stage reports."""
        return {"n": int(self.robust.numel()), "clean_accuracy": self.clean_accuracy,
                "robust_accuracy": self.robust_accuracy, "disagreements": self.disagreements,
                "forwards": int(self.forwards.sum()), "backwards": int(self.backwards.sum()),
                "settings": dict(self.settings), "stages": [vars(s).copy() for s in self.stages]}


def check_stages(stages: Sequence[str]) -> List[str]:
    names = [stages] if isinstance(stages, str) else list(stages)
    unknown = [s for s in names if s not in STAGES]
    if not names or unknown or len(set(names)) != len(names):
        raise AttackError(f"stages must be distinct names from {', '.join(STAGES)}; got {names}"
                          + (f" (unknown: {', '.join(map(repr, unknown))})" if unknown else ""))
    if "fab-t" in names:
        load_fab()  # AutoAttackMissing (with the install command) before any work
    return names


def _predict(model, x, batch_size):
    with torch.no_grad():
        return torch.cat([model(x[i:i + batch_size]).float() for i in range(0, x.shape[0], batch_size)])


def _run_stage(name, tg: Target, idx, out, fooled, *, steps, targets, queries, rule, clean_logits,
               batch_size, model):
    for chunk in idx.split(batch_size):
        if name in ("apgd-ce", "apgd-t"):
            run_apgd_stage(tg, chunk, out, fooled, steps=steps, loss="ce" if name == "apgd-ce" else "dlr",
                           targets=0 if name == "apgd-ce" else targets, restarts=1, rho=0.75, rule=rule,
                           clean_logits=clean_logits)
        elif name == "square":
            run_square(tg, chunk, out, fooled, queries=queries, rule=rule)
        else:
            run_fab_t(tg, chunk, out, fooled, steps=steps, targets=targets, model=model)


def autoattack_fast(model, x, y, *, eps, norm: str, seed: int = 0,
                    stages: Sequence[str] = STANDARD, budget: str = "fast", steps: int = 100,
                    targets: int = 9, queries: int = 5000, batch_size: int = 500, sample_ids=None,
                    amp: bool = False, clamp=True, compact_every: Optional[int] = None,
                    return_adv: bool = True) -> AutoAttackFastResult:
    """AutoAttack's standard cascade on (x, y) at radius eps (a float or a [B] tensor, > 0) in
    norm "linf"/"Linf" or "l2"/"L2".

    stages: any of "apgd-ce", "apgd-t", "fab-t" (pyautoattack), "square", run in the order given.
    budget: "fast" (`budget.StallRule`) or "full" (AutoAttack's).  steps: APGD iterations (and
    FAB's); targets: APGD-T's (and FAB-T's) target classes; queries: Square's.  batch_size: points
    attacked together (results do not depend on it).  sample_ids: [B] global ids keying each
    sample's random streams (default: the row index; a shard passes its global indices).
    amp: bf16 autocast where the device has it, decisions re-checked in fp32.
    """
    names = check_stages(stages)
    steps, targets, queries, batch_size = (check_count(n, v) for n, v in (
        ("steps", steps), ("targets", targets), ("queries", queries), ("batch_size", batch_size)))
    rule = rule_for(budget)
    check_batch(x, y)
    check_model(model, x)   # before attack_mode: it reports the mode the caller left the model in
    t_all = time.perf_counter()
    with attack_mode(model), attack_mode(fast_eval_copy(model)) as net:
        tg = setup_target(net, x, y, eps=eps, norm=norm, seed=seed, sample_ids=sample_ids,
                          clamp=clamp, amp=amp, compact_every=compact_every)
        n, dev = x.shape[0], tg.x0.device
        clean_logits = _predict(model, tg.x0, batch_size)
        if "apgd-t" in names or "fab-t" in names:
            check_target_classes(clean_logits.shape[1], targets)
        tg.forwards += 1
        clean = clean_logits.argmax(1) == tg.y
        robust = clean.clone()
        broken_by = torch.full((n,), -1, dtype=torch.int64, device=dev)
        x_adv = tg.x0.clone()
        reports = []
        for k, name in enumerate(names):
            rep = StageReport(name)
            reports.append(rep)
            idx = robust.nonzero().squeeze(1)
            rep.attacked = int(idx.numel())
            if rep.attacked == 0:
                continue
            f0, b0, c0, t0 = tg.forwards.sum(), tg.backwards.sum(), tg.calls, time.perf_counter()
            out, fooled = tg.x0.clone(), torch.zeros(n, dtype=torch.bool, device=dev)
            _run_stage(name, tg, idx, out, fooled, steps=steps, targets=targets, queries=queries,
                       rule=rule, clean_logits=clean_logits, batch_size=batch_size, model=model)
            new = (fooled & robust).nonzero().squeeze(1)
            confirmed = new
            if new.numel():  # the caller's model, in fp32, decides: broken only when it agrees
                confirmed = new[_predict(model, out[new], batch_size).argmax(1) != tg.y[new]]
                tg.forwards[new] += 1
            robust[confirmed] = False
            broken_by[confirmed] = k
            x_adv[confirmed] = out[confirmed]
            rep.broken = int(confirmed.numel())
            rep.disagreements = int(new.numel()) - rep.broken
            rep.forwards = int(tg.forwards.sum() - f0)
            rep.backwards = int(tg.backwards.sum() - b0)
            rep.calls = tg.calls - c0
            rep.seconds = time.perf_counter() - t0
    settings = {"eps": "per-sample" if isinstance(eps, torch.Tensor) and eps.dim() else float(eps),
                "norm": tg.norm, "seed": seed, "budget": budget, "steps": steps, "targets": targets,
                "queries": queries, "precision": str(tg.autocast or torch.float32).replace("torch.", ""),
                "seconds": time.perf_counter() - t_all}
    return AutoAttackFastResult(robust, clean, broken_by, tg.forwards, tg.backwards, names, reports,
                                x_adv if return_adv else None, settings)
