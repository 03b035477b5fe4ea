"""Run one benchmark phase in a spawned process, so its peak memory and threads are its own.

``spawn`` (not ``fork``) keeps CUDA and OpenMP state out of the child; the child puts one result
dict on the queue it is given, and a child that dies without one is an error naming the phase.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
from collections.abc import Callable
from typing import Any


def run_in_child(target: Callable[..., None], args: tuple, what: str) -> dict[str, Any]:
    """Call ``target(*args, results)`` in a spawned process and return the dict it reports."""
    context = mp.get_context("spawn")
    results = context.Queue()
    process = context.Process(target=target, args=(*args, results))
    process.start()
    while True:
        try:
            result = results.get(timeout=1.0)
            break
        except queue.Empty:
            if not process.is_alive():
                raise RuntimeError(f"{what}: benchmark process died ({process.exitcode})") from None
    process.join(timeout=60)
    return result


def status_mib(field: str) -> float:
    """``VmRSS`` / ``VmHWM`` (current / peak resident set) of this process in MiB, from Linux's
    ``/proc/self/status``: the children's memory figures."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)
