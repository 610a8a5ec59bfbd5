"""scripts/gpu_check.sh without a GPU: CPU mode and --dry-run skip every step and still write the
summary; each GPU step's code runs here on the CPU at small sizes (the kernels under the Triton
interpreter, strict mode), so a GPU run spends its minutes measuring, not debugging."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from gpu_check import evaluation, ext_ops, first_checks, summary, throughput  # noqa: E402
from gpu_check.record import StepRecord  # noqa: E402

from aerl_fast.analysis import grad_stats_backend  # noqa: E402
from aerl_fast.data.dali import dali_available  # noqa: E402

STEPS = ("install", "first", "ext", "kernels", "bench", "train", "eval")


def _script(tmp_path, *args):
    env = dict(os.environ, OUT=str(tmp_path / "out"), CUDA_VISIBLE_DEVICES="")
    return subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), *args], env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args, headline", [((), "No CUDA device here: every step skipped."),
                                            (("--dry-run",), "--dry-run: nothing ran")])
def test_without_a_gpu_every_step_is_skipped_and_the_summary_written(tmp_path, args, headline):
    proc = _script(tmp_path, *args)
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "out" / "gpu-summary.md").read_text()
    assert headline in text
    for name in STEPS:
        assert f"| {name} | skipped: no CUDA device |" in text
    dali = "skipped: no CUDA device" if dali_available() else "not run: DALI not installed"
    assert f"| DALI GPU cases | {dali} |" in text
    assert not list((tmp_path / "out" / "steps").glob("*.json"))  # nothing ran


def test_a_bad_argument_is_a_one_line_error(tmp_path):
    proc = _script(tmp_path, "--fast")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "gpu_check.sh: unknown argument --fast (usage: bash scripts/gpu_check.sh [--dry-run])"]


def test_the_summary_lays_out_what_the_steps_left(tmp_path, monkeypatch):
    out = tmp_path
    (out / "steps.tsv").write_text("first\tok\t40\t85\ntrain\tstopped: over its 105 s budget\t105\t105\n")
    rec = StepRecord(out, "first", "cuda:0")
    rec.note("NVIDIA H200, 139 GiB")
    rec.figure("train cnn6 rl bf16", 41234, "img/s")
    rec.check("a check that failed", lambda: 1 / 0)
    (out / "bench.json").write_text(json.dumps({"benchmarks": [{
        "group": "pg_loss fwd+bwd cuda float32 B=256 C=10", "name": "test_gpu_loss_triton[fp32-256-10]",
        "stats": {"median": 12e-6}, "extra_info": {"speedup_vs_baseline": 2.5, "bytes_per_s": 1.2e11,
                                                   "copy_bw_share": 0.03, "roofline_s": 0.4e-6}}]}))
    monkeypatch.setattr("aerl_fast.data.dali.dali_available", lambda: False)
    text = summary.render(out, "gpu")
    assert "| first | ok | 40 | 85 |" in text and "stopped: over its 105 s budget" in text
    assert "| DALI GPU cases | not run: DALI not installed |" in text
    assert "| train cnn6 w1 rl b256, bf16 channels_last | 41,234 img/s | - | ~42k |" in text
    assert "| train cnn6 w1 rl b256, eager fp32 channels_last | not measured |" in text
    assert "- NVIDIA H200, 139 GiB" in text
    assert "| first | a check that failed | FAIL | ZeroDivisionError: division by zero |" in text
    assert ("| 12.0 us | 2.5 | 120 GB/s (3% of copy) | 0.4 us | study 333-438 us, eager "
            "reference 410-514 us |") in text


@pytest.fixture
def strict_kernels(monkeypatch):
    """The steps' kernels under the interpreter, in the strict mode the script sets."""
    monkeypatch.setenv("AERL_FAST_KERNELS", "triton")


def _statuses(rec):
    return {c["name"]: c["status"] for c in rec.data["checks"]}


def test_first_checks_run_on_the_cpu(tmp_path, strict_kernels):
    rec = first_checks.main(["--out", str(tmp_path), "--device", "cpu", "--small"])
    st = _statuses(rec)
    want_ext = "ok" if grad_stats_backend("cpu") == "extension" else "FAIL"
    assert st.pop("grad_stats kernel vs float64 reference") == want_ext
    assert st.pop("PG loss B·C > 2^31 vs float64").startswith("skipped: needs a GPU with")
    assert st.pop("second GPU without set_device") == "skipped: one GPU"
    assert st.pop("2-epoch RL-adv --compile --amp: recompiles, graph breaks").startswith("skipped:")
    assert set(st.values()) == {"ok"}, st  # tiles, PGD bf16 channels_last, steps, loop, no fallback
    assert json.loads((tmp_path / "steps" / "first.json").read_text())["checks"] == rec.data["checks"]


def test_first_checks_catch_a_wrong_kernel(tmp_path, strict_kernels, monkeypatch):
    """A check meant to catch something, on an input built to trigger it: a PGD kernel off by a
    step fails the bf16 channels_last comparison."""
    from aerl_fast.kernels import pgd_update
    real = pgd_update._pgd_triton
    monkeypatch.setattr(pgd_update, "_pgd_triton",
                        lambda xa, x0, g, step, eps, *a: real(xa, x0, g, 2 * step, eps, *a))
    with pytest.raises(AssertionError, match="values off"):
        first_checks.check_pgd_bf16_channels_last(torch.device("cpu"), small=True)


def test_compile_log_counting():
    log = ("V1 [0/1] [__recompiles] Recompiling function forward in model.py:12\n"
           "    triggered by the following guard failure(s):\n"
           "V1 [0/2] [__recompiles] Recompiling function forward in model.py:12\n"
           "V1 [1/0] [__graph_breaks] Graph break in user code at objectives.py:80\n")
    assert first_checks.count_compile_events(log) == (2, 1)
    assert first_checks.count_compile_events("") == (0, 0)


def test_ext_ops_run_on_the_cpu(tmp_path):
    rec = ext_ops.main(["--out", str(tmp_path), "--device", "cpu", "--small"])
    st = _statuses(rec)
    assert st["tensor loader on the device vs the CPU loader, bit for bit"] == "ok"
    assert st["grad_stats op on the device vs the CPU op, opcheck"] == (
        "ok" if grad_stats_backend("cpu") == "extension" else "FAIL")
    assert st["DALI GPU loader vs the tensor loader, bit for bit"] == (
        "ok" if dali_available() else "not run: DALI not installed")


@pytest.mark.slow  # one train CLI run on the CPU (~30 s here)
def test_throughput_runs_the_train_cli_and_reads_its_log(tmp_path):
    rec = throughput.main(["--out", str(tmp_path), "--device", "cpu", "--small", "--budget", "240"])
    assert _statuses(rec) == {"train alicnn rl eager fp32": "ok"}
    (fig,) = rec.data["figures"]
    assert fig["key"] == "train alicnn rl eager fp32" and fig["value"] > 0
    out_of_time = throughput.main(["--out", str(tmp_path), "--device", "cpu", "--small", "--budget", "5"])
    assert _statuses(out_of_time)["train alicnn rl eager fp32"].startswith("not run: ")


def test_evaluation_times_pgd_and_looks_for_the_cascade(tmp_path):
    rec = evaluation.main(["--out", str(tmp_path), "--device", "cpu", "--small"])
    st = _statuses(rec)
    assert all(st[k] == "ok" for k in ("pgd_l2_100 alicnn", "pgd_l2_100_early_stop alicnn",
                                       "pgd_l2_100 cnn6")), st
    assert st["aa_fast alicnn"] == "not run: aa-fast not present in aerl_fast.evaluate" or \
        st["aa_fast alicnn"].startswith(("ok", "skipped"))
    assert {f["key"] for f in rec.data["figures"]} >= {"pgd_l2_100 alicnn", "pgd_l2_100 cnn6"}
    assert any("random weights" in n for n in rec.data["notes"])
