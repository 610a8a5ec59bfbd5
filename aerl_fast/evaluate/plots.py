"""The evaluation's figures (PNG and a vector PDF beside each): transfer heat map, robustness curves
(from ε = 0, the clean accuracy), gradient dynamics and loss landscapes."""
from __future__ import annotations

from pathlib import Path
from typing import List

import numpy as np

from aerl_fast.plotting import pyplot, save

from .results import EvalResults, ModelResult


def plot_transfer(info: dict, path: Path) -> Path:
    plt = pyplot()
    names, acc = info["names"], np.asarray(info["accuracy"])
    size = 1.2 + 0.9 * len(names)
    fig, ax = plt.subplots(figsize=(size + 1.5, size + 0.4))
    im = ax.imshow(100 * acc, vmin=0, vmax=100, cmap="magma")
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, f"{100 * acc[i, j]:.1f}", ha="center", va="center",
                    color="white" if acc[i, j] < 0.6 else "black", fontsize=9)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("evaluated on")
    ax.set_ylabel("crafted on")
    fig.colorbar(im, ax=ax, label="accuracy (%)", shrink=0.85)
    fig.suptitle(f"transfer accuracy (%), {info['attack']} eps {info['eps']:g} ({info['mode']})", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.94))  # the title above the axes and the colour bar
    return save(fig, path)


def plot_curves(results: EvalResults, path: Path) -> Path:
    """Robust accuracy against ε per attack, each curve starting at ε = 0 with the clean accuracy."""
    plt = pyplot()
    config = results.config
    labels = [config.label_of(a) for a in config.attacks]
    multi = [lb for lb in labels if len(results.models[0].attacks[lb].eps) > 1]
    fig, axes = plt.subplots(1, len(multi), figsize=(4.8 * len(multi), 3.8), squeeze=False)
    n = results.models[0].n
    for ax, label in zip(axes[0], multi):
        norm = results.models[0].attacks[label].norm
        for i, m in enumerate(results.models):
            out = m.attacks[label]
            eps = [0.0] + list(out.eps)
            acc = [100 * m.clean_acc] + [100 * a for a in out.acc]
            lo = [100 * m.clean_interval()[0]] + [100 * out.interval(e)[0] for e in out.eps]
            hi = [100 * m.clean_interval()[1]] + [100 * out.interval(e)[1] for e in out.eps]
            ax.plot(eps, acc, "o-", color=f"C{i % 10}", label=_legend(m))
            ax.fill_between(eps, lo, hi, color=f"C{i % 10}", alpha=0.15, lw=0)
        ax.set_xlabel(f"ε ({'L∞' if norm == 'linf' else 'L2'})")
        ax.set_ylabel("robust accuracy (%)")
        steps = "" if label in ("fgsm",) or label.startswith("autoattack") else f", {config.steps} steps"
        ax.set_title(f"{label}: n = {n}{steps}; ε = 0 is clean; band: 95% Wilson", fontsize=8)
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return save(fig, path)


def _legend(m: ModelResult) -> str:
    return m.name if m.objective in ("?", "") or m.objective in m.name else f"{m.name} ({m.objective})"


def has_curves(results: EvalResults) -> bool:
    return bool(results.models) and any(len(out.eps) > 1 for out in results.models[0].attacks.values())


def plot_landscapes(results: EvalResults, folder: Path) -> List[Path]:
    from aerl_fast.analysis.landscape import plot_landscape  # noqa: PLC0415

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    objectives = {m.name: m.objective for m in results.models}
    for name, lands in results.landscapes["models"].items():
        for i, land in lands.items():
            path = folder / f"{safe_name(name)}_sample{i}.png"
            plot_landscape(land, path, title=f"{name} ({objectives.get(name, '?')}) sample {i}: label "
                                             f"{land['label']}, adversarial -> {land['adv_pred']}")
            paths.append(path)
    return paths


def safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
