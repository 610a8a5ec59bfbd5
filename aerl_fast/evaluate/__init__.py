"""Robustness evaluation of trained models.

From Python (any nn.Module taking [0,1] images, run folders or checkpoint files):

    from aerl_fast import evaluate
    results = evaluate.run([model, "runs/rl"], (x, y), evaluate.EvalConfig(attacks=("pgd-l2",), l2_eps=(0.5,)))
    results.models[0].attacks["pgd-l2"].acc          # robust accuracy per radius
    evaluate.write_report(results, "results/cmp")    # metrics.json, results.md/.csv, plots

From the shell: `python -m aerl_fast.evaluate RUN_DIR ... [flags]` (cli.py, a thin shell).

Data flows one way: models and test images (inputs.py) → attacks (attack_runs.py) → analyses
(analyses.py) → EvalResults (results.py) → files (report.py, plots.py).  Robust accuracy = the share
of samples classified correctly both clean and under attack.  Attack loss: cross-entropy on the
true label, summed over samples, for SL and RL models alike (the RL policy is softmax(logits), so
this is -log pi(label|x)); --loss margin uses the logit margin instead.
"""
from .cli import main, parse_args
from .config import ATTACKS, DEFAULT_EPS, EvalConfig, EvalOptions
from .inputs import ModelEntry
from .report import write_report
from .results import AttackOutcome, EvalResults, ModelResult, wilson
from .runner import degenerate_reason, run

__all__ = ["ATTACKS", "AttackOutcome", "DEFAULT_EPS", "EvalConfig", "EvalOptions", "EvalResults", "ModelEntry",
           "ModelResult", "degenerate_reason", "main", "parse_args", "run", "wilson", "write_report"]
