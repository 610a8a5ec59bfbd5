"""Two comparisons the reproduce report adds to the study's tables.

- Matched clean accuracy: a less accurate model may keep only its easy, large-margin samples, so a
  policy-trained cell is also compared with the SL checkpoint (of the same dataset, model, width and
  seed, from its periodic epoch_*.pt) whose clean accuracy is closest to the cell's own.
- The verdict of every cell (evaluate --verdict): label, worst-case accuracy and what fired.
"""
from __future__ import annotations

from typing import Dict, List, Optional

from .figures import fmt_width, pct


def matched_rows(rows: List[dict], curves: Dict[tuple, dict]) -> List[dict]:
    """For each non-SL cell with an SL twin that kept periodic checkpoints: the twin's checkpoint whose
    clean accuracy is closest to the cell's (ties: the earlier epoch)."""
    out = []
    for r in rows:
        if r["objective"] == "sl":
            continue
        recs = curves.get((r["dataset"], r["seed"]), {})
        twins = [c for c in recs.values() if c["objective"] == "sl" and c["model"] == r["model"]
                 and float(c["width"]) == float(r["width"])]
        if not twins:
            continue
        best = min(twins, key=lambda c: (abs(c["clean_acc"] - r["clean_acc"]), c["epoch"]))
        out.append({"cell": r["cell"], "objective": r["objective"], "dataset": r["dataset"], "model": r["model"],
                    "width": r["width"], "seed": r["seed"], "clean_acc": r["clean_acc"], "pgd_l2_acc": r["pgd_l2_acc"],
                    "ratio": r["ratio"], "sl_epoch": best["epoch"], "sl_clean_acc": best["clean_acc"],
                    "sl_pgd_l2_acc": best["pgd_l2_acc"], "sl_ratio": best["ratio"],
                    "clean_gap": r["clean_acc"] - best["clean_acc"]})
    return out


def _ratio(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def matched_markdown(matched: List[dict], eps: float) -> List[str]:
    if not matched:
        return []
    md = ["## At matched clean accuracy", "",
          "Each policy-trained cell beside the SL checkpoint of the same dataset, model and seed whose clean accuracy is "
          f"closest to its own (periodic epoch_*.pt; same test images, PGD-L2 eps {eps:g}). A gap in the ratio that "
          "survives here is not the accuracy gap alone.", "",
          "| cell | clean | adversarial | ratio | SL epoch | SL clean | SL adversarial | SL ratio | clean gap |",
          "|---|---|---|---|---|---|---|---|---|"]
    for m in matched:
        md.append(f"| {m['objective']} {m['model']}x{fmt_width(m['width'])} s{m['seed']} | {pct(m['clean_acc'])} | "
                  f"{pct(m['pgd_l2_acc'])} | {_ratio(m['ratio'])} | {m['sl_epoch']} | {pct(m['sl_clean_acc'])} | "
                  f"{pct(m['sl_pgd_l2_acc'])} | {_ratio(m['sl_ratio'])} | {100 * m['clean_gap']:+.1f} |")
    return md + [""]


def verdict_rows(cells, metrics: Dict[tuple, dict]) -> List[dict]:
    out = []
    for c in cells:
        m = next((e for e in metrics[(c.ds, c.seed)]["models"] if e["name"] == c.name), None)
        v = (m or {}).get("verdict")
        if v:
            out.append({"cell": c.name, "objective": c.objective, "label": v["label"],
                        "worst_case_acc": v["worst_case"]["accuracy"],
                        "fired": [k["check"] for k in v["checks"] if k["flagged"]], "sentence": v["sentence"]})
    return out


def verdict_markdown(rows: List[dict]) -> List[str]:
    if not rows:
        return []
    md = ["## Verdict per cell", "",
          "Worst case over every attack (white-box CE and DLR, the APGD stages, transfer from the other cells, Square), "
          "with the gradient-masking and attack checks; full evidence in each group's results.md.", "",
          "| cell | objective | verdict | worst-case robust accuracy | checks that fired |", "|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['cell']} | {r['objective']} | **{r['label']}** | {pct(r['worst_case_acc'])} | "
                  f"{', '.join(r['fired']) or 'none'} |")
    return md + [""]
