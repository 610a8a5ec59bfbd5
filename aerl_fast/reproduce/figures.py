"""The reproduce report's figures and tables of accuracy over epochs (periodic checkpoints)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

from aerl_fast.plotting import pyplot, save

CURVES_FILE = "curves.json"


def fmt_width(w) -> str:
    return f"{float(w):g}"


def pct(v) -> str:
    import math  # noqa: PLC0415
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def _curve_label(rec, multi_model: bool) -> str:
    return rec["objective"] + (f" {rec['model']}x{fmt_width(rec['width'])}" if multi_model else "")


def _by_cell(recs: dict) -> Dict[str, List[dict]]:
    out: Dict[str, List[dict]] = {}
    for rec in recs.values():
        out.setdefault(rec["cell"], []).append(rec)
    return {k: sorted(v, key=lambda r: r["epoch"]) for k, v in out.items()}


def plot_epoch_curves(recs: dict, path: Path, title: str, eps: float):
    """Left: clean (solid) and PGD-L2 (dashed) accuracy over epochs, one colour per cell; right: the
    ratio adversarial / clean."""
    from matplotlib.ticker import MaxNLocator  # noqa: PLC0415
    plt = pyplot()
    cells = _by_cell(recs)
    multi = len({(r["model"], r["width"]) for r in recs.values()}) > 1
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, (cell, rs) in enumerate(cells.items()):
        color = f"C{i % 10}"
        ep = [r["epoch"] for r in rs]
        label = _curve_label(rs[0], multi)
        a1.plot(ep, [100 * r["clean_acc"] for r in rs], "o-", color=color, label=f"{label} clean")
        a1.plot(ep, [100 * r["pgd_l2_acc"] for r in rs], "s--", color=color, label=f"{label} PGD-L2")
        ratio = [(e, r["ratio"]) for e, r in zip(ep, rs) if r["ratio"] is not None]
        a2.plot([e for e, _ in ratio], [v for _, v in ratio], "o-", color=color, label=label)
    a1.set_ylabel("accuracy (%)")
    a1.set_ylim(-2, 102)
    a1.set_title(f"{title}: clean (solid), PGD-L2 eps {eps:g} (dashed)", fontsize=9)
    a2.set_ylabel("adversarial / clean")
    a2.set_ylim(-0.02, 1.02)
    a2.set_title(f"{title}: ratio adversarial / clean", fontsize=9)
    for ax in (a1, a2):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save(fig, path)


def curves_markdown(recs: dict, rel: Path, ds: str, seed: int) -> List[str]:
    cells = _by_cell(recs)
    multi = len({(r["model"], r["width"]) for r in recs.values()}) > 1
    epochs = sorted({r["epoch"] for r in recs.values()})
    md = [f"### Accuracy over epochs, {ds}, seed {seed}", "",
          f"![accuracy over epochs]({rel / 'curves.png'})", "",
          "Periodic checkpoints (epoch_NNNN.pt): clean / adversarial accuracy in %, (ratio adv/clean); "
          f"data: [curves.json]({rel / CURVES_FILE}).", "",
          "| objective | " + " | ".join(f"epoch {e}" for e in epochs) + " |",
          "|---|" + "---|" * len(epochs)]
    for rs in cells.values():
        at = {r["epoch"]: r for r in rs}

        def cell(e):
            r = at.get(e)
            if r is None:
                return "—"
            ratio = "n/a" if r["ratio"] is None else f"{r['ratio']:.2f}"
            return f"{pct(r['clean_acc'])} / {pct(r['pgd_l2_acc'])} ({ratio})"
        md.append(f"| {_curve_label(rs[0], multi)} | " + " | ".join(cell(e) for e in epochs) + " |")
    return md + [""]


