"""The README's Python API runs as written (tiny settings), and its Slurm command line parses into
the cluster options that submitit turns into the expected batch script."""
import os
import re
import shlex
import stat
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def _section(title):
    text = README.read_text()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 3)
    return text[start:end if end > 0 else None]


def _blocks(lang, section):
    return re.findall(rf"```{lang}\n(.*?)```", _section(section), flags=re.S)


def test_python_api_blocks_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    blocks = [b for b in _blocks("python", "Python API") if "logits" not in b]  # the last block is a sketch
    assert len(blocks) == 3 and "train.run(" in blocks[0] and "evaluate.run(" in blocks[1]
    for code in blocks:
        exec(compile(code, str(README), "exec"), {})
    assert (tmp_path / "runs" / "api-rl" / "summary.json").is_file()
    assert (tmp_path / "results" / "api" / "metrics.json").is_file()
    assert "python -m aerl_fast.train" in capsys.readouterr().out  # print_commands listed the smoke cells


def test_the_slurm_command_line_builds_the_batch_script(tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    from aerl_fast.cli import given
    from aerl_fast.reproduce import ClusterOptions
    from aerl_fast.reproduce.cli import build_parser
    from aerl_fast.reproduce.launch import make_executor
    (line,) = [ln for b in _blocks("bash", "Python API") for ln in [b.replace("\\\n", " ")] if "--launcher slurm" in ln]
    argv = shlex.split(line)[3:]
    cluster = ClusterOptions(**given(build_parser().parse_args(argv), ClusterOptions)).validate()
    assert (cluster.launcher, cluster.slurm_partition, cluster.slurm_gpus_per_job, cluster.slurm_time) == \
        ("slurm", "gpu", 1, 1440)
    for tool in ("srun", "sbatch"):  # submitit looks for Slurm's tools before it writes anything
        f = tmp_path / "bin" / tool
        f.parent.mkdir(exist_ok=True)
        f.write_text("#!/bin/sh\nexit 0\n")
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    script = make_executor(cluster, tmp_path / "jobs")._executor._make_submission_file_text("true", "uid")
    for directive in ("--partition=gpu", "--gpus-per-node=1", "--time=1440", "--cpus-per-task=8", "--mem=32GB"):
        assert f"#SBATCH {directive}" in script, script
