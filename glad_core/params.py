"""Run parameters: one flat mapping (a YAML file in params/, a notebook's parameters cell, CLI flags),
validated in full before any work starts, and expanded into cells (datasets x methods x seeds).

Every problem raises `ParamError` naming the key, the value and what is allowed.
"""
from __future__ import annotations

import difflib
import math
import re
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml

from .protocols import PROTOCOLS, Cell
from .train import METHODS, TrainConfig


class ParamError(ValueError):
    """A parameter is unknown, of the wrong type or out of range."""


def _in(allowed: Iterable[Any]) -> Callable[[Any], str | None]:
    allowed = list(allowed)
    return lambda v: None if v in allowed else f"allowed: {allowed}"


def _range(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False):
    def check(v: float) -> str | None:
        if isinstance(v, float) and not math.isfinite(v):
            return "must be finite"
        bad = ((lo is not None and (v < lo or (lo_open and v == lo)))
               or (hi is not None and (v > hi or (hi_open and v == hi))))
        left, right = ("(" if lo_open else "["), (")" if hi_open else "]")
        return f"must be in {left}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}{right}" if bad else None
    return check


def _str_list(v: Any) -> str | None:
    return None if isinstance(v, list) and all(isinstance(x, str) for x in v) else "must be a list of strings"


def _int_list(v: Any) -> str | None:
    ok = isinstance(v, list) and v and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v)
    return None if ok else "must be a non-empty list of integers >= 0"


# key: (types, check or None, description). Grid keys hold lists; the rest are single values.
SCHEMA: dict[str, tuple[tuple[type, ...], Callable[[Any], str | None] | None, str]] = {
    "protocol": ((str,), _in(PROTOCOLS), "evaluation protocol"),
    "datasets": ((list,), _str_list, "datasets to train on (grid axis); the source for transfer protocols"),
    "methods": ((list,), lambda v: _str_list(v) or next((f"unknown method {m!r}; allowed: {list(METHODS)}"
                                                           for m in v if m not in METHODS), None),
                "methods (grid axis)"),
    "seeds": ((list,), _int_list, "seeds (grid axis)"),
    "targets": ((list,), _str_list, "datasets the source model is evaluated on (transfer protocols)"),
    "shots": ((int,), _range(1), "training images per class"),
    "backbone": ((str,), None, "open_clip model name, or glad-mini"),
    "pretrained": ((str, type(None)), None, "open_clip pretrained tag or local checkpoint path; null = random init"),
    "data_root": ((str, type(None)), None, "folder holding the datasets in CoOp's layout (demo sets need none)"),
    "results_dir": ((str,), None, "where records and adapters are written"),
}
_TRAIN_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "epochs": _range(1), "batch_size": _range(1), "lr": _range(0, lo_open=True), "weight_decay": _range(0),
    "rank": _range(1), "lora_scale": _range(), "lora_dropout": _range(0, 1, hi_open=True),
    "kl_weight": _range(0), "rho": _range(0), "alpha": _range(0, 1), "delta": _range(0),
    "aug_scale_min": _range(0, 1, lo_open=True), "seed": _range(0), "num_workers": _range(0),
    "eval_batch_size": _range(1), "precision": _in(("auto", "fp32", "bf16")),
    "lora_towers": lambda v: (None if v and all(isinstance(t, str) for t in v) and set(v) <= {"image", "text"}
                              else "allowed: subsets of ['image', 'text']"),
    "alignnet_hidden": lambda v: (None if v and all(type(h) is int and h > 0 for h in v)  # bools are not sizes
                                  else "must be positive ints"),
    "device": lambda v: (None if re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v)
                         else "allowed: 'auto', 'cpu', 'cuda', 'cuda:<index>', 'mps'"),
}
for f in fields(TrainConfig):
    if f.name not in ("method", "seed"):
        default = f.default
        types = (list, tuple) if isinstance(default, tuple) else (int, float) if isinstance(default, float) else (type(default),)
        SCHEMA[f.name] = (types, _TRAIN_CHECKS.get(f.name), f"training parameter (default {default!r})")

GRID_KEYS = ("datasets", "methods", "seeds")


def _fail(key: str, value: Any, why: str) -> ParamError:
    return ParamError(f"parameter {key!r} = {value!r} is invalid: {why}")


def validate(params: dict[str, Any]) -> dict[str, Any]:
    """Check every key, type and range; returns the parameters with defaults filled in."""
    if not isinstance(params, dict):
        raise ParamError(f"parameters must be a mapping of name: value, got {type(params).__name__}")
    for key in params:
        if key not in SCHEMA:
            near = difflib.get_close_matches(str(key), SCHEMA, n=1)
            hint = f" Did you mean {near[0]!r}?" if near else ""
            raise ParamError(f"unknown parameter {key!r} (= {params[key]!r}).{hint} Allowed: {sorted(SCHEMA)}")
    out = {**defaults(), **params}
    for key, value in out.items():
        types, check, _ = SCHEMA[key]
        if float in types and isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
            try:
                out[key] = value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, types):
            if not (value is None and type(None) in types):
                names = "/".join("null" if t is type(None) else t.__name__ for t in types)
                raise _fail(key, value, f"expected {names}")
        if check is not None and value is not None:
            why = check(value)
            if why:
                raise _fail(key, value, why)
    if out["protocol"] != "base_to_novel" and not out["targets"]:
        raise _fail("targets", out["targets"], f"protocol {out['protocol']} needs at least one target dataset")
    known = _dataset_names()
    for key in ("datasets", "targets"):
        for name in out[key]:
            if name not in known:
                raise _fail(key, name, f"unknown dataset; allowed: {sorted(known)}")
    if not out["datasets"]:
        raise _fail("datasets", out["datasets"], "name at least one dataset")
    _check_backbone(out["backbone"])
    return out


def defaults() -> dict[str, Any]:
    cfg = TrainConfig()
    train = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.to_dict().items() if k not in ("method", "seed")}
    return {"protocol": "base_to_novel", "datasets": [], "methods": ["glad"], "seeds": [1], "targets": [],
            "shots": 16, "backbone": "glad-mini", "pretrained": None, "data_root": None, "results_dir": "results",
            **train}


def _dataset_names() -> set[str]:
    from .datasets import dataset_names
    return set(dataset_names())


def _check_backbone(name: str) -> None:
    import open_clip
    allowed = set(open_clip.list_models()) | {"glad-mini"}
    if name not in allowed:
        near = difflib.get_close_matches(name, allowed, n=3)
        raise _fail("backbone", name, f"unknown model; close names: {near}; see open_clip.list_models() "
                                      "(or use glad-mini)")


def load(source: str | Path | dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """Read a YAML file (or take a mapping), apply overrides, validate."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.exists():
            raise ParamError(f"parameter file {path} does not exist; see params/ for examples")
        try:
            params = yaml.safe_load(path.read_text()) or {}
        except (yaml.YAMLError, ValueError) as e:  # ValueError: undecodable text, impossible dates
            raise ParamError(f"parameter file {path} is not valid YAML: {e}") from e
    else:
        params = dict(source)
    if not isinstance(params, dict):
        raise ParamError(f"parameters must be a mapping of name: value, got {type(params).__name__}")
    return validate({**params, **overrides})


def cells(params: dict[str, Any]) -> list[Cell]:
    """The grid datasets x methods x seeds as cells, in that order."""
    p = validate(params)
    train_keys = {f.name for f in fields(TrainConfig)} - {"method", "seed"}
    train = {k: (tuple(v) if isinstance(v, list) else v) for k, v in p.items() if k in train_keys}
    return [Cell(protocol=p["protocol"], dataset=d, shots=p["shots"], backbone=p["backbone"],
                 pretrained=p["pretrained"], targets=list(p["targets"]), data_root=p["data_root"],
                 results_dir=p["results_dir"], train=TrainConfig(method=m, seed=s, **train))
            for d in p["datasets"] for m in p["methods"] for s in p["seeds"]]
