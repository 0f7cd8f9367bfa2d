"""Worker threads compute with the torch thread count of the thread that made their pool.

``torch.set_num_threads(n)`` reaches OpenMP as a per-thread setting of the calling thread, and
``torch.get_num_threads()`` answers n in every thread whatever OpenMP will use there, so the
probe asks OpenMP itself: ``omp_get_max_threads()`` (the team size a parallel region started in
that thread gets), through the libgomp/libiomp that torch loaded. The configured count is one
more than what a fresh thread starts with, so a pool thread left at OpenMP's default reads a
different number on any machine, one core included.
"""

from __future__ import annotations

import json
import subprocess
import sys

from helpers.server import REPO
from helpers.timing import scaled

# In a fresh process: the count a new thread starts from (OpenMP's default: OMP_NUM_THREADS or
# one per core), then torch.set_num_threads(default + 1) in the main thread; the team size read
# in a plain thread, in worker_pool's threads, and in the sampler's expert threads (two factors:
# ExpertCalls runs them on its pool).
_PROBE = """
import ctypes, json, threading, torch
from poegen.expert_servers.analytic import GaussianMixture
from poegen.kernel.calls import worker_pool
from poegen.kernel.sampler import sample
from poegen.kernel.spec import Factor, SamplerSettings

maps = open("/proc/self/maps").read().split()
omp = ctypes.CDLL(next(p for p in maps if "libgomp" in p or "libiomp" in p))

def team():
    return int(omp.omp_get_max_threads())

def in_new_thread(fn):
    out = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    thread.join()
    return out[0]

default = in_new_thread(team)
configured = default + 1
torch.set_num_threads(configured)
pool = worker_pool(2, "probe")
pooled = [pool.submit(team).result() for _ in range(4)]
seen = set()

class Probe(GaussianMixture):
    def velocity(self, x, sigma):
        seen.add((threading.current_thread().name.rsplit("_", 1)[0], team()))
        return super().velocity(x, sigma)

factors = [Factor(Probe([[0.0, 0.0]], [[1.0, 1.0]], [1.0], name="p")),
           Factor(Probe([[1.0, 0.0]], [[2.0, 2.0]], [1.0], name="q"))]
sample(factors, (2,), SamplerSettings(num_particles=4, num_steps=3, mcmc_steps=0),
       generator=torch.Generator().manual_seed(0))
print(json.dumps(dict(
    openmp="OpenMP" in torch.__config__.parallel_info(), default=default,
    configured=configured, main=team(), torch_in_plain=in_new_thread(torch.get_num_threads),
    plain=in_new_thread(team), pool=pooled, sampler=sorted(seen),
)))
"""


def test_worker_pool_threads_keep_the_torch_thread_count() -> None:
    done = subprocess.run([sys.executable, "-c", _PROBE], cwd=REPO, capture_output=True,
                          text=True, check=True, timeout=scaled(120))  # fmt: skip
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["openmp"], "torch's intra-op backend is not OpenMP: the probe reads OpenMP"
    n = got["configured"]
    assert got["main"] == n
    # the probe tells the two apart: a thread nobody configured reads OpenMP's default, while
    # torch.get_num_threads() there still claims the configured count
    assert got["plain"] == got["default"] != n
    assert got["torch_in_plain"] == n
    assert got["pool"] == [n] * 4
    assert got["sampler"] == [["poegen-expert", n]]
