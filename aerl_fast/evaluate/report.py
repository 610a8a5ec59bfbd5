"""write_report(results, folder): the files of an evaluation, from EvalResults alone.

    metrics.json, results.md, results.csv        every number (results.md: the table, 95% intervals)
    transfer.{md,csv,png,pdf}                     with a transfer matrix
    dynamics.json, dynamics.{png,pdf}             with gradient dynamics
    robustness_curve.{png,pdf}                    when an attack has several ε
    landscape/<model>_sample<i>.{png,pdf}, landscape.json   with landscapes
    autoattack/<model>_<norm>_eps<e>.log, square_<model>.log   the peers' own logs
    per_sample/<model>.csv                        per test image: clean, every attack (and aa-fast's
                                                  stage and passes), the verdict's attacks, worst case
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import List

from . import plots
from .results import EvalResults, ModelResult

MASKING_HELP = "https://github.com/fra31/auto-attack/blob/master/flags_doc.md"  # what each kind of flag means


def _pct(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def _ci(iv) -> str:
    return f"[{_pct(iv[0])}, {_pct(iv[1])}]"


def _fmt(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3g}"


def _columns(results: EvalResults):
    config = results.config
    return [(config.label_of(a), eps) for a in config.attacks for eps in results.models[0].attacks[config.label_of(a)].eps]


def _masking_cell(m: ModelResult) -> str:
    if not m.masking:
        return "not run"
    from aerl_fast.analysis.masking import summarize  # noqa: PLC0415
    return summarize(m.masking)


def table_markdown(results: EvalResults) -> str:
    cols = _columns(results)
    head = ["model", "objective", "arch", "dataset", "n", "clean"] + [f"{a} eps={e:g}" for a, e in cols]
    head.append("masking flags")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in results.models:
        cells = [m.name, m.objective, m.arch, m.dataset, str(m.n), f"{_pct(m.clean_acc)} {_ci(m.clean_interval())}"]
        for label, eps in cols:
            out = m.attacks[label]
            cells.append(f"{_pct(out.acc_at(eps))} {_ci(out.interval(eps))}")
        cells.append(("DEGENERATE; " if m.degenerate else "") + _masking_cell(m))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def settings_of(results: EvalResults) -> dict:
    c = results.config
    return {"attacks": [{"name": a, "norm": c.norm_of(a), "eps": list(c.radii(a))} for a in c.attacks],
            "steps": c.steps, "step": c.step, "rel_step": None if c.step is not None else c.rel_step,
            "restarts": c.restarts, "random_start": c.random_start, "clamp": c.clamp,
            "mode": "early-stop" if c.early_stop else "last-iterate", "loss": c.loss, "n_test": c.n_test,
            "batch_size": c.batch_size, "seed": c.seed, "device": results.environment.get("device"),
            "config": c.to_json()}


def metrics_json(results: EvalResults) -> dict:
    return {
        "settings": settings_of(results), "seconds": results.seconds, "environment": results.environment,
        "test_subset": results.test_sets, "warnings": results.warnings,
        "models": [{
            "name": m.name, "path": m.path, "objective": m.objective, "arch": m.arch.split("x")[0],
            "width": m.width, "dataset": m.dataset, "n": m.n, "clean_acc": m.clean_acc,
            "clean_ci95": list(m.clean_interval()), "degenerate": m.degenerate,
            "attacks": {label: out.to_json() for label, out in m.attacks.items()},
            "masking": [f.to_dict() for f in m.masking],
            "verdict": m.verdict.to_json() if m.verdict is not None else None,
        } for m in results.models],
        "transfer": None if results.transfer is None else {k: v for k, v in results.transfer.items() if k != "robust"},
        "dynamics": None if results.dynamics is None else {
            name: d["summary"] for name, d in results.dynamics["models"].items()},
    }


def write_report(results: EvalResults, folder) -> dict:
    """Write every file of `results` into `folder` (created); returns metrics.json's content plus
    the markdown table under "table_md"."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    if results.transfer is not None:
        _write_transfer(results.transfer, out)
    if results.dynamics is not None:
        from aerl_fast.analysis.dynamics import plot_dynamics  # noqa: PLC0415
        d = results.dynamics
        (out / "dynamics.json").write_text(json.dumps(d, indent=2) + "\n")
        plot_dynamics(d["models"], out / "dynamics.png",
                      title=f"{d['attack']} eps {d['eps']:g}, {d['steps']} steps: per-step input-gradient statistics "
                            "(per-sample loss)")
    if results.landscapes is not None:
        plots.plot_landscapes(results, out / "landscape")
        (out / "landscape.json").write_text(json.dumps(results.landscapes) + "\n")
    if plots.has_curves(results):
        plots.plot_curves(results, out / "robustness_curve.png")
    _write_logs(results, out)
    write_per_sample(results, out / "per_sample")
    table = table_markdown(results)
    (out / "results.md").write_text("\n".join(_markdown(results, table, out)) + "\n")
    _write_csv(results, out / "results.csv")
    metrics = metrics_json(results)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return dict(metrics, table_md=table)


def _write_logs(results: EvalResults, out: Path):
    for m in results.models:
        for label, o in m.attacks.items():
            for eps, text in zip(o.eps, o.logs or []):
                (out / "autoattack").mkdir(exist_ok=True)
                (out / "autoattack" / f"{plots.safe_name(m.name)}_{o.norm}_eps{eps:g}.log").write_text(text)
        for kind, text in m.logs.items():
            (out / f"{kind}_{plots.safe_name(m.name)}.log").write_text(text)


def _markdown(results: EvalResults, table: str, out: Path) -> List[str]:
    c = results.config
    step = f"{c.step:g}" if c.step is not None else f"{c.rel_step:g} x eps"
    loss = ("cross-entropy on the true label, summed over samples (RL models too: CE on their logits)"
            if c.loss == "ce" else "logit margin")
    subsets = "; ".join(f"{k}: {v['n']} of {v['of']} images" + (f" (stratified by class, seed {v['seed']})"
                                                                  if v["stratified_by_class"] else "")
                        for k, v in results.test_sets.items())
    md = ["# Robustness evaluation", "",
          f"PGD: {c.steps} steps, step {step}, {c.restarts} restart(s), random start "
          f"{'on' if c.random_start else 'off'}, [0,1] clamp {'on' if c.clamp else 'off (study preset)'}, "
          f"{'early-stop' if c.early_stop else 'last-iterate'}; attack loss: {loss}. Accuracies in % with 95% Wilson "
          "intervals; robust = correct both clean and under attack.", "",
          f"Test images: {subsets} (indices in metrics.json).", ""]
    degenerate = [m for m in results.models if m.degenerate]
    if degenerate:
        md += ["**Degenerate models** (their attack numbers mean nothing):", ""]
        md += [f"- **{m.name}**: {m.degenerate}" for m in degenerate] + [""]
    md += [table, ""]
    if results.warnings:
        md += ["Warnings:", ""] + [f"- {w}" for w in results.warnings] + [""]
    if results.transfer is not None:
        md += ["## Transfer", "", (out / "transfer.md").read_text(), ""]
    if results.dynamics is not None:
        d = results.dynamics
        md += ["## Gradient dynamics", "",
               f"{d['attack']} eps {d['eps']:g}; means over steps. |g|: L2 norm of each sample's input gradient of its "
               "own loss; mean-reduced: |g| / batch size (the scale of the study's mean-reduced loss).", "",
               "| model | \\|g\\| | \\|g\\| mean-reduced | cos to previous step | sign consistency | "
               "within-batch dispersion | over-time dispersion |", "|---|---|---|---|---|---|---|"]
        for name, dd in d["models"].items():
            s = dd["summary"]
            md.append(f"| {name} | {_fmt(s['norm'])} | {_fmt(s['norm_mean_reduced'])} | {_fmt(s['cos'])} | "
                      f"{_fmt(s['sign_agree'])} | {_fmt(s['dispersion'])} | {_fmt(s['over_time_dispersion'])} |")
        md.append("")
    if any(m.masking for m in results.models):
        md += ["## Gradient-masking checks", "",
               f"What a raised flag means and what to do about it: README, \"FAQ\"; AutoAttack's [flags]({MASKING_HELP}).", ""]
        for m in results.models:
            md.append(f"**{m.name}** ({m.objective})")
            md += [f"- {f.check}: **{f.label}** — {f.observed}" for f in m.masking]
            md.append("")
    md += _stages_markdown(results)
    from .report_verdict import verdict_markdown  # noqa: PLC0415
    md += verdict_markdown(results)
    for m in results.models:
        for o in m.attacks.values():
            if o.per_attack and o.stages is None:
                md.append(f"AutoAttack {m.name} per attack: " + "; ".join(
                    f"eps {ep:g}: " + ", ".join(f"{k} {100 * v:.1f}" for k, v in pa.items())
                    for ep, pa in zip(o.eps, o.per_attack)))
    env = results.environment
    md += ["", f"Environment: aerl_fast {env.get('aerl_fast')}, torch {env.get('torch')}, triton {env.get('triton')}, "
               f"pyautoattack {env.get('pyautoattack')}, commit {env.get('git_commit')}, device {env.get('device_name')}, "
               f"{env.get('date')}; {results.seconds:.1f} s."]
    return md


def _write_csv(results: EvalResults, path: Path):
    cols = _columns(results)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "objective", "arch", "dataset", "n", "clean_acc"] + [f"{a}@{e:g}" for a, e in cols]
                   + ["masking_flags", "degenerate", "clean_ci95_lo", "clean_ci95_hi"]
                   + [f"{a}@{e:g}_ci95_{s}" for a, e in cols for s in ("lo", "hi")])
        for m in results.models:
            w.writerow([m.name, m.objective, m.arch, m.dataset, m.n, f"{m.clean_acc:.6f}"]
                       + [f"{m.attacks[a].acc_at(e):.6f}" for a, e in cols]
                       + [_masking_cell(m), m.degenerate or "", *(f"{v:.6f}" for v in m.clean_interval())]
                       + [f"{v:.6f}" for a, e in cols for v in m.attacks[a].interval(e)])


def _write_transfer(info: dict, out: Path):
    names, acc = info["names"], info["accuracy"]
    lines = [f"Transfer: {info['attack']} eps {info['eps']:g} ({info['mode']}); accuracy (%) of the column model on "
             "images crafted against the row model; diagonal = white-box.", "",
             "| crafted on \\ evaluated on | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    for i, n in enumerate(names):
        lines.append(f"| {n} | " + " | ".join(f"{100 * a:.1f}" for a in acc[i]) + " |")
    (out / "transfer.md").write_text("\n".join(lines) + "\n")
    with open(out / "transfer.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["crafted_on"] + names)
        for i, n in enumerate(names):
            w.writerow([n] + [f"{a:.6f}" for a in acc[i]])
    plots.plot_transfer(info, out / "transfer.png")


def _stages_markdown(results: EvalResults) -> List[str]:
    """aa-fast's cost per stage, as adv_lib reports it: points attacked and broken, passes, time."""
    rows = []
    for m in results.models:
        for label, o in m.attacks.items():
            for eps, stages in zip(o.eps, o.stages or []):
                for st in stages:
                    rows.append(f"| {m.name} | {label} | {eps:g} | {st['name']} | {st['attacked']} | {st['broken']} | "
                                f"{st['forwards']} | {st['backwards']} | {st.get('calls', 'n/a')} | {st['seconds']:.1f} |")
    if not rows:
        return []
    amp = [f"{m.name}: {o.disagreements}" for m in results.models for o in m.attacks.values() if o.disagreements]
    return (["## aa-fast: where the passes go", "",
             "Forwards and backwards count images through the model; model calls are the batched calls, the "
             "sequential steps a GPU waits on.", "",
             "| model | attack | eps | stage | attacked | broken | forwards | backwards | model calls | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|"] + rows
            + ([""] + [f"bf16 breaks the fp32 re-check overturned: {', '.join(amp)}"] if amp else []) + [""])


def write_per_sample(results: EvalResults, folder: Path):
    """One CSV per model, a row per test image: what broke it."""
    folder.mkdir(parents=True, exist_ok=True)
    subsets = list(results.test_sets.values())
    for m in results.models:
        sub = subsets[0] if len(subsets) == 1 else results.test_sets.get(m.dataset, subsets[0])
        cols = {"index": sub["indices"][:m.n], "clean_correct": m.clean_ok.int().tolist()}
        for label, o in m.attacks.items():
            for k, eps in enumerate(o.eps):
                cols[f"{label}@{eps:g}_robust"] = o.robust[k].int().tolist()
                if o.per_sample is not None:
                    names = o.per_sample["stage_names"]
                    cols[f"{label}@{eps:g}_broken_by"] = [names[i] if i >= 0 else "" for i in
                                                          o.per_sample["broken_by"][k].tolist()]
                    cols[f"{label}@{eps:g}_forwards"] = o.per_sample["forwards"][k].tolist()
                    cols[f"{label}@{eps:g}_backwards"] = o.per_sample["backwards"][k].tolist()
        for name, broken in m.breaks.items():
            cols[f"verdict:{name}_broken"] = broken.int().tolist()
        if m.verdict is not None:
            cols["worst_case_robust"] = m.verdict.worst.robust_mask.int().tolist()
        with open(folder / f"{plots.safe_name(m.name)}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(list(cols))
            w.writerows(zip(*cols.values()))
