"""Work split across threads on the CPU: how many cores a call may use, and a runner of
independent tasks that never waits for a thread the OS has not scheduled.

numba's ``nogil`` kernels (and NumPy's ufuncs, reductions and GEMMs) release the GIL, so
disjoint pieces of one array run in parallel from Python threads.
"""

from __future__ import annotations

import _thread
import os
import threading
from typing import Any

__all__ = ["available_cores", "run_tasks"]


def available_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def run_tasks(kernel: Any, n_tasks: int, workers: int, *args: Any) -> None:
    """``kernel(*args, t0, t1)`` over tasks ``[0, n_tasks)``: on the calling thread alone, or
    in runs of tasks taken by ``workers`` threads as they become free (the caller is one of
    them).  The caller returns once every run is done; it never waits for a thread that has
    taken nothing (one the OS has not yet scheduled simply finds no work and ends)."""
    if workers <= 1 or n_tasks <= 1:
        kernel(*args, 0, n_tasks)
        return
    step = max(1, -(-n_tasks // (4 * workers)))
    starts = iter(range(0, n_tasks, step))
    lock = threading.Lock()
    left = [len(range(0, n_tasks, step))]
    done = threading.Event()
    errors: list[BaseException] = []

    def work() -> None:
        while True:
            with lock:
                t0 = next(starts, None)
            if t0 is None:
                return
            try:
                kernel(*args, t0, min(n_tasks, t0 + step))
            except BaseException as exc:
                errors.append(exc)
            with lock:
                left[0] -= 1
                if left[0] == 0:
                    done.set()

    for _ in range(workers - 1):
        # not threading.Thread: its start() waits until the new thread runs, which on a busy
        # machine is the very wait this scheme avoids
        try:
            _thread.start_new_thread(work, ())
        except RuntimeError:
            # no new thread: the interpreter is shutting down (Python 3.12 refuses threads to
            # an atexit handler, or to a non-daemon thread still running after the main one),
            # or the OS is out of threads.  The threads started, and this one, take every task
            break
    work()
    done.wait()
    if errors:
        raise errors[0]
