"""AutoAttack (Croce & Hein) through its packaged implementation, an optional extra.

    pip install 'aerl_fast[autoattack]'        # pyautoattack==0.2.0, MIT, by the authors

`pyautoattack` (PyPI; imported as `pyautoattack`) is used when installed, else the upstream
GitHub package (imported as `autoattack`). Their APIs differ: pyautoattack takes keyword-only
`attacks=` and logs through the `logging` logger "auto-attack"; upstream takes `attacks_to_run=`,
`log_path=` and `bs=`. Both are driven here, and the log is written to `log_path` and returned.
"""
from __future__ import annotations

import contextlib
import io
import logging
import re
from pathlib import Path
from typing import Dict, NamedTuple, Optional, Sequence

import torch

from ._common import AttackError, attack_mode, check_batch, check_image_range, check_norm
from aerl_fast.errors import UserError

VERSIONS = ("standard", "plus", "rand", "custom")
ATTACKS = ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")
_NORM_NAMES = {"linf": "Linf", "l2": "L2"}
INSTALL_HINT = ("AutoAttack needs the optional extra: pip install 'aerl_fast[autoattack]' "
                "(i.e. pip install pyautoattack==0.2.0)")


class AutoAttackMissing(UserError, ImportError):
    """Neither pyautoattack nor the upstream autoattack package is importable."""


class AutoAttackResult(NamedTuple):
    x_adv: torch.Tensor
    robust: torch.Tensor          # [B] bool: clean-correct and still correct on x_adv
    per_attack: Dict[str, float]  # robust accuracy after each attack, parsed from the log
    log: str
    package: str


def load_autoattack():
    """(AutoAttack class, package name); AutoAttackMissing with the install command otherwise."""
    try:
        from pyautoattack import AutoAttack  # noqa: PLC0415
        return AutoAttack, "pyautoattack"
    except ImportError:
        pass
    try:
        from autoattack import AutoAttack  # noqa: PLC0415
        return AutoAttack, "autoattack"
    except ImportError:
        raise AutoAttackMissing(INSTALL_HINT) from None


def autoattack_available() -> bool:
    try:
        load_autoattack()
        return True
    except AutoAttackMissing:
        return False


_ACC_LINE = re.compile(r"robust accuracy after ([A-Z0-9-]+)\s*:\s*([0-9.]+)%")
_CLEAN_LINE = re.compile(r"(?:initial|clean) accuracy:\s*([0-9.]+)%")


def _parse_log(text: str) -> Dict[str, float]:
    out = {}
    m = _CLEAN_LINE.search(text)
    if m:
        out["clean"] = float(m.group(1)) / 100
    for name, acc in _ACC_LINE.findall(text):
        out[name.lower()] = float(acc) / 100
    return out


@contextlib.contextmanager
def _capture(logger_name: str, log_path: Optional[Path]):
    """Collect a logging logger's records (DEBUG and up) into a string and, optionally, a file."""
    logger = logging.getLogger(logger_name)
    buf = io.StringIO()
    handlers = [logging.StreamHandler(buf)]
    if log_path is not None:
        handlers.append(logging.FileHandler(log_path, mode="w"))
    fmt = logging.Formatter("%(message)s")
    old_level, old_propagate = logger.level, logger.propagate
    for h in handlers:
        h.setFormatter(fmt)
        h.setLevel(logging.DEBUG)
        logger.addHandler(h)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        yield buf
    finally:
        for h in handlers:
            logger.removeHandler(h)
            h.close()
        logger.setLevel(old_level)
        logger.propagate = old_propagate


def autoattack(model, x, y, *, eps: float, norm: str = "linf", version: str = "standard",
               attacks: Optional[Sequence[str]] = None, batch_size: int = 250,
               seed: Optional[int] = 0, log_path=None, square_queries: Optional[int] = None,
               apgd_iters: Optional[int] = None) -> AutoAttackResult:
    """Run AutoAttack (standard, plus, rand, or custom with `attacks`) at radius `eps`.

    AutoAttack always keeps images in [0, 1] and takes a single ε (a robustness curve is one run
    per ε). `square_queries`/`apgd_iters` shrink Square's query budget and APGD's iterations
    (cheaper, weaker: leave None for the standard evaluation). The global RNG state is restored
    afterwards (AutoAttack reseeds it).
    """
    check_batch(x, y)
    norm = check_norm(norm)
    check_image_range(x, (0.0, 1.0))  # AutoAttack keeps images in [0, 1]
    try:
        eps = float(eps)
    except (TypeError, ValueError):
        raise AttackError(f"AutoAttack takes one float eps, got {eps!r}") from None
    if not eps >= 0:
        raise AttackError(f"eps must be >= 0, got {eps}")
    if version not in VERSIONS:
        raise AttackError(f"unknown AutoAttack version {version!r}; choose one of {', '.join(VERSIONS)}")
    if version == "custom":
        attacks = list(attacks or [])
        unknown = [a for a in attacks if a not in ATTACKS]
        if not attacks or unknown:
            raise AttackError(f"AutoAttack version 'custom' needs attacks from {', '.join(ATTACKS)}; "
                              f"got {attacks}")
    elif attacks:
        raise AttackError(f"AutoAttack attacks are fixed by version {version!r}; use version='custom'")
    AutoAttack, package = load_autoattack()
    device = x.device
    y = y.to(device=device, dtype=torch.int64)
    log_path = Path(log_path) if log_path is not None else None
    norm_name = _NORM_NAMES[norm]

    devices = [device] if device.type == "cuda" else []
    with attack_mode(model), torch.random.fork_rng(devices=devices), \
            _capture("auto-attack", log_path if package == "pyautoattack" else None) as buf:
        if package == "pyautoattack":
            adversary = AutoAttack(model, attacks=attacks if version == "custom" else None,
                                   device=device, eps=eps, norm=norm_name, seed=seed, version=version)
        else:  # upstream: positional-compatible keywords of its documented constructor
            adversary = AutoAttack(model, norm=norm_name, eps=eps, seed=seed, version=version,
                                   attacks_to_run=attacks if version == "custom" else [],
                                   device=device, log_path=str(log_path) if log_path else None)
        if square_queries is not None:
            adversary.square.n_queries = int(square_queries)
        if apgd_iters is not None:
            adversary.apgd.n_iter = int(apgd_iters)
            adversary.apgd_targeted.n_iter = int(apgd_iters)
        if package == "pyautoattack":
            x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=batch_size)
        else:
            x_adv = adversary.run_standard_evaluation(x, y, bs=batch_size)
        with torch.no_grad():
            robust = torch.cat([model(x_adv[i:i + batch_size]).argmax(1) == y[i:i + batch_size]
                                for i in range(0, x.shape[0], batch_size)])
            clean = torch.cat([model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]
                               for i in range(0, x.shape[0], batch_size)])
    text = buf.getvalue()
    if package == "autoattack" and log_path is not None and log_path.is_file():
        text = log_path.read_text()
    return AutoAttackResult(x_adv.detach(), robust & clean, _parse_log(text), text, package)

