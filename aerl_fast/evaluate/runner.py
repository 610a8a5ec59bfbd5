"""The evaluation stage: `run(models, data, config, options) -> EvalResults`, writing no files."""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Dict, Optional, Sequence

import torch

from aerl_fast import runtime
from aerl_fast.errors import UserError
from aerl_fast.progress import bar_factory

from . import analyses
from .attack_runs import run_aa_fast, run_autoattack, run_gradient_attack
from .config import EvalConfig, EvalOptions, check_radius
from .inputs import ModelEntry, TestSet, data_key, describe_difference, given_test_set, load_entries, load_test_set
from .results import EvalResults, ModelResult, wilson

GRADIENT_ATTACKS = ("fgsm", "pgd-linf", "pgd-l2")


def _quiet(msg):
    pass


def run(models: Sequence, data=None, config: Optional[EvalConfig] = None, options: Optional[EvalOptions] = None,
        *, log=_quiet, dist=None) -> Optional[EvalResults]:
    """Attack every model (run folder, checkpoint file or nn.Module taking [0,1] images) on `data`
    ((x, y) tensors, or None for each run's own test split) as `config` says.

    dist: an `aerl_fast.distributed.DistContext` under torchrun: every process attacks its shard of
    the test set with aa-fast and rank 0 runs the rest and returns the results (None elsewhere)."""
    config = replace(config or EvalConfig()).validate()  # a checked copy: the caller's object is unchanged
    options = replace(options or EvalOptions()).validate()
    main = dist is None or dist.is_main
    if not main:
        log = _quiet
    device = dist.device(options.device) if dist is not None else runtime.resolve_device(options.device)
    if device.type == "cpu":
        runtime.keep_freed_memory()  # attacks allocate the same buffers every step
    torch.manual_seed(config.seed)
    if "autoattack" in config.attacks:
        from aerl_fast.attacks import load_autoattack  # noqa: PLC0415
        load_autoattack()  # fail before any work when the extra is missing
    grad = [a for a in config.attacks if a in GRADIENT_ATTACKS]
    pgd_attacks = [a for a in grad if a != "fgsm"]
    if config.transfer and not grad:
        raise UserError("--transfer needs fgsm, pgd-linf or pgd-l2 among --attack")
    if (config.dynamics or config.landscape) and not pgd_attacks:
        raise UserError("--dynamics and --landscape need pgd-linf or pgd-l2 among --attack")

    entries = load_entries(list(models), device, options.names, log)
    sets = _test_sets(entries, data, config, options, device)
    if config.verdict and len(entries) > 1 and len({e.data_key for e in entries}) == 1 and not config.transfer:
        config = replace(config, transfer=True)  # the verdict's transfer (from the SL twin among the others)
        log("--verdict: transfer between the models is run (the verdict's transfer check)")
    warnings = _check_threat_model(config, next(iter(sets.values())).x.shape[1:].numel())
    for w in warnings:
        log(f"warning: {w}")
    if config.transfer and len(entries) > 1:
        from aerl_fast.attacks import check_same_classes  # noqa: PLC0415
        check_same_classes({e.name: e.model for e in entries}, next(iter(sets.values())).x)
        if len({e.data_key for e in entries}) > 1:
            raise UserError(f"--transfer needs all models on the same test set: {describe_difference(entries)}")
    t_attack = (pgd_attacks or grad or [None])[0]
    t_eps = None
    if t_attack is not None:
        t_eps = config.transfer_eps if config.transfer_eps is not None else max(config.radii(t_attack))
        if t_attack != "fgsm" and config.step is not None and 0 < t_eps < config.step:
            raise UserError(f"--step {config.step:g} > --transfer-eps {t_eps:g}")
    make_bar = bar_factory(options.progress, unit="img")

    t_start = time.perf_counter()
    results, adversarials = [], {}
    for e in entries:
        results.append(_attack_model(e, sets[e.data_key], config, t_attack, t_eps, adversarials, make_bar, log,
                                     options.amp, dist))
    if not main:
        return None
    out = EvalResults(config, results, {_set_label(k, sets): ts.describe() for k, ts in sets.items()},
                      warnings=warnings, environment=runtime.environment(device))
    if config.transfer:
        ts = sets[entries[0].data_key]
        out.transfer = analyses.run_transfer(entries, results, ts, t_attack, config.norm_of(t_attack), t_eps, config,
                                             adversarials, make_bar, log)
    if config.dynamics:
        out.dynamics = analyses.run_dynamics(entries, sets, pgd_attacks[0], config.norm_of(pgd_attacks[0]),
                                             _analysis_eps(config, pgd_attacks[0]), config, make_bar, log)
    if config.landscape:
        out.landscapes = analyses.run_landscapes(entries, results, sets, pgd_attacks[0],
                                                 config.norm_of(pgd_attacks[0]), _analysis_eps(config, pgd_attacks[0]),
                                                 config, log)
    if config.masking:
        analyses.run_masking(entries, results, sets, out.transfer, config, log)
    if config.verdict:
        from .verdict_run import run_verdict, verdict_radius  # noqa: PLC0415
        v_eps, v_norm = verdict_radius(config)
        transfer = out.transfer if out.transfer is not None and out.transfer["eps"] == v_eps else None
        for e, r in zip(entries, results):
            run_verdict(e, r, sets[e.data_key], config, v_eps, v_norm, transfer, options.amp, log)
    out.seconds = time.perf_counter() - t_start
    from aerl_fast import kernels  # noqa: PLC0415
    out.environment["kernel_fallbacks"] = kernels.fallbacks()  # a broken GPU path is never hidden
    return out


def _test_sets(entries, data, config: EvalConfig, options: EvalOptions, device) -> Dict[tuple, TestSet]:
    if data is not None:
        ts = given_test_set(data, config.n_test, config.subset_seed, device)
        for e in entries:
            e.data_key = ("given",)
        sets = {("given",): ts}
    else:
        sets = {}
        for e in entries:
            e.data_key = data_key(e, options.data_dir)
            if e.data_key not in sets:
                sets[e.data_key] = load_test_set(e.data_key, config.n_test, config.subset_seed, device,
                                                 options.decoder)
    for e in entries:
        ts = sets[e.data_key]
        with torch.no_grad():
            out = e.fast(ts.x[:1])
        if out.dim() != 2:
            raise UserError(f"{e.name}: the model returns shape {tuple(out.shape)} for one image; it must return "
                            "logits [N, classes]")
        classes = int(out.shape[1])
        if data is None and classes != len(ts.classes):
            raise UserError(f"{e.name}: the model has {classes} classes but its test set ({e.data_key[0]}) has "
                            f"{len(ts.classes)}")
        if int(ts.y.max()) >= classes:
            raise UserError(f"{e.name}: label {int(ts.y.max())} but the model has {classes} classes")
        bad = [n for n, p in e.model.named_parameters() if not bool(torch.isfinite(p).all())]
        if bad:
            raise UserError(f"{e.name}: weights are not finite ({bad[0]}{' and others' if len(bad) > 1 else ''}): "
                            "a diverged model has no robustness to measure")
    return sets


def _set_label(key: tuple, sets) -> str:
    return key[0] if sum(1 for k in sets if k[0] == key[0]) == 1 else "/".join(map(str, key))


def _check_threat_model(config: EvalConfig, image_numel: int) -> list:
    """Radii against the image box, and attacks too short to reach their radius (warnings)."""
    warnings = []
    for a in config.attacks:
        norm = config.norm_of(a)
        for e in config.radii(a):
            check_radius(e, norm, "--eps", image_numel)
        if a.startswith("pgd"):
            for e in config.radii(a):
                reach = config.steps * config.step_for(e)
                need = (2.0 if config.random_start else 1.0) * e
                if reach < need - 1e-12:
                    warnings.append(f"{a} at eps {e:g}: {config.steps} steps of {config.step_for(e):g} move at most "
                                    f"{reach:g}, less than the {need:g} needed to reach every point of the ball"
                                    f"{' from a random start' if config.random_start else ''}: the attack is too weak "
                                    "for its radius (raise --steps or the step)")
    return warnings


def _analysis_eps(config: EvalConfig, attack: str) -> float:
    return config.transfer_eps if config.transfer_eps is not None else max(config.radii(attack))


def degenerate_reason(pred: torch.Tensor, y: torch.Tensor, classes: int) -> Optional[str]:
    """Why the model's numbers mean nothing, before any attack: (nearly) constant predictions, or a
    clean accuracy within noise of chance (the 95% Wilson interval reaches 1/classes)."""
    n = int(y.numel())
    counts = torch.bincount(pred.cpu(), minlength=classes)
    top = int(counts.argmax())
    share = float(counts[top]) / n
    data_share = float(torch.bincount(y.cpu(), minlength=classes).max()) / n
    if share >= 0.9 and share > data_share + 0.2:
        return (f"predicts class {top} for {share:.0%} of the images (the most frequent class holds {data_share:.0%}): "
                "a collapsed model; its robust accuracy is that of a constant")
    acc = float((pred == y).double().mean())
    lo, _ = wilson(acc * n, n)
    chance = 1.0 / classes
    if lo <= chance:
        return (f"clean accuracy {acc:.1%} on {n} images is within noise of chance ({chance:.1%}, 95% interval "
                "reaches it): nothing robust to measure")
    return None


def _attack_model(e: ModelEntry, ts: TestSet, config: EvalConfig, t_attack, t_eps, adversarials, make_bar,
                  log, amp: bool = False, dist=None) -> ModelResult:
    x, y = ts.x, ts.y
    with torch.no_grad():
        logits = torch.cat([e.fast(x[i:i + config.batch_size]) for i in range(0, x.shape[0], config.batch_size)])
    if not bool(torch.isfinite(logits).all()):
        raise UserError(f"{e.name}: the model's logits are not finite on the test images")
    pred = logits.argmax(1)
    clean_ok = pred == y
    r = ModelResult(e.name, e.path, e.objective, e.arch, e.data_key[0], clean_ok.cpu(),
                    width=e.spec.get("width"))
    lo, hi = r.clean_interval()
    log(f"{e.name} ({e.objective}): clean accuracy {r.clean_acc:.2%} [{lo:.1%}, {hi:.1%}] on {x.shape[0]} images")
    r.degenerate = degenerate_reason(pred, y, logits.shape[1])
    if r.degenerate:
        log(f"  DEGENERATE {e.name}: {r.degenerate}")
    for a in config.attacks:
        norm, radii = config.norm_of(a), list(config.radii(a))
        label = config.label_of(a)
        if a == "aa-fast":
            out = run_aa_fast(e.model, x, y, clean_ok, norm, radii, config, amp=amp, dist=dist, log=log, name=e.name)
            if out is None:  # not rank 0: the shard is done
                continue
            r.attacks[label] = out
        elif dist is not None and not dist.is_main:
            continue  # only aa-fast is sharded; rank 0 runs the other attacks
        elif a == "autoattack":
            r.attacks[label] = run_autoattack(e.model, x, y, clean_ok, norm, radii, config, log, e.name)
        else:
            keep = t_eps if (config.transfer and a == t_attack and t_eps in radii
                             and (a == "fgsm" or not config.early_stop)) else None
            with make_bar(len(radii) * x.shape[0], f"{e.name} {a}") as bar:
                out, adv = run_gradient_attack(e.fast, x, y, clean_ok, a, norm, radii, config,
                                               early_stop=config.early_stop, keep_eps=keep, bar=bar)
            if keep is not None:
                adversarials[e.name] = adv
            r.attacks[label] = out
        out = r.attacks[label]
        log(f"  {label} ({out.mode}): " + ", ".join(f"eps {ep:g}: {acc:.2%}" for ep, acc in zip(out.eps, out.acc))
            + f"  [{out.seconds:.1f}s]")
    single, multi = r.attacks.get("fgsm"), r.attacks.get("pgd-linf")
    if single is not None and multi is not None:
        for eps in sorted(set(single.eps) & set(multi.eps)):
            if single.acc_at(eps) < multi.acc_at(eps) - 0.01:
                log(f"  warning {e.name}: FGSM leaves {single.acc_at(eps):.1%} at eps {eps:g} where PGD leaves "
                    f"{multi.acc_at(eps):.1%}: a single step beats the iterative attack (masking or a weak PGD)")
    return r
