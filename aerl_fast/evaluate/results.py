"""What an evaluation produces, as typed values: per model its clean accuracy, one AttackOutcome
per attack, the masking checks; for the set the transfer matrix, the gradient dynamics and the
landscapes.  `evaluate.run` returns these and writes nothing; `write_report` turns them into files."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from .config import EvalConfig


def wilson(k: float, n: int, z: float = 1.959963984540054) -> tuple:
    """95% Wilson score interval of a proportion k/n (n = 64 gives about ±12 points at 50%)."""
    if n <= 0:
        return (float("nan"), float("nan"))
    p = k / n
    den = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass
class AttackOutcome:
    """One attack at one or several radii on one model."""
    attack: str                     # fgsm | pgd-linf | pgd-l2 | autoattack
    norm: str
    eps: List[float]
    acc: List[float]                # robust accuracy per radius: correct clean and under attack
    robust: torch.Tensor            # [len(eps), n] bool, on the CPU
    mode: str                       # early-stop | last-iterate | fgsm | autoattack-<version>
    seconds: float
    grad_evals_per_sample: Optional[float] = None
    per_attack: Optional[list] = None  # AutoAttack: robust accuracy after each of its attacks, per radius
    logs: Optional[List[str]] = None   # AutoAttack's own log, per radius
    stages: Optional[list] = None      # aa-fast: per radius, each stage's points, breaks, passes, seconds
    disagreements: int = 0             # aa-fast --amp: bf16 breaks the fp32 re-check overturned
    per_sample: Optional[dict] = None  # aa-fast: broken_by / forwards / backwards [K, n], stage_names

    def acc_at(self, eps: float) -> float:
        return self.acc[self.eps.index(eps)]

    def interval(self, eps: float) -> tuple:
        row = self.robust[self.eps.index(eps)]
        return wilson(float(row.sum()), int(row.numel()))

    def to_json(self) -> dict:
        d = {"eps": self.eps, "acc": self.acc, "mode": self.mode, "seconds": self.seconds,
             "grad_evals_per_sample": self.grad_evals_per_sample,
             "ci95": [list(self.interval(e)) for e in self.eps]}
        if self.per_attack is not None:
            d["per_attack"] = self.per_attack
        if self.stages is not None:
            d["stages"], d["disagreements"] = self.stages, self.disagreements
        return d


@dataclass
class ModelResult:
    name: str
    path: Optional[str]
    objective: str
    arch: str
    dataset: str
    clean_ok: torch.Tensor          # [n] bool, on the CPU
    attacks: Dict[str, AttackOutcome] = field(default_factory=dict)
    masking: list = field(default_factory=list)     # aerl_fast.analysis.masking.MaskingFlag
    degenerate: Optional[str] = None                # why the numbers mean nothing, or None
    width: Optional[float] = None
    logs: Dict[str, str] = field(default_factory=dict)  # peer tools' own logs by kind (e.g. "square")
    verdict: Optional[object] = None                # aerl_fast.analysis.verdict.Verdict (--verdict)
    breaks: Dict[str, torch.Tensor] = field(default_factory=dict)  # the verdict's attacks: [n] bool each

    @property
    def n(self) -> int:
        return int(self.clean_ok.numel())

    @property
    def clean_acc(self) -> float:
        return float(self.clean_ok.double().mean()) if self.n else float("nan")

    def clean_interval(self) -> tuple:
        return wilson(float(self.clean_ok.sum()), self.n)


@dataclass
class EvalResults:
    config: EvalConfig
    models: List[ModelResult]
    test_sets: Dict[str, dict]          # dataset label -> TestSet.describe()
    transfer: Optional[dict] = None     # names, accuracy [N][N], clean, attack, norm, eps, mode, note
    dynamics: Optional[dict] = None     # attack, eps, models: name -> gradient_dynamics() output
    landscapes: Optional[dict] = None   # attack, eps, models: name -> {sample: landscape}
    seconds: float = 0.0
    environment: dict = field(default_factory=dict)  # versions, device, date, git commit
    warnings: List[str] = field(default_factory=list)

    def model(self, name: str) -> ModelResult:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)
