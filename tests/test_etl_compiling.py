"""The ETL watcher's heartbeat goes on while numba compiles (a first compile on a Pi 4 takes
longer than the supervisor's hang timeout), and only then."""

from __future__ import annotations

import time

import numba
import numpy as np

from daedalus.etl.compiling import heartbeat_while_compiling

DEADLINE = 30.0


def _fresh_kernel():  # a new dispatcher each call: nothing cached, it compiles at its first call
    @numba.njit(cache=False)
    def kernel(values: np.ndarray) -> float:
        total = 0.0
        for i in range(values.shape[0]):
            v = values[i]
            if v > 0:
                total += np.sqrt(v) * np.log1p(v)
            elif v < -1:
                total -= np.exp(v) / (1.0 + v * v)
            else:
                total += np.sin(v) * np.cos(v)
        return total

    return kernel


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_beats_while_a_kernel_compiles_and_not_while_idle() -> None:
    beats: list[float] = []
    with heartbeat_while_compiling(lambda: beats.append(time.monotonic()), every_seconds=0.005) as watch:
        wait_for(lambda: watch.ticks >= 20, "the keep-alive thread runs")
        assert beats == [] and not watch.compiling  # nothing compiles: no beat from the thread

        kernel = _fresh_kernel()
        started = time.monotonic()
        assert kernel(np.linspace(-3, 3, 101)) != 0.0  # compiles now, in this thread
        compiled = time.monotonic()
        assert watch.compiles == 1 and not watch.compiling
        assert beats and all(started <= b <= compiled for b in beats)

        during = len(beats)
        ticks = watch.ticks
        wait_for(lambda: watch.ticks >= ticks + 20, "the keep-alive thread runs on")
        assert len(beats) == during  # compiled: no more beats from the thread
        kernel(np.ones(3))  # the compiled kernel again: no compile, no beat
        assert watch.compiles == 1
    assert len(beats) == during


def test_a_listener_outside_the_block_is_gone() -> None:
    beats: list[float] = []
    with heartbeat_while_compiling(lambda: beats.append(time.monotonic()), every_seconds=0.005):
        pass
    _fresh_kernel()(np.ones(3))
    assert beats == []
