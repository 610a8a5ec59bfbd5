"""Each attack of an evaluation on one model: all radii of a gradient attack as ONE batched attack
with per-sample ε (row r is sample r % n at radius r // n), and AutoAttack through pyautoattack."""
from __future__ import annotations

import time
from typing import List, Optional, Tuple

import torch

from .config import EvalConfig
from .results import AttackOutcome


def run_gradient_attack(model, x, y, clean_ok, attack: str, norm: str, eps_list: List[float], config: EvalConfig,
                        *, early_stop: bool, keep_eps: Optional[float] = None,
                        bar=None) -> Tuple[AttackOutcome, Optional[torch.Tensor]]:
    """(outcome, adversarial images at `keep_eps` or None) of fgsm / pgd-* at every radius of `eps_list`."""
    from aerl_fast.attacks import fgsm, pgd  # noqa: PLC0415

    n, K = x.shape[0], len(eps_list)
    dev = x.device
    eps_vals = torch.tensor(eps_list, dtype=torch.float32, device=dev)
    step_vals = torch.tensor([config.step_for(e) for e in eps_list], dtype=torch.float32, device=dev)
    fooled = torch.zeros(K * n, dtype=torch.bool, device=dev)
    keep_k = eps_list.index(keep_eps) if keep_eps is not None else None
    kept = torch.empty_like(x) if keep_k is not None else None
    evals = 0
    t0 = time.perf_counter()
    single = attack == "fgsm"
    for start in range(0, K * n, config.batch_size):
        rows = torch.arange(start, min(start + config.batch_size, K * n), device=dev)
        k, s = rows // n, rows % n
        xb, yb = x.index_select(0, s), y.index_select(0, s)
        # a single ε stays a float: no per-sample tensors, no host sync in the update
        eps_b = float(eps_list[0]) if K == 1 else eps_vals[k]
        step_b = float(config.step_for(eps_list[0])) if K == 1 else step_vals[k]  # not via float32: step == ε stays so
        if single:
            res = fgsm(model, xb, yb, eps=eps_b, norm=norm, clamp=config.clamp, loss=config.loss,
                       return_result=True)
        else:
            res = pgd(model, xb, yb, eps=eps_b, step=step_b, steps=config.steps, norm=norm,
                      random_start=config.random_start, early_stop=early_stop, clamp=config.clamp,
                      seed=config.seed, restarts=config.restarts, loss=config.loss, sample_ids=s,
                      return_result=True)
        fooled[rows] = res.fooled
        evals += res.grad_evals
        if kept is not None:
            sel = (k == keep_k).nonzero().squeeze(1)
            kept[s[sel]] = res.x_adv[sel]
        if bar is not None:
            bar.update(rows.numel())
    robust = (clean_ok.to(dev)[None, :] & ~fooled.view(K, n)).cpu()
    mode = "fgsm" if single else ("early-stop" if early_stop else "last-iterate")
    return AttackOutcome(attack, norm, list(eps_list), robust.double().mean(1).tolist(), robust, mode,
                         time.perf_counter() - t0, evals / (K * n)), kept


def run_autoattack(model, x, y, clean_ok, norm: str, eps_list: List[float], config: EvalConfig,
                   log=print, name: str = "") -> AttackOutcome:
    """pyautoattack at each radius (AutoAttack takes one ε per run); its log kept per radius."""
    from aerl_fast.attacks import autoattack  # noqa: PLC0415

    accs, masks, per_attack, logs = [], [], [], []
    t0 = time.perf_counter()
    for eps in eps_list:
        log(f"  autoattack {config.aa_version} {norm} eps {eps:g} on {name}")
        res = autoattack(model, x, y, eps=eps, norm=norm, version=config.aa_version,
                         attacks=list(config.aa_attacks) if config.aa_version == "custom" else None,
                         batch_size=config.batch_size, seed=config.seed)
        robust = (res.robust & clean_ok.to(res.robust.device)).cpu()
        accs.append(float(robust.double().mean()))
        masks.append(robust)
        per_attack.append(res.per_attack)
        logs.append(res.log)
    return AttackOutcome("autoattack", norm, list(eps_list), accs, torch.stack(masks),
                         f"autoattack-{config.aa_version}", time.perf_counter() - t0,
                         per_attack=per_attack, logs=logs)


def run_aa_fast(model, x, y, clean_ok, norm: str, eps_list: List[float], config: EvalConfig, *, amp: bool = False,
                dist=None, log=print, name: str = "") -> Optional[AttackOutcome]:
    """The AutoAttack-grade cascade at each radius (aerl_fast.attacks.autoattack_fast): per sample the
    stage that broke it and the passes it cost.  Under torchrun (`dist` enabled) every process
    attacks its shard and rank 0 gets the merged result (None on the other ranks)."""
    from aerl_fast.attacks import autoattack_fast, autoattack_fast_sharded  # noqa: PLC0415

    kw = dict(norm=norm, seed=config.seed, stages=config.aa_stages, budget=config.aa_budget, steps=config.aa_steps,
              queries=config.aa_queries, batch_size=config.batch_size, amp=amp, clamp=config.clamp)
    t0 = time.perf_counter()
    rows, per_attack, stages, broken_by, fw, bw, disagreements = [], [], [], [], [], [], 0
    for eps in eps_list:
        log(f"  aa-fast {norm} eps {eps:g} on {name}: {' -> '.join(config.aa_stages)} ({config.aa_budget} budget)")
        if dist is not None and dist.enabled:
            res = autoattack_fast_sharded(model, x, y, dist=dist, eps=eps, **kw)
            if res is None:
                continue
        else:
            res = autoattack_fast(model, x, y, eps=eps, return_adv=False, **kw)
        robust = res.robust.cpu() & clean_ok.cpu()
        rows.append(robust)
        left, after = int(res.clean.sum()), {}
        for rep in res.stages:
            left -= rep.broken
            after[rep.name] = left / robust.numel()
        per_attack.append(after)
        stages.append([vars(rep).copy() for rep in res.stages])
        broken_by.append(res.broken_by.cpu())
        fw.append(res.forwards.cpu())
        bw.append(res.backwards.cpu())
        disagreements += res.disagreements
    if not rows:
        return None
    robust = torch.stack(rows)
    out = AttackOutcome("aa-fast", norm, list(eps_list), robust.double().mean(1).tolist(), robust,
                        f"aa-fast-{config.aa_budget}", time.perf_counter() - t0, per_attack=per_attack)
    out.stages, out.disagreements = stages, disagreements
    out.per_sample = {"broken_by": torch.stack(broken_by), "forwards": torch.stack(fw), "backwards": torch.stack(bw),
                      "stage_names": list(config.aa_stages)}
    return out
