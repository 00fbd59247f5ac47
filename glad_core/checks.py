"""Value checks shared by parameter validation and the methods' own hyper-parameters.

A check takes a value and returns None when it is valid, else a short reason ("must be in [0, 1]").
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable

Check = Callable[[Any], "str | None"]


def one_of(allowed: Iterable[Any]) -> Check:
    allowed = list(allowed)
    return lambda v: None if v in allowed else f"allowed: {allowed}"


def in_range(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False) -> Check:
    def check(v: float) -> str | None:
        if isinstance(v, float) and not math.isfinite(v):
            return "must be finite"
        bad = ((lo is not None and (v < lo or (lo_open and v == lo)))
               or (hi is not None and (v > hi or (hi_open and v == hi))))
        left, right = ("(" if lo_open else "["), (")" if hi_open else "]")
        return f"must be in {left}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}{right}" if bad else None
    return check


def boolean(v: Any) -> str | None:
    return None if isinstance(v, bool) else "must be true or false"


def str_list(v: Any) -> str | None:
    return None if isinstance(v, list) and all(isinstance(x, str) for x in v) else "must be a list of strings"


def positive_ints(v: Any) -> str | None:
    return None if v and all(type(h) is int and h > 0 for h in v) else "must be positive ints"  # bools are not sizes


def subset_of(allowed: Iterable[str]) -> Check:
    allowed = list(allowed)
    return lambda v: (None if v and all(isinstance(t, str) for t in v) and set(v) <= set(allowed)
                      else f"allowed: non-empty subsets of {allowed}")
