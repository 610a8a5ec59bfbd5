"""One thread count for every benchmark in the session: BENCH_THREADS (default 1).

One thread is the default because on our shared 2-core machines a second OpenMP thread that waits
on a busy core stalls every small op (training steps ran up to ~10x slower), while one thread gives
stable ratios.  Set BENCH_THREADS=2 (or more) on a quiet machine.  Every ratio compares cases run at
the same thread count in the same process.
"""
import os

import torch

THREADS = int(os.environ.get("BENCH_THREADS", "1"))
torch.set_num_threads(THREADS)


def pytest_report_header(config):
    return f"aerl_fast bench: torch threads = {THREADS} (BENCH_THREADS)"
