"""Reproduce the study as one call: train every cell of an experiment matrix, evaluate, report.

    from aerl_fast import reproduce
    report = reproduce.run("smoke", out="reports/smoke")
    python -m aerl_fast.reproduce --preset smoke [--out DIR] [--launcher slurm ...] [--print-commands]

Layout of the report folder:

    runs/<dataset>-<model>x<width>-<objective>-s<seed>/   one training run per cell
    eval/<dataset>/seed<s>/                               the evaluation of the cells of one dataset and
                                                          seed (table, transfer, dynamics), and
                                                          curves.json/.png: accuracy of each cell's
                                                          periodic checkpoints (train save_every)
    jobs/                                                 submitit's job files (cluster launchers)
    report.md, report.json, report.csv                    the study's tables, every number

Modules: matrix (preset → typed cells and EvalConfig), cells (training, locks), launch (submitit
jobs), evaluation (evaluate.run per group, accuracy over epochs, caches), report, figures, cli.
"""
from .cells import cell_done, cell_lock, cell_state, command_for, train_cell, train_cells
from .cli import main
from .evaluation import eval_cached, eval_checkpoint, eval_dir, eval_key, evaluate_curves, evaluate_groups
from .launch import LAUNCHERS, ClusterOptions
from .matrix import Cell, build_cells, eval_config, load_matrix, validate
from .pipeline import print_commands, run
from .report import write_report

__all__ = ["Cell", "ClusterOptions", "LAUNCHERS", "build_cells", "cell_done", "cell_lock", "cell_state",
           "command_for", "eval_cached", "eval_checkpoint", "eval_config", "eval_dir", "eval_key", "evaluate_curves",
           "evaluate_groups", "load_matrix", "main", "print_commands", "run", "train_cell", "train_cells",
           "validate", "write_report"]
