"""SIGKILL real `python -m evl_cache.cli ...` processes at seeded random points within their work.

A process's work is timed from the moment it starts writing (the caller says how to see that) to
the moment it is done, on a reference run in its own process: the imports before and the
interpreter's exit after are left out, so the kills land in the work itself.
"""
from __future__ import annotations

import time
from subprocess import Popen
from typing import Callable

import numpy as np


def time_work(process: Popen, begun: Callable[[], bool], finished: Callable[[], bool]) -> float:
    """Seconds from `begun()` to `finished()` of a running reference process, which must succeed."""
    started = done = None
    while process.poll() is None:
        now = time.monotonic()
        if started is None and begun():
            started = now
        if started is not None and done is None and finished():
            done = now
        time.sleep(0.002)
    assert process.returncode == 0 and started is not None, "the reference run failed"
    return (done or time.monotonic()) - started


def kill_at_random_points(starts: dict[int, Callable[[], Popen]], begun: Callable[[int], bool],
                          landed: Callable[[int], bool], work_seconds: float,
                          timeout: float = 120) -> dict[int, bool]:
    """Start every process of `starts` (seed -> start) at once and SIGKILL each a random time (drawn
    from its seed, within `work_seconds`) after `begun(seed)`. Returns seed -> whether the kill landed
    before the work was done (`landed(seed)`, asked after the kill; False if it finished first)."""
    processes = {seed: start() for seed, start in starts.items()}
    delays = {seed: float(np.random.default_rng(seed).uniform(0, work_seconds)) for seed in starts}
    kill_at: dict[int, float] = {}
    killed: dict[int, bool] = {}
    deadline = time.monotonic() + timeout
    while len(killed) < len(processes):
        now = time.monotonic()
        for seed, process in processes.items():
            if seed in killed:
                continue
            if process.poll() is not None:
                assert process.returncode == 0, f"seed {seed}: the run failed"
                killed[seed] = False
            elif seed not in kill_at and begun(seed):
                kill_at[seed] = now + delays[seed]
            elif (seed in kill_at and now >= kill_at[seed]) or now > deadline:
                process.kill()
                process.wait()
                killed[seed] = landed(seed)
        time.sleep(0.002)
    return killed
