"""Robustness evaluation of trained models: the study's tables and plots from run folders.

    python -m aerl_fast.evaluate runs/sl runs/rl --attack pgd-l2 --eps 0.25 0.5 1.0 --steps 100 \
        --transfer --dynamics --landscape 4 --out results/cmp

For every model (a run folder or a checkpoint): clean accuracy on the first --n-test images of its
test split, robust accuracy under each attack at each ε (all ε of an attack run as ONE batched
attack with per-sample ε), optionally the transfer matrix, the gradient dynamics during PGD, loss
landscapes, and the gradient-masking checks. Writes to --out:

    metrics.json, results.md, results.csv        the table (also printed)
    transfer.{md,csv,png}                         with --transfer
    dynamics.json, dynamics.png                   with --dynamics
    robustness_curve.png                          when an attack has several ε
    landscape/<model>_sample<i>.png, landscape.json   with --landscape N
    autoattack/<model>_<norm>_eps<e>.log          with --attack autoattack

Robust accuracy = the share of samples classified correctly both clean and under attack. Attack
loss: cross-entropy on the true label, summed over samples, for SL and RL models alike (the RL
policy is softmax(logits), so this is -log pi(label|x); the study also attacks RL models with CE
on logits); --loss margin uses the logit margin instead.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from aerl_fast import runtime
from aerl_fast.config import DECODERS
from aerl_fast.errors import UserError

ATTACK_NAMES = ("fgsm", "pgd-linf", "pgd-l2", "autoattack")


@dataclass
class AttackSpec:
    name: str            # fgsm | pgd-linf | pgd-l2 | autoattack
    norm: str            # linf | l2
    eps: List[float]

    @property
    def kind(self) -> str:
        return self.name.split("-")[0]

    @property
    def label(self) -> str:
        return f"{self.name}-{self.norm}" if self.name == "autoattack" else self.name


@dataclass
class ModelEntry:
    name: str
    path: str
    model: torch.nn.Module   # as load_model gives it (NCHW): what peer libraries (AutoAttack) get
    spec: dict
    config: dict
    objective: str
    data_key: tuple = ()
    results: Dict[str, dict] = field(default_factory=dict)
    masking: list = field(default_factory=list)
    clean_acc: float = float("nan")
    clean_ok: Optional[torch.Tensor] = None
    fast: Optional[torch.nn.Module] = None  # the same weights laid out for our own attacks

    def __post_init__(self):
        if self.fast is None:
            self.fast = runtime.fast_eval_copy(self.model)


# ------------------------------------------------------------------------------------------ CLI

def _floats(tokens, flag) -> List[float]:
    out = []
    for tok in tokens:
        for part in str(tok).split(","):
            if part.strip():
                try:
                    out.append(float(part))
                except ValueError:
                    raise UserError(f"{flag}: not a number: {part!r}") from None
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m aerl_fast.evaluate",
        description="Robustness of trained models: attacks, transfer matrix, gradient dynamics, "
                    "loss landscapes, gradient-masking checks.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR",
                   help="run folders (best.pt, else last.pt) or checkpoint files")
    p.add_argument("--attack", nargs="+", default=["pgd-l2"],
                   help=f"attacks, space- or comma-separated: {', '.join(ATTACK_NAMES)}")
    p.add_argument("--eps", nargs="+", default=["1.0"],
                   help="radii (several: a robustness curve, run as one batched attack); "
                        "L2 distance in [0,1] pixel space for L2 attacks")
    p.add_argument("--linf-eps", nargs="+", default=None,
                   help="radii for the L-inf attacks (fgsm, pgd-linf, autoattack with --aa-norm "
                        "linf); default: --eps")
    step = p.add_mutually_exclusive_group()
    step.add_argument("--step", type=float, default=None, help="absolute PGD step size")
    step.add_argument("--rel-step", type=float, default=None,
                      help="PGD step as a fraction of each eps (default 0.1: eps 1.0 -> step 0.1, "
                           "the study's preset)")
    p.add_argument("--steps", type=int, default=100, help="PGD steps")
    p.add_argument("--restarts", type=int, default=1, help="PGD random restarts")
    p.add_argument("--random-start", action=argparse.BooleanOptionalAction, default=True,
                   help="start PGD at a random point of the eps-ball")
    p.add_argument("--clamp", action=argparse.BooleanOptionalAction, default=True,
                   help="keep adversarial images in [0,1]; --no-clamp is the study's preset")
    stop = p.add_mutually_exclusive_group()
    stop.add_argument("--early-stop", dest="early_stop", action="store_true", default=True,
                      help="a sample is broken the first time any PGD iterate fools the model "
                           "(at least as strong as last-iterate, faster)")
    stop.add_argument("--last-iterate", dest="early_stop", action="store_false",
                      help="judge only PGD's last iterate (the study's and torchattacks' way)")
    p.add_argument("--loss", choices=("ce", "margin"), default="ce",
                   help="attack loss: cross-entropy on the label, or the logit margin")
    p.add_argument("--n-test", type=int, default=1000, help="first N test images")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--seed", type=int, default=0, help="random starts, landscape directions")
    p.add_argument("--out", default=None, help="results folder (default results/eval-<time>)")
    p.add_argument("--data-dir", default=None,
                   help="dataset folder, overriding the one recorded in each run's config")
    p.add_argument("--decoder", choices=DECODERS, default="auto",
                   help="image-folder decoder, when the test split is not cached yet: pil (Pillow), dali "
                        "(NVIDIA DALI; nvJPEG when --device is CUDA) or auto (DALI when installed)")
    p.add_argument("--transfer", action="store_true",
                   help="N x N transfer matrix (craft on A, evaluate on B), last-iterate PGD")
    p.add_argument("--transfer-eps", type=float, default=None,
                   help="eps of the transfer (and dynamics/landscape) attack; default the largest")
    p.add_argument("--dynamics", action="store_true",
                   help="gradient statistics per PGD step (norm, cosine, sign consistency, dispersion)")
    p.add_argument("--dynamics-n", type=int, default=256, help="samples for --dynamics")
    p.add_argument("--landscape", type=int, default=0, metavar="N",
                   help="loss-landscape PNGs for the first N correctly classified samples")
    p.add_argument("--landscape-grid", type=int, default=21, help="grid points per axis")
    p.add_argument("--aa-version", default="standard", choices=("standard", "plus", "rand", "custom"))
    p.add_argument("--aa-attacks", nargs="+", default=None,
                   help="AutoAttack attacks for --aa-version custom (apgd-ce apgd-t fab-t square ...)")
    p.add_argument("--aa-norm", choices=("linf", "l2"), default="l2", help="AutoAttack threat model")
    p.add_argument("--square-queries", type=int, default=0,
                   help="masking check: Square attack with this many queries (0: skip; needs "
                        "pyautoattack)")
    p.add_argument("--masking", action=argparse.BooleanOptionalAction, default=True,
                   help="gradient-masking checks")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    attacks = []
    for tok in args.attack:
        attacks += [a.strip().lower() for a in tok.split(",") if a.strip()]
    unknown = [a for a in attacks if a not in ATTACK_NAMES]
    if unknown or not attacks:
        raise UserError(f"unknown attack {', '.join(unknown) or '(none)'}; choose from {', '.join(ATTACK_NAMES)}")
    eps = _floats(args.eps, "--eps")
    linf_eps = _floats(args.linf_eps, "--linf-eps") if args.linf_eps else eps
    for flag, values in (("--eps", eps), ("--linf-eps", linf_eps)):
        if not values:
            raise UserError(f"{flag}: give at least one radius")
        bad = [v for v in values if not (v >= 0 and math.isfinite(v))]
        if bad:
            raise UserError(f"{flag} must be >= 0, got {bad[0]:g}")
    specs = []
    for a in dict.fromkeys(attacks):
        norm = {"fgsm": "linf", "pgd-linf": "linf", "pgd-l2": "l2", "autoattack": args.aa_norm}[a]
        specs.append(AttackSpec(a, norm, sorted(set(linf_eps if norm == "linf" else eps))))
    args.specs = specs
    for flag, v, lo in (("--steps", args.steps, 1), ("--restarts", args.restarts, 1),
                        ("--n-test", args.n_test, 1), ("--batch-size", args.batch_size, 1),
                        ("--dynamics-n", args.dynamics_n, 1), ("--landscape", args.landscape, 0),
                        ("--landscape-grid", args.landscape_grid, 2),
                        ("--square-queries", args.square_queries, 0)):
        if v < lo:
            raise UserError(f"{flag} must be >= {lo}, got {v}")
    if args.step is not None and not (args.step > 0 and math.isfinite(args.step)):
        raise UserError(f"--step must be > 0, got {args.step:g}")
    if args.rel_step is not None and not 0 < args.rel_step <= 1:
        raise UserError(f"--rel-step must be in (0, 1], got {args.rel_step:g}")
    if args.step is not None:
        for s in specs:
            if s.kind == "pgd":
                too_small = [e for e in s.eps if 0 < e < args.step]
                if too_small:
                    raise UserError(f"--step {args.step:g} > eps {too_small[0]:g} ({s.name}): the step must "
                                    "not exceed the radius; lower --step or use --rel-step")
    if args.transfer_eps is not None and args.transfer_eps < 0:
        raise UserError(f"--transfer-eps must be >= 0, got {args.transfer_eps:g}")
    if args.aa_version == "custom" and "autoattack" in attacks and not args.aa_attacks:
        raise UserError("--aa-version custom needs --aa-attacks")
    return args


def step_for(args, eps: float) -> float:
    """PGD step for radius eps: --step, else --rel-step (default 0.1) times eps."""
    if args.step is not None:
        return args.step
    return (args.rel_step if args.rel_step is not None else 0.1) * eps


# -------------------------------------------------------------------------------------- loading

def load_entries(paths, device) -> List[ModelEntry]:
    from aerl_fast.checkpoint import load_model, resolve_checkpoint  # noqa: PLC0415

    entries, seen = [], {}
    for raw in paths:
        ckpt = resolve_checkpoint(raw)
        model = load_model(raw, device=device)
        run_dir = Path(raw) if Path(raw).is_dir() else ckpt.parent
        name = run_dir.name if Path(raw).is_dir() else f"{ckpt.parent.name}/{ckpt.stem}"
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            name = f"{name}#{seen[name]}"
        objective = model.aerl_config.get("objective", "?")
        summary = run_dir / "summary.json"
        if summary.is_file():
            try:
                objective = json.loads(summary.read_text()).get("objective", objective)
            except (json.JSONDecodeError, OSError):
                pass
        entries.append(ModelEntry(name, str(raw), model, dict(model.aerl_spec), dict(model.aerl_config),
                                  str(objective)))
    return entries


def data_key(entry: ModelEntry, data_dir_override) -> tuple:
    cfg = entry.config
    if "dataset" not in cfg:
        raise UserError(f"{entry.path}: the checkpoint carries no training config, so its test set "
                        "is unknown")
    name = cfg["dataset"]
    return (name, data_dir_override if data_dir_override is not None else cfg.get("data_dir"),
            cfg.get("labels", "fine"), int(cfg.get("image_size", entry.spec.get("image_size", 32))),
            int(cfg.get("seed", 0)) if name == "shapes" else 0)


def load_test_set(key, n_test, device, decoder: str = "auto"):
    from aerl_fast.data import load_dataset  # noqa: PLC0415

    name, data_dir, labels, image_size, seed = key
    ds = load_dataset(name, data_dir, "test", labels=labels, image_size=image_size, seed=seed,
                      decoder=decoder, decode_device=device)
    if len(ds.labels) == 0:
        raise UserError(f"empty dataset: the {name} test split holds no images")
    n = min(n_test, len(ds.labels))
    x = torch.from_numpy(np.array(ds.images[:n], dtype=np.uint8)).to(device)
    x = x.permute(0, 3, 1, 2).float().div_(255.0).contiguous()
    y = torch.from_numpy(np.array(ds.labels[:n], dtype=np.int64)).to(device)
    return x, y, list(ds.classes)


def predict(model, x, batch_size) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, x.shape[0], batch_size)])


# -------------------------------------------------------------------------------------- attacks

def run_gradient_attack(model, x, y, clean_ok, spec: AttackSpec, eps_list, args, *,
                        early_stop: bool, keep_eps: Optional[float] = None, bar=None) -> dict:
    """All ε of one attack as one batched attack: row r is sample r % n at ε index r // n.

    Returns robust accuracy per ε, the robust masks, and the adversarial images at `keep_eps`."""
    from aerl_fast.attacks import fgsm, pgd  # noqa: PLC0415

    n, K = x.shape[0], len(eps_list)
    dev = x.device
    eps_vals = torch.tensor(eps_list, dtype=torch.float32, device=dev)
    step_vals = torch.tensor([step_for(args, e) for e in eps_list], dtype=torch.float32, device=dev)
    fooled = torch.zeros(K * n, dtype=torch.bool, device=dev)
    keep_k = eps_list.index(keep_eps) if keep_eps is not None else None
    kept = torch.empty_like(x) if keep_k is not None else None
    evals = 0
    t0 = time.perf_counter()
    for start in range(0, K * n, args.batch_size):
        rows = torch.arange(start, min(start + args.batch_size, K * n), device=dev)
        k, s = rows // n, rows % n
        xb, yb = x.index_select(0, s), y.index_select(0, s)
        # a single ε stays a float: no per-sample tensors, no host sync in the update
        eps_b = float(eps_list[0]) if K == 1 else eps_vals[k]
        step_b = float(step_vals[0]) if K == 1 else step_vals[k]
        if spec.kind == "fgsm":
            res = fgsm(model, xb, yb, eps=eps_b, norm=spec.norm, clamp=args.clamp, loss=args.loss,
                       return_result=True)
        else:
            res = pgd(model, xb, yb, eps=eps_b, step=step_b, steps=args.steps, norm=spec.norm,
                      random_start=args.random_start, early_stop=early_stop, clamp=args.clamp,
                      seed=args.seed, restarts=args.restarts, loss=args.loss, sample_ids=s,
                      return_result=True)
        fooled[rows] = res.fooled
        evals += res.grad_evals
        if kept is not None:
            sel = (k == keep_k).nonzero().squeeze(1)
            kept[s[sel]] = res.x_adv[sel]
        if bar is not None:
            bar.update(rows.numel())
    robust = clean_ok[None, :] & ~fooled.view(K, n)
    return {"eps": list(eps_list), "acc": robust.double().mean(1).cpu().tolist(),
            "robust": robust, "grad_evals_per_sample": evals / (K * n),
            "seconds": time.perf_counter() - t0, "x_adv": kept,
            "mode": "fgsm" if spec.kind == "fgsm" else ("early-stop" if early_stop else "last-iterate")}


def run_autoattack(entry, x, y, spec: AttackSpec, args, out_dir: Path, log) -> dict:
    from aerl_fast.attacks import autoattack  # noqa: PLC0415

    accs, masks, per_attack = [], [], []
    t0 = time.perf_counter()
    log_dir = out_dir / "autoattack"
    log_dir.mkdir(parents=True, exist_ok=True)
    for eps in spec.eps:
        path = log_dir / f"{_safe(entry.name)}_{spec.norm}_eps{eps:g}.log"
        log(f"  autoattack {args.aa_version} {spec.norm} eps {eps:g} on {entry.name} (log: {path})")
        res = autoattack(entry.model, x, y, eps=eps, norm=spec.norm, version=args.aa_version,
                         attacks=args.aa_attacks if args.aa_version == "custom" else None,
                         batch_size=args.batch_size, seed=args.seed, log_path=path)
        accs.append(float(res.robust.double().mean()))
        masks.append(res.robust)
        per_attack.append(res.per_attack)
    return {"eps": list(spec.eps), "acc": accs, "robust": torch.stack(masks),
            "per_attack": per_attack, "seconds": time.perf_counter() - t0, "x_adv": None,
            "mode": f"autoattack-{args.aa_version}", "grad_evals_per_sample": None}


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


# ------------------------------------------------------------------------------------- evaluate

def evaluate(args, log=print) -> dict:
    try:
        device = runtime.resolve_device(args.device)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if device.type == "cpu":
        runtime.keep_freed_memory()  # attacks allocate the same buffers every step
    torch.manual_seed(args.seed)
    out = Path(args.out) if args.out else Path("results") / f"eval-{time.strftime('%Y%m%d-%H%M%S')}"
    specs: List[AttackSpec] = args.specs
    if "autoattack" in [s.name for s in specs]:
        from aerl_fast.attacks import load_autoattack  # noqa: PLC0415
        load_autoattack()  # fail before any work when the extra is missing
    grad_specs = [s for s in specs if s.kind in ("fgsm", "pgd")]
    pgd_specs = [s for s in specs if s.kind == "pgd"]
    if args.transfer and not grad_specs:
        raise UserError("--transfer needs fgsm, pgd-linf or pgd-l2 among --attack")
    if (args.dynamics or args.landscape) and not pgd_specs:
        raise UserError("--dynamics and --landscape need pgd-linf or pgd-l2 among --attack")

    entries = load_entries(args.runs, device)
    data: Dict[tuple, tuple] = {}
    for e in entries:
        e.data_key = data_key(e, args.data_dir)
        if e.data_key not in data:
            data[e.data_key] = load_test_set(e.data_key, args.n_test, device, getattr(args, "decoder", "auto"))
        classes = data[e.data_key][2]
        if len(classes) != e.spec["num_classes"]:
            raise UserError(f"{e.name}: the model has {e.spec['num_classes']} classes but its test set "
                            f"({e.data_key[0]}) has {len(classes)}")
    if args.transfer and len(entries) > 1:
        from aerl_fast.attacks import check_same_classes  # noqa: PLC0415
        check_same_classes({e.name: e.model for e in entries})
        if len({e.data_key for e in entries}) > 1:
            listing = ", ".join(f"{e.name}: {e.data_key[0]}" for e in entries)
            raise UserError(f"--transfer needs all models on the same test set ({listing})")

    t_spec = (pgd_specs or grad_specs or [None])[0]
    t_eps = None
    if t_spec is not None:
        t_eps = args.transfer_eps if args.transfer_eps is not None else max(t_spec.eps)
        if t_spec.kind == "pgd" and args.step is not None and 0 < t_eps < args.step:
            raise UserError(f"--step {args.step:g} > --transfer-eps {t_eps:g}")

    out.mkdir(parents=True, exist_ok=True)  # only once the inputs are known to be good

    from tqdm import tqdm  # noqa: PLC0415

    def make_bar(total, desc):
        return tqdm(total=total, desc=desc, unit="img", leave=False, file=sys.stderr,
                    disable=not args.progress, dynamic_ncols=True)

    adversarials: Dict[str, torch.Tensor] = {}
    t_start = time.perf_counter()
    for e in entries:
        x, y, _ = data[e.data_key]
        clean_ok = predict(e.fast, x, args.batch_size) == y
        e.clean_acc = float(clean_ok.double().mean())
        e.clean_ok = clean_ok
        log(f"{e.name} ({e.objective}): clean accuracy {e.clean_acc:.2%} on {x.shape[0]} images")
        for s in specs:
            if s.kind == "autoattack":
                e.results[s.label] = run_autoattack(e, x, y, s, args, out, log)
            else:
                keep = t_eps if (args.transfer and s is t_spec and t_eps in s.eps
                                 and (s.kind == "fgsm" or not args.early_stop)) else None
                with make_bar(len(s.eps) * x.shape[0], f"{e.name} {s.name}") as bar:
                    r = run_gradient_attack(e.fast, x, y, clean_ok, s, s.eps, args,
                                            early_stop=args.early_stop, keep_eps=keep, bar=bar)
                if keep is not None:
                    adversarials[e.name] = r["x_adv"]
                r["x_adv"] = None
                e.results[s.label] = r
            r = e.results[s.label]
            log(f"  {s.label} ({r['mode']}): " + ", ".join(
                f"eps {ep:g}: {a:.2%}" for ep, a in zip(r["eps"], r["acc"])) + f"  [{r['seconds']:.1f}s]")

    transfer = None
    if args.transfer:
        transfer = run_transfer(entries, data, t_spec, t_eps, args, adversarials, make_bar, out, log)

    dynamics = None
    if args.dynamics:
        dynamics = run_dynamics(entries, data, pgd_specs[0], t_eps_for(pgd_specs[0], args), args,
                                make_bar, out, log)
    if args.landscape:
        run_landscapes(entries, data, pgd_specs[0], t_eps_for(pgd_specs[0], args), args, out, log)
    if args.masking:
        run_masking(entries, data, grad_specs, transfer, args, out, log)

    metrics = write_results(entries, specs, transfer, dynamics, args, out, time.perf_counter() - t_start)
    print(metrics["table_md"])
    log(f"results in {out}")
    return metrics


def t_eps_for(spec: AttackSpec, args) -> float:
    return args.transfer_eps if args.transfer_eps is not None else max(spec.eps)


def run_transfer(entries, data, t_spec, t_eps, args, adversarials, make_bar, out, log):
    from aerl_fast.attacks import transfer_matrix  # noqa: PLC0415

    mode = "fgsm" if t_spec.kind == "fgsm" else "last-iterate PGD"
    log(f"transfer matrix: {t_spec.name} eps {t_eps:g} ({mode})")
    key = entries[0].data_key
    x, y, _ = data[key]
    for e in entries:
        if e.name not in adversarials:
            with make_bar(x.shape[0], f"craft {e.name}") as bar:
                r = run_gradient_attack(e.fast, x, y, e.clean_ok, t_spec, [t_eps], args,
                                        early_stop=False, keep_eps=t_eps, bar=bar)
            adversarials[e.name] = r["x_adv"]
    res = transfer_matrix({e.name: e.fast for e in entries}, x, y, attack=None,
                          batch_size=args.batch_size, adversarials=adversarials)
    info = {"attack": t_spec.name, "norm": t_spec.norm, "eps": t_eps, "mode": mode,
            "names": res.names, "accuracy": res.accuracy.tolist(), "clean": res.clean.tolist(),
            "note": "row: model the images were crafted on; column: model evaluated; entry: share "
                    "of samples correct both clean and on the crafted images; the diagonal is the "
                    f"white-box {mode} robust accuracy"}
    write_transfer(info, out)
    return info


def run_dynamics(entries, data, spec, eps, args, make_bar, out, log):
    from aerl_fast.analysis.dynamics import gradient_dynamics, plot_dynamics  # noqa: PLC0415

    results = {}
    for e in entries:
        x, y, _ = data[e.data_key]
        n = min(args.dynamics_n, x.shape[0])
        with make_bar(n, f"dynamics {e.name}") as bar:
            results[e.name] = gradient_dynamics(
                e.fast, x[:n], y[:n], eps=eps, step=step_for(args, eps), steps=args.steps,
                norm=spec.norm, clamp=args.clamp, random_start=args.random_start, seed=args.seed,
                batch_size=args.batch_size, loss=args.loss, progress=bar.update)
        s = results[e.name]["summary"]
        log(f"  dynamics {e.name}: |g| {s['norm']:.4g} (mean-reduced {s['norm_mean_reduced']:.3g}), "
            f"cos {_fmt(s['cos'])}, sign {_fmt(s['sign_agree'])}, dispersion {_fmt(s['dispersion'])}, "
            f"over-time {_fmt(s['over_time_dispersion'])}")
    payload = {"attack": spec.name, "eps": eps, "models": results}
    (out / "dynamics.json").write_text(json.dumps(payload, indent=2) + "\n")
    plot_dynamics(results, out / "dynamics.png",
                  title=f"{spec.name} eps {eps:g}, {args.steps} steps: per-step input-gradient statistics "
                        "(per-sample loss)")
    return payload


def run_landscapes(entries, data, spec, eps, args, out, log):
    from aerl_fast.analysis.landscape import loss_landscape, plot_landscape  # noqa: PLC0415
    from aerl_fast.attacks import pgd  # noqa: PLC0415

    folder = out / "landscape"
    folder.mkdir(parents=True, exist_ok=True)
    payload = {}
    for e in entries:
        x, y, _ = data[e.data_key]
        idx = e.clean_ok.nonzero().squeeze(1)[:args.landscape]
        if idx.numel() == 0:
            log(f"  landscape {e.name}: no correctly classified sample, skipped")
            continue
        xs, ys = x[idx], y[idx]
        x_adv = pgd(e.fast, xs, ys, eps=eps, step=step_for(args, eps), steps=args.steps,
                    norm=spec.norm, random_start=args.random_start, early_stop=False,
                    clamp=args.clamp, seed=args.seed, loss=args.loss, sample_ids=idx)
        lands = loss_landscape(e.fast, xs, ys, x_adv, grid=args.landscape_grid, seed=args.seed,
                               batch_size=max(args.batch_size, 256))
        payload[e.name] = {}
        for i, land in zip(idx.tolist(), lands):
            path = folder / f"{_safe(e.name)}_sample{i}.png"
            plot_landscape(land, path, title=f"{e.name} ({e.objective}) sample {i}: label {land['label']}, "
                                             f"adversarial -> {land['adv_pred']}")
            payload[e.name][str(i)] = land
        log(f"  landscape {e.name}: {len(lands)} PNGs in {folder}")
    (out / "landscape.json").write_text(json.dumps({"attack": spec.name, "eps": eps, "models": payload}) + "\n")


def run_masking(entries, data, grad_specs, transfer, args, out, log):
    from aerl_fast.analysis import masking as mk  # noqa: PLC0415
    from aerl_fast.attacks import autoattack, autoattack_available  # noqa: PLC0415

    g_spec = grad_specs[0] if grad_specs else None
    for e in entries:
        x, y, _ = data[e.data_key]
        flags = []
        zero = mk.zero_gradient_count(e.fast, x, y, loss=args.loss, batch_size=args.batch_size)
        flags.append(mk.check_zero_gradients(zero, x.shape[0], args.loss))
        if transfer is not None and len(transfer["names"]) > 1:
            j = transfer["names"].index(e.name)
            column = {src: transfer["accuracy"][i][j] for i, src in enumerate(transfer["names"])}
            flags.append(mk.check_transfer(e.name, transfer["accuracy"][j][j], column))
        else:
            flags.append(mk.MaskingFlag("transfer", None, "needs --transfer and two or more models"))
        if g_spec is not None:
            r = e.results[g_spec.label]
            idx = e.clean_ok.nonzero().squeeze(1)[:100]
            large = mk.large_epsilon(g_spec.norm, x.shape[1:])
            large_acc = None
            if idx.numel():
                large_acc = mk.large_epsilon_accuracy(e.fast, x[idx], y[idx], norm=g_spec.norm,
                                                      steps=args.steps, clamp=args.clamp,
                                                      loss=args.loss, batch_size=args.batch_size)
            flags.append(mk.check_epsilon_curve(r["eps"], r["acc"], large, large_acc, int(idx.numel())))
            sub = torch.arange(min(100, x.shape[0]), device=x.device)
            if args.square_queries <= 0:
                flags.append(mk.check_gradient_free(None, None, why_not="pass --square-queries N "
                                                    "(needs pyautoattack)"))
            elif not autoattack_available():
                flags.append(mk.check_gradient_free(None, None, why_not="pyautoattack is not "
                                                    "installed (pip install 'aerl_fast[autoattack]')"))
            else:
                eps = max(g_spec.eps)
                log(f"  masking {e.name}: Square ({args.square_queries} queries) at eps {eps:g} on "
                    f"{sub.numel()} samples")
                sq = autoattack(e.model, x[sub], y[sub], eps=eps, norm=g_spec.norm, version="custom",
                                attacks=["square"], batch_size=args.batch_size, seed=args.seed,
                                square_queries=args.square_queries,
                                log_path=out / f"square_{_safe(e.name)}.log")
                k = r["eps"].index(eps)
                grad_acc = float(r["robust"][k][sub].double().mean())
                flags.append(mk.check_gradient_free(float(sq.robust.double().mean()), grad_acc,
                                                    n=sub.numel()))
        e.masking = flags
        for f in flags:
            log(f"  masking {e.name} {f.check}: {f.label}: {f.observed}")


# -------------------------------------------------------------------------------------- outputs

def _fmt(v, pct=False):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{100 * v:.1f}" if pct else f"{v:.3g}"


def _columns(specs):
    return [(s.label, eps) for s in specs for eps in s.eps]


def write_transfer(info, out: Path):
    names, acc = info["names"], np.asarray(info["accuracy"])
    head = "| crafted on \\ evaluated on | " + " | ".join(names) + " |"
    lines = [f"Transfer: {info['attack']} eps {info['eps']:g} ({info['mode']}); accuracy (%) of the "
             "column model on images crafted against the row model; diagonal = white-box.", "",
             head, "|" + "---|" * (len(names) + 1)]
    for i, n in enumerate(names):
        lines.append(f"| {n} | " + " | ".join(f"{100 * a:.1f}" for a in acc[i]) + " |")
    (out / "transfer.md").write_text("\n".join(lines) + "\n")
    with open(out / "transfer.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["crafted_on"] + names)
        for i, n in enumerate(names):
            w.writerow([n] + [f"{a:.6f}" for a in acc[i]])
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    size = 1.2 + 0.9 * len(names)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    im = ax.imshow(100 * acc, vmin=0, vmax=100, cmap="magma")
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, f"{100 * acc[i, j]:.1f}", ha="center", va="center",
                    color="white" if acc[i, j] < 0.6 else "black", fontsize=9)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("evaluated on")
    ax.set_ylabel("crafted on")
    ax.set_title(f"transfer accuracy (%), {info['attack']} eps {info['eps']:g}", fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(out / "transfer.png", dpi=120)
    plt.close(fig)


def plot_curves(entries, specs, path):
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    multi = [s for s in specs if len(s.eps) > 1]
    fig, axes = plt.subplots(1, len(multi), figsize=(4.6 * len(multi), 3.6), squeeze=False)
    for ax, s in zip(axes[0], multi):
        for e in entries:
            r = e.results[s.label]
            ax.plot(r["eps"], [100 * a for a in r["acc"]], "o-", label=f"{e.name} ({e.objective})")
        ax.set_xlabel(f"eps ({s.norm})")
        ax.set_ylabel("robust accuracy (%)")
        ax.set_title(s.label, fontsize=9)
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(entries, specs, transfer, dynamics, args, out: Path, seconds: float) -> dict:
    cols = _columns(specs)
    head = ["model", "objective", "arch", "dataset", "n", "clean"] + [f"{a} eps={e:g}" for a, e in cols]
    head.append("masking flags")
    rows = []
    for e in entries:
        n = int(e.clean_ok.numel())
        cells = [e.name, e.objective, f"{e.spec['name']}x{e.spec['width']:g}", e.data_key[0], str(n),
                 _fmt(e.clean_acc, pct=True)]
        for label, eps in cols:
            r = e.results[label]
            cells.append(_fmt(r["acc"][r["eps"].index(eps)], pct=True))
        if e.masking:
            from aerl_fast.analysis.masking import summarize  # noqa: PLC0415
            cells.append(summarize(e.masking))
        else:
            cells.append("not run")
        rows.append(cells)
    table = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    table += ["| " + " | ".join(r) + " |" for r in rows]
    table_md = "\n".join(table)

    mode = "early-stop" if args.early_stop else "last-iterate"
    rel_step = None if args.step is not None else (args.rel_step if args.rel_step is not None else 0.1)
    settings = {"attacks": [{"name": s.name, "norm": s.norm, "eps": s.eps} for s in specs],
                "steps": args.steps, "step": args.step, "rel_step": rel_step,
                "restarts": args.restarts, "random_start": args.random_start, "clamp": args.clamp,
                "mode": mode, "loss": args.loss, "n_test": args.n_test,
                "batch_size": args.batch_size, "seed": args.seed, "device": args.device}
    md = ["# Robustness evaluation", "",
          f"PGD: {args.steps} steps, step {'%g' % args.step if args.step is not None else '%g x eps' % rel_step}, "
          f"{args.restarts} restart(s), random start {'on' if args.random_start else 'off'}, "
          f"[0,1] clamp {'on' if args.clamp else 'off (study preset)'}, {mode}; "
          f"attack loss: {'cross-entropy on the true label, summed over samples (RL models too: CE on their logits)' if args.loss == 'ce' else 'logit margin'}. "
          "Accuracies in %; robust = correct both clean and under attack.", "", table_md, ""]
    if transfer is not None:
        md += ["## Transfer", "", (out / "transfer.md").read_text(), ""]
    if dynamics is not None:
        md += ["## Gradient dynamics", "",
               f"{dynamics['attack']} eps {dynamics['eps']:g}; means over steps. |g|: L2 norm of each "
               "sample's input gradient of its own loss; mean-reduced: |g| / batch size (the scale of "
               "the study's mean-reduced loss).", "",
               "| model | \\|g\\| | \\|g\\| mean-reduced | cos to previous step | sign consistency | "
               "within-batch dispersion | over-time dispersion |", "|---|---|---|---|---|---|---|"]
        for name, d in dynamics["models"].items():
            s = d["summary"]
            md.append(f"| {name} | {_fmt(s['norm'])} | {_fmt(s['norm_mean_reduced'])} | {_fmt(s['cos'])} | "
                      f"{_fmt(s['sign_agree'])} | {_fmt(s['dispersion'])} | {_fmt(s['over_time_dispersion'])} |")
        md.append("")
    if any(e.masking for e in entries):
        md += ["## Gradient-masking checks", ""]
        for e in entries:
            md.append(f"**{e.name}** ({e.objective})")
            md += [f"- {f.check}: **{f.label}** — {f.observed}" for f in e.masking]
            md.append("")
    for e in entries:
        for s in specs:
            r = e.results[s.label]
            if r.get("per_attack"):
                md.append(f"AutoAttack {e.name} per attack: " + "; ".join(
                    f"eps {ep:g}: " + ", ".join(f"{k} {100 * v:.1f}" for k, v in pa.items())
                    for ep, pa in zip(r["eps"], r["per_attack"])))
    (out / "results.md").write_text("\n".join(md) + "\n")

    with open(out / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "objective", "arch", "dataset", "n", "clean_acc"]
                   + [f"{a}@{e:g}" for a, e in cols] + ["masking_flags"])
        for e, cells in zip(entries, rows):
            w.writerow(cells[:5] + [f"{e.clean_acc:.6f}"]
                       + [f"{e.results[a]['acc'][e.results[a]['eps'].index(ep)]:.6f}" for a, ep in cols]
                       + [cells[-1]])

    if any(len(s.eps) > 1 for s in specs):
        plot_curves(entries, specs, out / "robustness_curve.png")

    metrics = {
        "settings": settings, "seconds": seconds,
        "models": [{
            "name": e.name, "path": e.path, "objective": e.objective, "arch": e.spec["name"],
            "width": e.spec["width"], "dataset": e.data_key[0], "n": int(e.clean_ok.numel()),
            "clean_acc": e.clean_acc,
            "attacks": {label: {k: v for k, v in r.items() if k not in ("robust", "x_adv")}
                        for label, r in e.results.items()},
            "masking": [f.to_dict() for f in e.masking],
        } for e in entries],
        "transfer": transfer,
        "dynamics": None if dynamics is None else {
            name: d["summary"] for name, d in dynamics["models"].items()},
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    metrics["table_md"] = table_md
    return metrics


def main(argv=None) -> dict:
    try:
        args = parse_args(argv)
        return evaluate(args, log=lambda m: print(m, file=sys.stderr))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
