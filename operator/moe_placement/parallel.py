"""Independent layers on every usable core: contiguous layer chunks, one per process, the first in
the calling process and the others in forked workers; or, for numpy work that leaves the GIL,
layers a few at a time on two threads (``in_order_on_threads``).

Fork, not spawn: a spawned worker re-imports numpy, pulp and highspy (about a second) before it does
anything, which a 5-10 s time limit cannot afford; a forked one starts in milliseconds with the
parent's modules. Forking is only safe from a process running one Python thread (a thread holding a
lock at the fork would leave the child's copy locked forever), so anywhere else, and where fork does
not exist, the chunks run one after the other here. Deadlines cross the fork as
``time.perf_counter()`` values: on Linux that is CLOCK_MONOTONIC, one clock for every process.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
# Layers of numpy work in flight at once on threads (numpy leaves the GIL for most of it).
LAYER_THREADS = 2
LAYERS_AHEAD = 8


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity, capped by a cgroup v2 CPU quota (a container's
    CPU limit) where there is one."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, int(float(quota) / float(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota readable: the affinity is the limit
    return max(cpus, 1)


def can_fork() -> bool:
    """Whether forked workers are safe here: Linux, and this process runs one Python thread."""
    return (
        sys.platform == "linux"
        and "fork" in multiprocessing.get_all_start_methods()
        and threading.active_count() == 1
        and threading.current_thread() is threading.main_thread()
    )


def worker_count(num_layers: int, workers: int | None) -> int:
    """Processes to split ``num_layers`` layers over: ``workers`` (None: every usable CPU), at most
    one per layer, and 1 where forking is not safe."""
    wanted = usable_cpus() if workers is None else workers
    if wanted <= 1 or num_layers <= 1 or not can_fork():
        return 1
    return min(wanted, num_layers)


def even_chunks(count: int, num_chunks: int) -> list[slice]:
    """``num_chunks`` contiguous slices of range(count), sizes differing by at most one."""
    bounds = [count * index // num_chunks for index in range(num_chunks + 1)]
    return [slice(start, stop) for start, stop in zip(bounds[:-1], bounds[1:])]


def run_chunks(function: Callable[..., Any], jobs: Sequence[tuple]) -> list[Any]:
    """``function(*job)`` for every job, in order: the first here, the others in forked workers at
    the same time. The jobs' arguments and results travel pickled."""
    if len(jobs) <= 1:
        return [function(*job) for job in jobs]
    with ProcessPoolExecutor(len(jobs) - 1, mp_context=multiprocessing.get_context("fork")) as pool:
        futures = [pool.submit(function, *job) for job in jobs[1:]]
        first = function(*jobs[0])
        return [first, *(future.result() for future in futures)]


def in_order_on_threads(calls: Iterable[tuple[Callable[..., Any], tuple]]) -> Iterator[Any]:
    """The result of each (function, arguments) of ``calls``, in order, up to LAYERS_AHEAD running at
    once on LAYER_THREADS threads. ``calls`` is read one call at a time as results are taken, so
    random numbers drawn to build the arguments are drawn in order: the results are those of one
    call after another."""
    with ThreadPoolExecutor(LAYER_THREADS) as threads:
        pending: deque[Future] = deque()
        for function, arguments in calls:
            pending.append(threads.submit(function, *arguments))
            if len(pending) == LAYERS_AHEAD:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
