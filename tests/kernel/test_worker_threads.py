"""Worker threads compute with the torch thread count of the thread that made their pool."""

from __future__ import annotations

import subprocess
import sys

from helpers.server import REPO

# In a fresh process (nothing else running): one torch thread, a matmul loop in a pool thread,
# the process's CPU time over the wall time. One thread: about 1. OpenMP's default team, which
# a plain pool thread gets (one thread per core): well above 1 with two cores or more.
_PROBE = """
import time, torch
from poegen.kernel.calls import worker_pool
torch.set_num_threads(1)
x = torch.randn(384, 384)
def load():
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(150):
        x @ x
    return (time.process_time() - cpu) / (time.perf_counter() - wall)
pool = worker_pool(1, "probe")
pool.submit(load).result()  # warm-up: the team starts
print(pool.submit(load).result())
"""


def test_worker_pool_threads_keep_the_torch_thread_count() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert float(done.stdout.strip()) < 1.15  # a plain ThreadPoolExecutor thread: 1.98 here
