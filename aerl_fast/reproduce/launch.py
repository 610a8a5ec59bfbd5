"""Running the matrix's cells as cluster jobs through submitit (`pip install "aerl_fast[cluster]"`).

    python -m aerl_fast.reproduce --preset matrix-cifar10 --launcher slurm --slurm-partition gpu \
        --slurm-gpus-per-job 1 --slurm-time 1440

Every unfinished cell becomes one job (`train_cell`: a new run, or a resume from last.pt); the
evaluation of each (dataset, seed) group whose cache is stale becomes one job once its cells are
done.  Jobs are `submitit.helpers.Checkpointable`: a job Slurm preempts or times out is requeued by
submitit and, being the same call, resumes from the cell's last checkpoint.  A job that fails
otherwise (killed, out of memory) is submitted again up to `max_retries` times, each a resume.
This process waits for the jobs, then writes the report.  `--launcher submitit-local` runs the same
jobs as local processes (submitit's LocalExecutor): the tests use it, and a workstation with
several GPUs can too.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from aerl_fast.errors import ConfigError, UserError
from aerl_fast.fields import check, setting

from .cells import cell_done, train_cell
from .evaluation import eval_cached, eval_dir, eval_key, evaluate_curves, evaluate_group, groups
from .matrix import Cell

try:  # the cluster extra; the local launcher needs none of it
    from submitit.helpers import Checkpointable as _Requeueable
except ImportError:  # pragma: no cover - exercised when the extra is missing
    _Requeueable = object

LAUNCHERS = ("local", "slurm", "submitit-local")
C = "cluster"
INSTALL_HINT = "the cluster launchers need submitit: pip install \"aerl_fast[cluster]\""


@dataclass
class ClusterOptions:
    launcher: str = setting("local", "local: train the cells in this process; slurm: one Slurm job per cell (submitit); "
                            "submitit-local: the same jobs as local processes", choices=LAUNCHERS, group=C)
    slurm_partition: Optional[str] = setting(None, "Slurm partition of the jobs", group=C)
    slurm_gpus_per_job: int = setting(1, "GPUs per job", lo=0, hi=64, group=C)
    slurm_cpus_per_task: int = setting(8, "CPUs per job", lo=1, hi=1024, group=C)
    slurm_mem_gb: int = setting(32, "memory per job in GB", lo=1, group=C)
    slurm_time: int = setting(1440, "time limit per job in minutes (a job that reaches it is requeued and resumes)",
                              lo=1, group=C)
    slurm_account: Optional[str] = setting(None, "Slurm account", group=C)
    slurm_qos: Optional[str] = setting(None, "Slurm QOS", group=C)
    max_retries: int = setting(2, "resubmissions of a failed cell job (each resumes from its last checkpoint)",
                               lo=0, hi=100, group=C)

    def validate(self) -> "ClusterOptions":
        return check(self)


class CellJob(_Requeueable):
    """One cell's training as a job; requeued on preemption/time-out (the rerun resumes)."""

    def __call__(self, cell: Cell, runs: str) -> str:
        train_cell(cell, Path(runs), log=lambda m: print(m, flush=True))
        return cell.name


class GroupEvalJob(_Requeueable):
    """One (dataset, seed) group's evaluation and accuracy over epochs as a job."""

    def __call__(self, members: List[Cell], root: str, config, data_dir: Optional[str]) -> str:
        log = lambda m: print(m, flush=True)  # noqa: E731
        out = evaluate_group(members, Path(root), config, data_dir, log)
        evaluate_curves(members, Path(root), config, data_dir, log)
        return str(out)


def check_launcher(cluster: ClusterOptions) -> None:
    """What a cluster launcher needs, checked before anything starts."""
    if cluster.launcher == "local":
        return
    try:
        import submitit  # noqa: PLC0415, F401
    except ImportError:
        raise ConfigError(f"--launcher {cluster.launcher}: {INSTALL_HINT}") from None
    if cluster.launcher == "slurm" and not cluster.slurm_partition:
        raise ConfigError("--launcher slurm needs --slurm-partition")


def make_executor(cluster: ClusterOptions, folder: Path):
    check_launcher(cluster)
    import submitit  # noqa: PLC0415
    try:
        executor = submitit.AutoExecutor(folder=str(folder), cluster="slurm" if cluster.launcher == "slurm" else "local")
    except RuntimeError as exc:  # e.g. no srun: not on a Slurm cluster
        raise ConfigError(f"--launcher {cluster.launcher}: {exc}") from None
    params = dict(timeout_min=cluster.slurm_time, gpus_per_node=cluster.slurm_gpus_per_job,
                  cpus_per_task=cluster.slurm_cpus_per_task, mem_gb=cluster.slurm_mem_gb, name="aerl_fast")
    if cluster.launcher == "slurm":
        params["slurm_partition"] = cluster.slurm_partition
        extra = {k: v for k, v in (("account", cluster.slurm_account), ("qos", cluster.slurm_qos)) if v}
        if extra:
            params["slurm_additional_parameters"] = extra
    else:
        import torch  # noqa: PLC0415
        params["gpus_per_node"] = min(cluster.slurm_gpus_per_job, torch.cuda.device_count())
    executor.update_parameters(**params)
    return executor


def _wait(jobs, log) -> list:
    """(label, job) pairs whose job failed, after waiting for all of them."""
    failed = []
    for label, job in jobs:
        try:
            job.result()
            log(f"  job {job.job_id} ({label}): done")
        except Exception as exc:  # noqa: BLE001 - submitit raises FailedJobError, UncompletedJobError, ...
            first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            log(f"  job {job.job_id} ({label}): failed ({first}); its log: {job.paths.stderr}")
            failed.append((label, job))
    return failed


def run_cells(cells: List[Cell], root: Path, cluster: ClusterOptions, log) -> None:
    """Train every unfinished cell as a job and wait for them, resubmitting failed ones."""
    runs = root / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    todo = [c for c in cells if not cell_done(c, runs / c.name)]
    if not todo:
        log(f"{len(cells)} cells done: no training job to submit")
        return
    executor = make_executor(cluster, root / "jobs")
    for attempt in range(cluster.max_retries + 1):
        with executor.batch():
            pending = [(c, executor.submit(CellJob(), c, str(runs))) for c in todo]
        log(f"submitted {len(pending)} cell job(s)" + (f" (retry {attempt})" if attempt else "") + ": "
            + ", ".join(f"{c.name}={j.job_id}" for c, j in pending))
        failed = _wait([(c.name, j) for c, j in pending], log)
        todo = [c for c, j in pending if (c.name, j) in failed and not cell_done(c, runs / c.name)]
        if not todo:
            return
    raise UserError(f"{len(todo)} cell(s) failed after {cluster.max_retries} retries: "
                    f"{', '.join(c.name for c in todo)} (see {root / 'jobs'})")


def run_evaluations(cells: List[Cell], root: Path, config, data_dir, cluster: ClusterOptions, log) -> None:
    """One evaluation job per (dataset, seed) group whose cached evaluation is stale."""
    stale = []
    for (ds, seed), members in groups(cells).items():
        run_dirs = [root / "runs" / c.name for c in members]
        if not eval_cached(eval_dir(root, ds, seed), run_dirs, eval_key(config, run_dirs, data_dir)):
            stale.append(members)
    if not stale:
        log("evaluations cached: no evaluation job to submit")
        return
    executor = make_executor(cluster, root / "jobs")
    with executor.batch():
        jobs = [(f"eval {m[0].ds} seed {m[0].seed}", executor.submit(GroupEvalJob(), m, str(root), config, data_dir))
                for m in stale]
    log(f"submitted {len(jobs)} evaluation job(s): " + ", ".join(f"{lb}={j.job_id}" for lb, j in jobs))
    failed = _wait(jobs, log)
    if failed:
        raise UserError(f"evaluation job(s) failed: {', '.join(lb for lb, _ in failed)} (see {root / 'jobs'})")
