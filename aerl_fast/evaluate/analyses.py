"""The analyses over a set of attacked models: transfer matrix, gradient dynamics during PGD, loss
landscapes and the gradient-masking checks.  Each returns values; nothing here writes a file."""
from __future__ import annotations

from typing import Dict, List

import torch

from .attack_runs import run_gradient_attack
from .config import EvalConfig
from .inputs import ModelEntry, TestSet
from .results import ModelResult


def run_transfer(entries: List[ModelEntry], results: List[ModelResult], ts: TestSet, attack: str, norm: str,
                 eps: float, config: EvalConfig, adversarials: Dict[str, torch.Tensor], make_bar, log) -> dict:
    """Images crafted on each model (last-iterate PGD or FGSM at `eps`), accuracy of every model on them."""
    from aerl_fast.attacks import transfer_matrix  # noqa: PLC0415

    mode = "fgsm" if attack == "fgsm" else "last-iterate PGD"
    log(f"transfer matrix: {attack} eps {eps:g} ({mode})")
    for e, r in zip(entries, results):
        if e.name not in adversarials:
            with make_bar(ts.x.shape[0], f"craft {e.name}") as bar:
                _, adv = run_gradient_attack(e.fast, ts.x, ts.y, r.clean_ok, attack, norm, [eps], config,
                                             early_stop=False, keep_eps=eps, bar=bar)
            adversarials[e.name] = adv
    res = transfer_matrix({e.name: e.fast for e in entries}, ts.x, ts.y, attack=None,
                          batch_size=config.batch_size, adversarials=adversarials)
    return {"attack": attack, "norm": norm, "eps": eps, "mode": mode, "names": res.names,
            "accuracy": res.accuracy.tolist(), "clean": res.clean.tolist(),
            "robust": res.robust,  # [N, N, n] bool per sample (the verdict's transfer breaks; not in the JSON)
            "note": "row: model the images were crafted on; column: model evaluated; entry: share of samples "
                    "correct both clean and on the crafted images; the diagonal is the white-box "
                    f"{mode} robust accuracy"}


def run_dynamics(entries: List[ModelEntry], sets: Dict, attack: str, norm: str, eps: float, config: EvalConfig,
                 make_bar, log) -> dict:
    from aerl_fast.analysis.dynamics import gradient_dynamics  # noqa: PLC0415

    out = {}
    for e in entries:
        ts = sets[e.data_key]
        n = min(config.dynamics_n, ts.x.shape[0])
        with make_bar(n, f"dynamics {e.name}") as bar:
            out[e.name] = gradient_dynamics(
                e.fast, ts.x[:n], ts.y[:n], eps=eps, step=config.step_for(eps), steps=config.steps, norm=norm,
                clamp=config.clamp, random_start=config.random_start, seed=config.seed,
                batch_size=config.batch_size, loss=config.loss, progress=bar.update)
        s = out[e.name]["summary"]
        log(f"  dynamics {e.name}: |g| {_fmt(s['norm'])} (mean-reduced {_fmt(s['norm_mean_reduced'])}), "
            f"cos {_fmt(s['cos'])}, sign {_fmt(s['sign_agree'])}, dispersion {_fmt(s['dispersion'])}, "
            f"over-time {_fmt(s['over_time_dispersion'])}")
    return {"attack": attack, "eps": eps, "steps": config.steps, "models": out}


def run_landscapes(entries: List[ModelEntry], results: List[ModelResult], sets: Dict, attack: str, norm: str,
                   eps: float, config: EvalConfig, log) -> dict:
    from aerl_fast.analysis.landscape import loss_landscape  # noqa: PLC0415
    from aerl_fast.attacks import pgd  # noqa: PLC0415

    payload = {}
    for e, r in zip(entries, results):
        ts = sets[e.data_key]
        idx = r.clean_ok.to(ts.x.device).nonzero().squeeze(1)[:config.landscape]
        if idx.numel() == 0:
            log(f"  landscape {e.name}: no correctly classified sample, skipped")
            continue
        xs, ys = ts.x[idx], ts.y[idx]
        x_adv = pgd(e.fast, xs, ys, eps=eps, step=config.step_for(eps), steps=config.steps, norm=norm,
                    random_start=config.random_start, early_stop=False, clamp=config.clamp, seed=config.seed,
                    loss=config.loss, sample_ids=idx)
        lands = loss_landscape(e.fast, xs, ys, x_adv, grid=config.landscape_grid, seed=config.seed,
                               batch_size=max(config.batch_size, 256))
        payload[e.name] = {str(i): land for i, land in zip(idx.tolist(), lands)}
        log(f"  landscape {e.name}: {len(lands)} samples")
    return {"attack": attack, "eps": eps, "models": payload}


def run_masking(entries: List[ModelEntry], results: List[ModelResult], sets: Dict, transfer, config: EvalConfig,
                log) -> None:
    """The gradient-masking checks of each model, stored in its ModelResult."""
    from aerl_fast.analysis import masking as mk  # noqa: PLC0415
    from aerl_fast.attacks import autoattack, autoattack_available  # noqa: PLC0415

    grad = [a for a in config.attacks if a in ("fgsm", "pgd-linf", "pgd-l2")]
    for e, r in zip(entries, results):
        ts = sets[e.data_key]
        x, y = ts.x, ts.y
        flags = []
        zero = mk.zero_gradient_count(e.fast, x, y, loss=config.loss, batch_size=config.batch_size)
        flags.append(mk.check_zero_gradients(zero, x.shape[0], config.loss))
        if transfer is not None and len(transfer["names"]) > 1:
            j = transfer["names"].index(e.name)
            column = {src: transfer["accuracy"][i][j] for i, src in enumerate(transfer["names"])}
            flags.append(mk.check_transfer(e.name, transfer["accuracy"][j][j], column))
        else:
            flags.append(mk.MaskingFlag("transfer", None, "needs --transfer and two or more models"))
        if grad:
            a = grad[0]
            out = r.attacks[a]
            idx = r.clean_ok.to(x.device).nonzero().squeeze(1)[:100]
            large = mk.large_epsilon(out.norm, x.shape[1:])
            large_acc = None
            if idx.numel():
                large_acc = mk.large_epsilon_accuracy(e.fast, x[idx], y[idx], norm=out.norm, steps=config.steps,
                                                      clamp=config.clamp, loss=config.loss,
                                                      batch_size=config.batch_size)
            flags.append(mk.check_epsilon_curve(out.eps, out.acc, large, large_acc, int(idx.numel())))
            sub = torch.arange(min(100, x.shape[0]), device=x.device)
            if config.square_queries <= 0:
                flags.append(mk.check_gradient_free(None, None, why_not="pass --square-queries N (needs pyautoattack)"))
            elif not autoattack_available():
                flags.append(mk.check_gradient_free(None, None, why_not="pyautoattack is not installed "
                                                    "(pip install 'aerl_fast[autoattack]')"))
            else:
                eps = max(out.eps)
                log(f"  masking {e.name}: Square ({config.square_queries} queries) at eps {eps:g} on {sub.numel()} "
                    "samples")
                sq = autoattack(e.model, x[sub], y[sub], eps=eps, norm=out.norm, version="custom", attacks=["square"],
                                batch_size=config.batch_size, seed=config.seed, square_queries=config.square_queries)
                r.logs["square"] = sq.log
                grad_acc = float(out.robust[out.eps.index(eps)][sub.cpu()].double().mean())
                flags.append(mk.check_gradient_free(float(sq.robust.double().mean()), grad_acc, n=sub.numel()))
        r.masking = flags
        for f in flags:
            log(f"  masking {e.name} {f.check}: {f.label}: {f.observed}")


def _fmt(v):
    return "n/a" if v is None else f"{v:.3g}"
