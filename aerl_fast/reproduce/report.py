"""report.md / report.json / report.csv of a reproduced matrix: the study's tables (clean and
adversarial accuracy and their ratio per objective and model, the transfer matrix, gradient
dynamics, accuracy over epochs) with the study's published values and the difference where they
exist (aerl_fast.published)."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Dict, List, Optional

from aerl_fast import published
from aerl_fast.errors import UserError
from aerl_fast.evaluate import EvalConfig

from .comparisons import matched_markdown, matched_rows, verdict_markdown, verdict_rows
from .evaluation import eval_dir
from .figures import curves_markdown, fmt_width, pct


def _mean(xs):
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return sum(xs) / len(xs) if xs else None


def _sd(xs):
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if len(xs) < 2:
        return None
    mu = sum(xs) / len(xs)
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (len(xs) - 1))


def _diff(ours, pub) -> str:
    if ours is None or pub is None:
        return ""
    return f"{100 * (ours - pub):+.1f}"


def collect(cells, root: Path, metrics: Dict[tuple, dict], config: EvalConfig) -> dict:
    rows = []
    for c in cells:
        m = metrics[(c.ds, c.seed)]
        entry = next((e for e in m["models"] if e["name"] == c.name), None)
        if entry is None:
            raise UserError(f"{eval_dir(root, c.ds, c.seed)}/metrics.json has no model {c.name}")
        pgd = entry["attacks"]["pgd-l2"]
        adv = pgd["acc"][pgd["eps"].index(_radius(config))]
        summary = json.loads((root / "runs" / c.name / "summary.json").read_text())
        clean = entry["clean_acc"]
        rows.append({
            "cell": c.name, "dataset": c.ds, "objective": c.objective, "model": c.model,
            "width": c.width, "seed": c.seed, "n_test": entry["n"], "clean_acc": clean,
            "pgd_l2_acc": adv, "ratio": adv / clean if clean > 0 else None,
            "test_acc_train": summary.get("test_acc"), "best_val_acc": summary.get("best_val_acc"),
            "best_epoch": summary.get("best_epoch"), "epochs": summary.get("epochs"),
            "train_s": summary.get("total_train_s"),
            "published_pgd_l2_acc": published.PGD_ACCURACY.get(c.ds, {}).get(c.objective),
        })
    return {"rows": rows}


def _radius(config: EvalConfig) -> float:
    return config.radii("pgd-l2")[0]


def _study_note(config: EvalConfig, models) -> str:
    diffs = []
    if any(m != (published.SETTINGS["model"], published.SETTINGS["width"]) for m in models):
        diffs.append("models other than cnn6 x1")
    if _radius(config) != published.SETTINGS["eps"]:
        diffs.append(f"eps {_radius(config):g} instead of {published.SETTINGS['eps']:g}")
    if config.steps != published.SETTINGS["steps"]:
        diffs.append(f"{config.steps} PGD steps instead of {published.SETTINGS['steps']}")
    st = published.SETTINGS
    return (f"The study's values are for its 6-layer CNN ({st['model']} x{st['width']:g}), PGD-L2 eps {st['eps']:g}, "
            f"step {st['step']:g}, {st['steps']} steps"
            + (f"; settings here differ ({', '.join(diffs)}), so the difference is indicative only."
               if diffs else "."))


def write_report(m: dict, cells, root: Path, metrics: Dict[tuple, dict], config: EvalConfig,
                 curves: Optional[Dict[tuple, dict]] = None) -> dict:
    data = collect(cells, root, metrics, config)
    rows = data["rows"]
    seeds = sorted({c.seed for c in cells})
    models = list(dict.fromkeys((c.model, c.width) for c in cells))
    step = f"step {config.step:g}" if config.step is not None else f"step {config.rel_step:g} x eps"
    md = [f"# Reproduction report: preset `{m['_name']}`", "",
          f"Preset: `{m['_path']}`. {len(cells)} cells: objectives {', '.join(m['objectives'])}; models "
          f"{', '.join(f'{a}x{fmt_width(w)}' for a, w in models)}; seeds {', '.join(map(str, seeds))}.",
          f"Attack: PGD-L2 eps {_radius(config):g}, {config.steps} steps, {step}, "
          f"{config.restarts} restart(s), [0,1] clamp {'on' if config.clamp else 'off'}, "
          f"{'early-stop' if config.early_stop else 'last-iterate'}, {config.n_test} test images (a stratified "
          f"subset, seed {config.subset_seed}). Accuracies in %; adversarial = correct both clean "
          "and under attack; ratio = adversarial / clean. Several seeds: mean ± sd over seeds.", ""]
    summary_rows = []
    for ds in dict.fromkeys(c.ds for c in cells):
        pub = published.PGD_ACCURACY.get(ds)
        md += [f"## {ds}", ""]
        head = "| objective | model | clean | adversarial | ratio adv/clean |"
        sep = "|---|---|---|---|---|"
        if pub:
            head += " study adversarial | difference |"
            sep += "---|---|"
        md += [head, sep]
        clean_by_obj = {}
        for obj in m["objectives"]:
            for model, width in models:
                rs = [r for r in rows if r["dataset"] == ds and r["objective"] == obj
                      and r["model"] == model and r["width"] == width]
                clean = _mean([r["clean_acc"] for r in rs])
                adv = _mean([r["pgd_l2_acc"] for r in rs])
                ratio = _mean([r["ratio"] for r in rs])
                clean_by_obj[(obj, model, width)] = clean

                def show(v, xs):
                    sd = _sd(xs)
                    return pct(v) + (f" ± {100 * sd:.1f}" if sd is not None else "")
                line = (f"| {obj} | {model}x{fmt_width(width)} | {show(clean, [r['clean_acc'] for r in rs])} | "
                        f"{show(adv, [r['pgd_l2_acc'] for r in rs])} | "
                        f"{'n/a' if ratio is None else f'{ratio:.2f}'} |")
                p = pub.get(obj) if pub else None
                if pub:
                    line += f" {pct(p) if p is not None else '—'} | {_diff(adv, p) or '—'} |"
                md.append(line)
                summary_rows.append({"dataset": ds, "objective": obj, "model": model, "width": width,
                                     "seeds": len(rs), "clean_acc": clean, "pgd_l2_acc": adv,
                                     "ratio": ratio, "published_pgd_l2_acc": p,
                                     "difference": None if p is None or adv is None else adv - p})
        md.append("")
        if pub:
            md.append(_study_note(config, models))
            for model, width in models:
                sl, rl = clean_by_obj.get(("sl", model, width)), clean_by_obj.get(("rl", model, width))
                if sl is not None and rl is not None:
                    drop = sl - rl
                    lo, hi = published.CLEAN_DROP
                    inside = lo <= drop <= hi
                    md.append(f"Clean accuracy SL − RL ({model}x{fmt_width(width)}): {100 * drop:+.1f} points; "
                              f"study: {100 * lo:g}–{100 * hi:g} points ({'within' if inside else 'outside'} that range).")
            md.append("")
        for seed in seeds:
            key = (ds, seed)
            if key not in metrics:
                continue
            rel = Path("eval") / ds / f"seed{seed}"
            t = metrics[key].get("transfer")
            md += [f"### Transfer matrix, {ds}, seed {seed}", ""]
            if t:
                md.append((root / rel / "transfer.md").read_text().rstrip())
                md += ["", f"![transfer]({rel / 'transfer.png'})", ""]
                if ds == "cifar10":
                    md += transfer_comparison(t, cells) + [""]
            md += [f"Gradient dynamics during PGD ({ds}, seed {seed}): [dynamics.png]({rel / 'dynamics.png'}) "
                   f"([data]({rel / 'dynamics.json'})); full evaluation: [results.md]({rel / 'results.md'}).", "",
                   f"![dynamics]({rel / 'dynamics.png'})", ""]
            dyn = metrics[key].get("dynamics") or {}
            if dyn:
                md += ["| model | per-sample \\|g\\| | cos to previous step | sign consistency | within-batch dispersion |",
                       "|---|---|---|---|---|"]
                for name, s in dyn.items():
                    md.append(f"| {name} | {s['norm']:.3g} | {s['cos']:.3g} | {s['sign_agree']:.3g} | "
                              f"{s['dispersion']:.3g} |")
                md.append("")
    curves = curves or {}
    verdicts = verdict_rows(cells, metrics)
    md += verdict_markdown(verdicts)
    matched = matched_rows(rows, curves)
    md += matched_markdown(matched, _radius(config))
    if curves:
        md += ["## Accuracy over epochs", ""]
        for (ds, seed), recs in curves.items():
            md += curves_markdown(recs, Path("eval") / ds / f"seed{seed}", ds, seed)
    else:
        md += ["## Not in this report", "",
               "Accuracy of periodic checkpoints over epochs: no cell kept any (set `\"save_every\": N` in "
               "the preset's `train` overrides); only the best checkpoint of each cell is evaluated.", ""]
    (root / "report.md").write_text("\n".join(md))

    report = {"preset": m["_name"], "preset_path": m["_path"], "eval_settings": config.to_json(),
              "published": published.as_json(),
              "cells": rows, "summary": summary_rows,
              "transfer": {f"{ds}/seed{s}": metrics[(ds, s)].get("transfer") for ds, s in metrics},
              "dynamics": {f"{ds}/seed{s}": metrics[(ds, s)].get("dynamics") for ds, s in metrics},
              "curves": {f"{ds}/seed{s}": sorted(recs.values(), key=lambda r: (r["cell"], r["epoch"]))
                         for (ds, s), recs in curves.items()},
              "verdicts": verdicts, "matched_accuracy": matched}
    (root / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    with open(root / "report.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return report


def transfer_comparison(t: dict, cells) -> List[str]:
    """Mean transfer accuracy by (crafted-on objective, evaluated-on objective), beside the study's."""
    obj = {c.name: c.objective for c in cells}
    names, acc = t["names"], t["accuracy"]

    def mean_block(src, dst):
        vals = [acc[i][j] for i, a in enumerate(names) for j, b in enumerate(names)
                if i != j and obj.get(a) == src and obj.get(b) == dst]
        return _mean(vals)
    lines = ["| transfer (off-diagonal means) | ours | study (CIFAR-10) | difference |", "|---|---|---|---|"]
    for src, dst, pub in published.TRANSFER_CIFAR10:
        v = mean_block(src, dst)
        if v is None:  # only the white-box diagonal exists for this pair (one model per objective)
            continue
        lines.append(f"| crafted on {src}, evaluated on {dst} | {pct(v)} | {pct(pub)} | {_diff(v, pub) or '—'} |")
    v = _mean([acc[i][j] for i, a in enumerate(names) for j, b in enumerate(names)
               if i != j and obj.get(b) == "rl-adv"])
    lines.append(f"| evaluated on rl-adv (crafted on the others) | {pct(v)} | {pct(published.TRANSFER_RL_ADV)} | "
                 f"{_diff(v, published.TRANSFER_RL_ADV) or '—'} |")
    return lines

