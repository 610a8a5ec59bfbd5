"""What an evaluation runs (`EvalConfig`, with named bundles) and how this process runs it
(`EvalOptions`).

Threat model: each attack has a norm; its radii are `l2_eps` / `linf_eps` when given, else `eps`
when every attack asked for shares one norm, else the field's default for that norm (L∞ 8/255,
L2 0.5 on CIFAR-size images).  A radius that cannot be meant (an L∞ ε ≥ 1 covers the whole image
box; an L2 ε beyond the box's diameter) is refused with the likely intent.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Optional, Tuple

from aerl_fast.attacks import BUDGETS, LOSSES, NORMS, STAGES as AA_STAGES, STANDARD as AA_STANDARD
from aerl_fast.data.imagefolder import DECODERS
from aerl_fast.errors import ConfigError
from aerl_fast.fields import check, setting

ATTACK_NORMS = {"fgsm": "linf", "pgd-linf": "linf", "pgd-l2": "l2", "autoattack": None,  # None: --aa-norm
                "aa-fast": None}
ATTACKS = tuple(ATTACK_NORMS)
DEFAULT_EPS = {"linf": 8 / 255, "l2": 0.5}   # the field's radii for 32x32 images in [0, 1]
DEFAULT_REL_STEP = 0.1                       # PGD step = 0.1·ε unless --step is given (the study's ratio)
AA_VERSIONS = ("standard", "plus", "rand", "custom")

T, A, N, O = "threat model", "attacks", "analysis", "output"


@dataclass
class EvalConfig:
    attacks: Tuple[str, ...] = setting(("pgd-l2",), f"attacks, space- or comma-separated: {', '.join(ATTACKS)}",
                                     choices=ATTACKS, group=T, flag="--attack")
    eps: Tuple[float, ...] = setting((), "radii of the attacks when they share one norm (several: a robustness "
                                     "curve, one batched attack); fractions such as 8/255 are accepted; "
                                     "default: L∞ 8/255, L2 0.5", lo=0.0, group=T)
    l2_eps: Tuple[float, ...] = setting((), "radii of the L2 attacks (L2 distance in [0,1] pixel space)", lo=0.0,
                                        group=T)
    linf_eps: Tuple[float, ...] = setting((), "radii of the L∞ attacks (fgsm, pgd-linf, autoattack --aa-norm "
                                          "linf)", lo=0.0, group=T)
    clamp: bool = setting(True, "keep adversarial images in [0,1] (the study's own PGD does not: --no-clamp)", group=T)
    n_test: int = setting(1000, "test images: a stratified subset of this size, the same for every model and run",
                          lo=1, group=T)
    subset_seed: int = setting(0, "seed of the stratified test subset", lo=0, group=T)
    steps: int = setting(100, "PGD steps", lo=1, hi=1_000_000, group=A)
    step: Optional[float] = setting(None, "absolute PGD step size (default: --rel-step × ε)", lo=0.0,
                                    lo_open=True, group=A)
    rel_step: float = setting(DEFAULT_REL_STEP, "PGD step as a fraction of each ε (ε 1.0 -> step 0.1)", lo=0.0,
                              lo_open=True, hi=1.0, group=A)
    restarts: int = setting(1, "PGD random restarts", lo=1, hi=10_000, group=A)
    random_start: bool = setting(True, "start PGD at a random point of the ε-ball", group=A)
    early_stop: bool = setting(True, "a sample is broken the first time any PGD iterate fools the model (at least "
                               "as strong as last-iterate, faster); --no-early-stop (or --last-iterate) judges "
                               "only the last iterate, as the study and torchattacks do", group=A)
    loss: str = setting("ce", "attack loss: ce (cross-entropy on the label) or margin (logit margin)", choices=LOSSES,
                        group=A)
    batch_size: int = setting(256, "images per attack batch", lo=1, hi=1 << 20, group=A)
    seed: int = setting(0, "random starts, landscape directions", lo=0, group=A)
    aa_version: str = setting("standard", "AutoAttack version (pyautoattack)", choices=AA_VERSIONS, group=A)
    aa_attacks: Tuple[str, ...] = setting((), "AutoAttack attacks for --aa-version custom (apgd-ce apgd-t fab-t "
                                          "square ...)", group=A)
    aa_norm: str = setting("l2", "AutoAttack threat model (autoattack and aa-fast)", choices=NORMS, group=A)
    aa_stages: Tuple[str, ...] = setting(AA_STANDARD, "aa-fast stages, in order: apgd-ce, apgd-t, square, and fab-t "
                                         "(through pyautoattack; left out by default: it rarely changes the result)",
                                         choices=AA_STAGES, group=A)
    aa_budget: str = setting("fast", "aa-fast budget: fast (stop spending on points whose margin makes no progress) "
                             "or full (AutoAttack's whole budget)", choices=BUDGETS, group=A)
    aa_steps: int = setting(100, "APGD iterations of aa-fast and of the verdict's white-box attacks", lo=1,
                            hi=100_000, group=A)
    aa_queries: int = setting(5000, "Square queries of aa-fast and of the verdict", lo=1, hi=1_000_000, group=A)
    transfer: bool = setting(False, "N x N transfer matrix (craft on A, evaluate on B), last-iterate PGD", group=N)
    transfer_eps: Optional[float] = setting(None, "ε of the transfer (and dynamics/landscape) attack; default the "
                                            "largest", lo=0.0, group=N)
    dynamics: bool = setting(False, "gradient statistics per PGD step (norm, cosine, sign consistency, dispersion)",
                             group=N)
    dynamics_n: int = setting(256, "samples for --dynamics", lo=1, group=N)
    landscape: int = setting(0, "loss-landscape figures for the first N correctly classified samples", lo=0, group=N)
    landscape_grid: int = setting(21, "grid points per axis of a landscape", lo=2, hi=501, group=N)
    masking: bool = setting(True, "gradient-masking checks", group=N)
    square_queries: int = setting(0, "masking check: Square attack with this many queries (0: skip; needs "
                                  "pyautoattack)", lo=0, group=N)
    verdict: bool = setting(False, "end in a verdict per model: worst case over every attack, convergence, ε to zero, "
                            "ordering, gradients, attack self-test -> no masking signs / masking likely / attack "
                            "failure", group=N)
    verdict_eps: Optional[float] = setting(None, "radius of the verdict (default: the largest of the first gradient "
                                           "attack)", lo=0.0, lo_open=True, group=N)

    # -- named bundles (AutoAttack's set_version, for evaluation settings) ----------------------
    @classmethod
    def study(cls, **changes) -> "EvalConfig":
        """The study's evaluation: PGD-L2 ε 1.0, step 0.1, 100 steps, random start, no [0,1] clamp,
        last iterate; transfer matrix and gradient dynamics."""
        return replace(cls(attacks=("pgd-l2",), l2_eps=(1.0,), steps=100, rel_step=0.1, clamp=False,
                           early_stop=False, transfer=True, dynamics=True), **changes)

    @classmethod
    def smoke(cls, **changes) -> "EvalConfig":
        """Minutes on a CPU: PGD-L2 ε 1.0, 20 steps on 500 images, transfer and dynamics on 128."""
        return replace(cls(attacks=("pgd-l2",), l2_eps=(1.0,), steps=20, n_test=500, batch_size=250,
                           dynamics_n=128, transfer=True, dynamics=True, masking=False), **changes)

    BUNDLES = ("default", "study", "smoke")

    @classmethod
    def bundle(cls, name: str, **changes) -> "EvalConfig":
        if name == "default":
            return replace(cls(), **changes)
        if name in ("study", "smoke"):
            return getattr(cls, name)(**changes)
        raise ConfigError(f"unknown evaluation bundle {name!r}; choose one of {', '.join(cls.BUNDLES)}")

    # -- checks and derived values ------------------------------------------------------------
    def validate(self) -> "EvalConfig":
        # names as AutoAttack and torchattacks write them (Linf, L2, PGD-L2) are accepted
        object.__setattr__(self, "aa_norm", str(self.aa_norm).lower())
        object.__setattr__(self, "attacks", tuple(str(a).lower() for a in self.attacks))
        check(self)
        if not self.attacks:
            raise ConfigError("--attack: give at least one attack")
        object.__setattr__(self, "attacks", tuple(dict.fromkeys(self.attacks)))
        if self.aa_version == "custom" and "autoattack" in self.attacks and not self.aa_attacks:
            raise ConfigError("--aa-version custom needs --aa-attacks")
        open_norms = {n for n in map(self.norm_of, self.attacks) if not (self.l2_eps if n == "l2" else self.linf_eps)}
        if self.eps and len(open_norms) > 1:  # --eps serves the norms without radii of their own
            raise ConfigError("--eps is ambiguous with both L2 and L∞ attacks: give --l2-eps or --linf-eps "
                              "(--eps then serves the other norm)")
        for a in self.attacks:
            self.radii(a)  # each checked, with the likely intent when it cannot be meant
        if self.step is not None:
            for a in self.attacks:
                if a.startswith("pgd"):
                    small = [e for e in self.radii(a) if 0 < e < self.step]
                    if small:
                        raise ConfigError(f"--step {self.step:g} > eps {small[0]:g} ({a}): the step must not exceed "
                                          "the radius; lower --step or use --rel-step")
        return self

    def norm_of(self, attack: str) -> str:
        return ATTACK_NORMS[attack] or self.aa_norm

    def label_of(self, attack: str) -> str:
        return f"{attack}-{self.aa_norm}" if ATTACK_NORMS[attack] is None else attack

    def radii(self, attack: str, image_numel: Optional[int] = None) -> Tuple[float, ...]:
        """The sorted radii `attack` runs at, checked against the image box (the L2 box needs the
        image size: checked when `image_numel` is given)."""
        norm = self.norm_of(attack)
        own = self.l2_eps if norm == "l2" else self.linf_eps
        values = own or self.eps or (DEFAULT_EPS[norm],)
        flag = ("--l2-eps" if norm == "l2" else "--linf-eps") if own else "--eps"
        for e in values:
            check_radius(e, norm, flag, image_numel)
        return tuple(sorted(set(float(e) for e in values)))

    def step_for(self, eps: float) -> float:
        """PGD step for radius eps: --step, else --rel-step times eps."""
        return self.step if self.step is not None else self.rel_step * eps

    def to_json(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


def check_radius(eps: float, norm: str, flag: str, image_numel: Optional[int] = None) -> None:
    """An L∞ ε ≥ 1 (the whole [0,1] box) or an L2 ε beyond the box's diameter cannot be what the user
    meant: refused, with the likely intent (8 -> 8/255)."""
    if norm == "linf" and eps >= 1.0:
        hint = f"; did you mean {eps:g}/255 = {eps / 255:.4f}?" if eps <= 255 else ""
        raise ConfigError(f"{flag} {eps:g}: an L∞ radius of 1 or more covers the whole [0,1] image box, so every "
                          f"image is reachable and accuracy is 0 by construction{hint}")
    diameter = math.sqrt(image_numel) if image_numel else math.inf
    if norm == "l2" and eps > diameter:
        raise ConfigError(f"{flag} {eps:g}: an L2 radius beyond {diameter:.1f} (the diameter of the [0,1] box of "
                          f"a {image_numel}-value image) reaches every image; for pixel units in 0..255 divide by 255")


E = "runtime"


@dataclass
class EvalOptions:
    device: str = setting("auto", "auto, cpu, cuda or cuda:N", group=E)
    amp: bool = setting(False, "attack in bf16 where the device has it; aa-fast re-checks every adversarial example in "
                        "fp32 and counts disagreements", group=E)
    data_dir: Optional[str] = setting(None, "dataset folder, overriding the one recorded in each run's config "
                                      "(default: each run's own)",
                                      group=E)
    decoder: str = setting("auto", "image-folder decoder, when the test split is not cached yet", choices=DECODERS,
                           group=E)
    progress: bool = setting(True, "show progress bars", group=E)
    names: Tuple[str, ...] = setting((), "display names of the models, in order (default: the run folder names)",
                                     group=O)
    out: Optional[str] = setting(None, "results folder (default results/eval-<time>)", group=O)
    overwrite: bool = setting(False, "write into a results folder that already holds files", group=O)

    def validate(self) -> "EvalOptions":
        return check(self)

