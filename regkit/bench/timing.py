"""Timing helpers: warm-up calls left out, CUDA synchronised around every timed call, the
fastest and the median of the timed calls.

A clock is any function returning seconds (``time.perf_counter`` by default); tests pass a fake
one. Calls are timed one at a time, never in a loop divided by its count, so a single slow call
(another process waking up) shows as one outlier that the median and the fastest call ignore.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch

from regkit.device import synchronize

Clock = Callable[[], float]


@dataclass
class Timings:
    """The seconds of each timed call; ``first`` is the first (warm-up) call's, not in ``times``;
    ``result`` is what the last call returned."""

    times: List[float] = field(default_factory=list)
    first: Optional[float] = None
    result: Any = None

    @property
    def fastest(self) -> float:
        return min(self.times)

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def timed_call(fn: Callable[[], Any], device: Union[str, torch.device, None] = None,
               clock: Clock = time.perf_counter) -> Tuple[float, Any]:
    """``(seconds, fn())``: the device is synchronised before the clock starts and before it stops,
    so the time is that of the work ``fn`` queued, not of launching it."""
    device = torch.device(device) if device is not None else None
    if device is not None:
        synchronize(device)
    start = clock()
    result = fn()
    if device is not None:
        synchronize(device)
    return clock() - start, result


def time_calls(fn: Callable[[], Any], repeats: int, warmup: int = 1,
               device: Union[str, torch.device, None] = None, clock: Clock = time.perf_counter) -> Timings:
    """``warmup`` untimed calls (the first one's time is kept as ``first``), then ``repeats``
    timed calls."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    out = Timings()
    for k in range(warmup):
        seconds, out.result = timed_call(fn, device, clock)
        if k == 0:
            out.first = seconds
    for _ in range(repeats):
        seconds, out.result = timed_call(fn, device, clock)
        out.times.append(seconds)
    return out


def interleave(calls: Mapping[str, Callable[[], Any]], counts: Mapping[str, int],
               device: Union[str, torch.device, None] = None, clock: Clock = time.perf_counter,
               on_round: Optional[Callable[[int, int], None]] = None) -> Dict[str, Timings]:
    """Time several methods taking turns call by call, so that machine noise hits them alike:
    round ``k`` calls every method that has fewer than ``counts[name]`` timed calls. No warm-up
    here (warm the methods up first). ``on_round(k, rounds)`` is told after each round."""
    out = {name: Timings() for name in calls}
    rounds = max(counts.values(), default=0)
    for k in range(rounds):
        for name, fn in calls.items():
            if k < counts[name]:
                seconds, out[name].result = timed_call(fn, device, clock)
                out[name].times.append(seconds)
        if on_round is not None:
            on_round(k + 1, rounds)
    return out
