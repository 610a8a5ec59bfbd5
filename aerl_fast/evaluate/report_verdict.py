"""The "Verdict" section of results.md: per model the label, the sentence a paper would write, the
worst case per sample (which attack alone broke how many points) and every check with its numbers."""
from __future__ import annotations

from typing import List

from .results import EvalResults

EXPLAIN = {
    "randomness": "two forward passes of the same images must agree",
    "ordering_transfer": "white-box breaks ⊇ transfer breaks, per sample",
    "ordering_gradient_free": "white-box breaks ⊇ Square (gradient-free) breaks, per sample",
    "ordering_single_step": "iterative breaks ⊇ FGSM breaks, per sample",
    "convergence": "twice the steps and two restarts break (almost) nothing more",
    "epsilon_to_zero": "accuracy falls to ≤ 1% at a radius covering the image box",
    "gradients": "no zero / non-finite input gradients in the attack's precision",
    "saturation": "the softmax does not saturate on most samples",
    "attack_self_test": "the attack breaks a copy of the model built to be breakable",
}


def verdict_markdown(results: EvalResults) -> List[str]:
    judged = [m for m in results.models if m.verdict is not None]
    if not judged:
        return []
    md = ["## Verdict", "", "| model | verdict | worst-case robust accuracy | checks that fired |", "|---|---|---|---|"]
    for m in judged:
        v = m.verdict
        fired = ", ".join(c.check for c in v.checks if c.flagged) or "none"
        md.append(f"| {m.name} | **{v.label}** | {100 * v.worst.accuracy:.1f} | {fired} |")
    md.append("")
    for m in judged:
        v = m.verdict
        md += [f"### {m.name}: {v.label}", "", v.sentence, "",
               "| attack | points broken | broken by this attack alone |", "|---|---|---|"]
        md += [f"| {name} | {v.worst.broken_by[name]} | {v.worst.only_by[name]} |" for name in v.worst.broken_by]
        md += [f"| **worst case (union)** | {v.worst.clean - v.worst.robust} of {v.worst.clean} clean-correct | "
               f"{v.worst.robust} of {v.worst.n} robust ({100 * v.worst.accuracy:.1f}%) |", "",
               "| check | what it asks | result | observed |", "|---|---|---|---|"]
        md += [f"| {c.check} | {EXPLAIN.get(c.check, '')} | {c.label} | {c.observed} |" for c in v.checks]
        md.append("")
    return md
