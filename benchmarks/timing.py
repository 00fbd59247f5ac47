"""Side-by-side timing shared by the benchmark scripts: every configuration once per round, in rotating order."""
from __future__ import annotations

import time
from typing import Any, Callable, Sequence


def interleave(fns: dict[str, Callable[[], Any]], rounds: int, warmup: Sequence[str] = (),
               sync: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """Seconds per call of each function: warm-up calls, then `rounds` rounds in rotating order."""
    for name in warmup:
        fns[name]()
    sync()
    names, times = list(fns), {n: [] for n in fns}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t = time.perf_counter()
            fns[name]()
            sync()
            times[name].append(time.perf_counter() - t)
    return times
