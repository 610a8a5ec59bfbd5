"""One thread count for every benchmark in the session: BENCH_THREADS (default 1).

One thread is the default because on our shared 2-core machines a second OpenMP thread that waits
on a busy core stalls every small op (training steps ran up to ~10x slower), while one thread gives
stable ratios.  Set BENCH_THREADS=2 (or more) on a quiet machine.  Every ratio compares cases run at
the same thread count in the same process.

The session also keeps freed memory in glibc's heap (`runtime.keep_freed_memory`), as
`aerl_fast.train` and `aerl_fast.evaluate` do on the CPU, so our cases run as users run them.  The
baselines, in the same process, get it too: it removes page faults from their many temporaries
(the study's per-statistic passes drop from 8.5-12 ms to 2.3-2.7 ms), so our ratios are conservative.
"""
import os

import torch

from aerl_fast import runtime

THREADS = int(os.environ.get("BENCH_THREADS", "1"))
torch.set_num_threads(THREADS)
KEEPS_FREED_MEMORY = runtime.keep_freed_memory()


def pytest_report_header(config):
    return (f"aerl_fast bench: torch threads = {THREADS} (BENCH_THREADS); freed memory kept in the heap: "
            f"{KEEPS_FREED_MEMORY}")
