"""The figures the GPU check measures, each with the CPU figure and the roofline estimate that the
summary prints beside it.  CPU figures are bench/RESULTS.md's (2-core CPU, one torch thread);
estimates are RESULTS.md's H100 roofline (bf16 at 400 TFLOP/s planned, fp32/TF32 at half that;
an H200 has the same compute and 1.43x the memory bandwidth).
"""
from __future__ import annotations

MODELS = ("cnn6", "alicnn")          # cnn6 at width 1 is the study's network
OBJECTIVES = ("rl", "rl-adv")
TRAIN_MODES = {                      # mode -> train CLI flags (channels_last is the CUDA default)
    "eager fp32": ["--no-compile"],
    "bf16": ["--no-compile", "--amp"],
    "compiled bf16": ["--compile", "--amp"],
}


def train_key(model: str, objective: str, mode: str) -> str:
    return f"train {model} {objective} {mode}"


# CPU img/s from RESULTS.md's step table (ms per step at batch 32 (cnn6) / 128 (alicnn), fp32)
_CPU_TRAIN = {("cnn6", "rl"): "14.6 (2197 ms/step, b32)", ("cnn6", "rl-adv"): "7.3 (4402 ms/step, b32)",
              ("alicnn", "rl"): "310 (413 ms/step, b128)", ("alicnn", "rl-adv"): "147 (872 ms/step, b128)"}
# H100 roofline img/s per (model, objective, mode); RL-adv is two RL steps
_ROOF_TRAIN = {
    ("cnn6", "rl"): ("~21k", "~42k", "~55k"), ("cnn6", "rl-adv"): ("~10k", "~21k", "~27k"),
    ("alicnn", "rl"): ("~300k (launch-bound)", "~300k (launch-bound)", "0.7-1M"),
    ("alicnn", "rl-adv"): ("~150k", "~150k", "350-500k"),
}


def _rows():
    rows = [("copy_bandwidth", "device copy bandwidth (copy_, read + write)", "GB/s", "-",
             "H100 3.35 TB/s, H200 4.8 TB/s peak")]
    for model in MODELS:
        for objective in OBJECTIVES:
            for i, mode in enumerate(TRAIN_MODES):
                rows.append((train_key(model, objective, mode),
                             f"train {model} w1 {objective} b256, {mode} channels_last", "img/s",
                             _CPU_TRAIN[model, objective] if mode == "eager fp32" else "-",
                             _ROOF_TRAIN[model, objective][i]))
    rows += [
        ("trainer_overhead_cuda", "trainer overhead (Trainer.train_epoch / bare step), CUDA", "x",
         "1.021", "target <= 1.10"),
        ("compile_recompiles", "recompiles, 2-epoch RL-adv --compile --amp", "", "-",
         "a few (eval mode, last partial batch)"),
        ("compile_graph_breaks", "graph breaks, same run", "", "-", "0"),
        ("pgd_l2_100 cnn6", "PGD-L2 100 steps last iterate, 1000 images, cnn6 w1", "img/s", "-",
         "~300 (RL-step roofline x 1.5 / 100)"),
        ("pgd_l2_100 alicnn", "PGD-L2 100 steps last iterate, 1000 images, alicnn w1", "img/s", "-",
         "~4.5k (RL-step roofline x 1.5 / 100)"),
        ("pgd_l2_100_early_stop alicnn", "PGD-L2 100 steps early stop, same images", "img/s", "-",
         "above the last-iterate rate"),
        ("aa_fast alicnn", "AutoAttack-grade cascade (--attack aa-fast), 1000 images, wall", "img/s",
         "-", "-"),
    ]
    return [dict(zip(("key", "label", "unit", "cpu", "roofline"), r)) for r in rows]


ROWS = _rows()

# CPU figures of the bench groups (RESULTS.md), by a substring of the GPU group's name
CPU_BENCH = {
    "float32 B=256 C=10": "study 333-438 us, eager reference 410-514 us",
    "pgd_step linf": "torchattacks-style 1.76-2.16 ms, reference 1.61-2.32 ms",
    "pgd_step l2": "torchattacks-style 1.82-2.42 ms, reference 0.77-1.04 ms",
    "grad_stats B=256 D=3072": "op 221-224 us",
}
