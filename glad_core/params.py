"""Run parameters: one flat mapping (a YAML file in params/, a notebook's parameters cell, CLI flags),
validated in full before any work starts, and expanded into cells (datasets x methods x seeds).

Every problem raises `ParamError` naming the key, the value and what is allowed.
"""
from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Callable

import yaml

from .checks import in_range, one_of, str_list
from .methods import REGISTRY
from .protocols import PROTOCOLS, TARGET_PARTS, Cell
from .train import DEFAULTS, TrainConfig


class ParamError(ValueError):
    """A parameter is unknown, of the wrong type or out of range."""


def _int_list(v: Any) -> str | None:
    ok = isinstance(v, list) and v and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v)
    return None if ok else "must be a non-empty list of integers >= 0"


def _types(default: Any) -> tuple[type, ...]:
    return (list, tuple) if isinstance(default, tuple) else (int, float) if isinstance(default, float) else (type(default),)


Entry = tuple[tuple[type, ...], Callable[[Any], "str | None"] | None, str]

# key: (types, check or None, description). Grid keys hold lists; the rest are single values.
SCHEMA: dict[str, Entry] = {
    "protocol": ((str,), one_of(PROTOCOLS), "evaluation protocol"),
    "datasets": ((list,), str_list, "datasets to train on (grid axis); the source for transfer protocols"),
    "methods": ((list,), lambda v: str_list(v) or next((f"unknown method {m!r}; allowed: {list(REGISTRY)}"
                                                         for m in v if m not in REGISTRY), None),
                "methods (grid axis)"),
    "seeds": ((list,), _int_list, "seeds (grid axis)"),
    "targets": ((list,), str_list, "datasets the source model is evaluated on (transfer protocols)"),
    "shots": ((int,), in_range(1), "training images per class"),
    "backbone": ((str,), None, "open_clip model name, 'hf-hub:' / 'local-dir:' id, or glad-mini"),
    "pretrained": ((str, type(None)), None, "open_clip pretrained tag or local checkpoint path; null = random init"),
    "data_root": ((str, type(None)), None, "folder holding the datasets in CoOp's layout (demo sets need none)"),
    "results_dir": ((str,), None, "where records and adapters are written"),
    "held_out": ((list,), str_list, "multi_source_dg: domains held out in turn (grid axis); [] = every domain"),
    "target_part": ((str,), one_of(TARGET_PARTS), "multi_source_dg: test the held-out domain on its test part "
                    "or on all its images"),
}
_SHARED_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "epochs": in_range(1), "batch_size": in_range(1), "lr": in_range(0, lo_open=True), "weight_decay": in_range(0),
    "kl_weight": in_range(0), "rho": in_range(0), "alpha": in_range(0, 1), "delta": in_range(0),
    "aug_scale_min": in_range(0, 1, lo_open=True), "num_workers": in_range(0),
    "eval_batch_size": in_range(1), "precision": one_of(("auto", "fp32", "bf16")),
    "device": lambda v: (None if re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v)
                         else "allowed: 'auto', 'cpu', 'cuda', 'cuda:<index>', 'mps'"),
}
#: Shared training knobs: null (the default) = each method's own default (glad_core.methods), else DEFAULTS.
SHARED_KEYS = tuple(DEFAULTS)
for key, default in DEFAULTS.items():
    SCHEMA[key] = ((*_types(default), type(None)), _SHARED_CHECKS.get(key),
                   f"training parameter (null: the method's default, else {default!r})")
#: The methods' own hyper-parameters (a flat key applies to every method of the grid declaring it).
METHOD_KEYS: dict[str, list[str]] = {}
for info in REGISTRY.values():
    for key, h in info.hparams.items():
        METHOD_KEYS.setdefault(key, []).append(info.name)
        SCHEMA.setdefault(key, ((*_types(h.default), type(None)), h.check, f"{h.doc} (default {h.default!r})"))
SCHEMA["method_settings"] = ((dict, type(None)), None, "settings of single methods, over the flat keys: "
                             "{method: {key: value}}, e.g. {coop: {lr: 0.002}}")

GRID_KEYS = ("datasets", "methods", "seeds")


def _fail(key: str, value: Any, why: str) -> ParamError:
    return ParamError(f"parameter {key!r} = {value!r} is invalid: {why}")


def _checked(key: str, value: Any, entry: Entry | None = None) -> Any:
    """`value` of `key` after its type and range checks (YAML's string floats converted)."""
    types, check, _ = entry or SCHEMA[key]
    if float in types and isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
        if not (value is None and type(None) in types):
            names = "/".join("null" if t is type(None) else t.__name__ for t in types)
            raise _fail(key, value, f"expected {names}")
    if check is not None and value is not None:
        why = check(value)
        if why:
            raise _fail(key, value, why)
    return value


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
    for key, value in list(out.items()):
        out[key] = _checked(key, value)
    settings = out["method_settings"] or {}
    for name, section in settings.items():
        if name not in REGISTRY:
            raise _fail("method_settings", name, f"unknown method; allowed: {list(REGISTRY)}")
        if not isinstance(section, dict):
            raise _fail(f"method_settings.{name}", section, "expected a mapping of key: value")
        allowed = set(SHARED_KEYS) | set(REGISTRY[name].hparams)
        for key, value in section.items():
            if key not in allowed:
                raise _fail(f"method_settings.{name}.{key}", value,
                            f"not a setting of method {name!r}; allowed: {sorted(allowed)}")
        settings[name] = {key: _checked(f"method_settings.{name}.{key}", value, SCHEMA[key])
                          for key, value in section.items()}
    out["method_settings"] = settings or None
    if out["protocol"] == "multi_source_dg":
        _check_multi_source(out)
        _check_backbone(out["backbone"])
        return out
    if out["held_out"]:
        raise _fail("held_out", out["held_out"], "only the multi_source_dg protocol holds domains out")
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
    """Every key: the grid's defaults; null for training keys (each method's own default applies)."""
    return {"protocol": "base_to_novel", "datasets": [], "methods": ["glad"], "seeds": [1], "targets": [],
            "shots": 16, "backbone": "glad-mini", "pretrained": None, "data_root": None, "results_dir": "results",
            "method_settings": None, "held_out": [], "target_part": "test",
            **{k: None for k in (*SHARED_KEYS, *METHOD_KEYS)}}


def domains_of(name: str) -> list[str]:
    """The domains a multi_source_dg run on set `name` may hold out (from its definition, no data read)."""
    from .domains import DOMAINBED, IMAGENET_DG
    return [IMAGENET_DG[name][1]] if name in IMAGENET_DG else list(DOMAINBED[name].domains)


def _check_multi_source(p: dict[str, Any]) -> None:
    """multi_source_dg: multi-domain sets, no targets, held-out domains that every set has."""
    from .domains import domain_set_names
    if not p["datasets"]:
        raise _fail("datasets", p["datasets"], "name at least one multi-domain set")
    for name in p["datasets"]:
        if name not in domain_set_names():
            raise _fail("datasets", name, f"multi_source_dg needs a multi-domain set; allowed: {domain_set_names()}")
    if p["targets"]:
        raise _fail("targets", p["targets"], "multi_source_dg tests held-out domains: use held_out, not targets")
    for name in p["datasets"]:
        missing = [h for h in p["held_out"] if h not in domains_of(name)]
        if missing:
            raise _fail("held_out", missing, f"not domains of {name!r}; its domains: {domains_of(name)}")


def _dataset_names() -> set[str]:
    from .datasets import dataset_names
    return set(dataset_names())


def _check_backbone(name: str) -> None:
    from .models import check_backbone_name
    try:
        check_backbone_name(name)
    except ValueError as e:
        raise _fail("backbone", name, str(e)) from None


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
    """The grid datasets x methods x seeds as cells, in that order (multi_source_dg: datasets x held-out
    domains x methods x seeds)."""
    p = validate(params)
    if p["protocol"] == "multi_source_dg":
        return [Cell(protocol=p["protocol"], dataset=d, shots=p["shots"], backbone=p["backbone"],
                     pretrained=p["pretrained"], targets=[h], data_root=p["data_root"], results_dir=p["results_dir"],
                     target_part=p["target_part"], train=train_config(p, m, s))
                for d in p["datasets"] for h in (p["held_out"] or domains_of(d)) for m in p["methods"]
                for s in p["seeds"]]
    return [Cell(protocol=p["protocol"], dataset=d, shots=p["shots"], backbone=p["backbone"],
                 pretrained=p["pretrained"], targets=list(p["targets"]), data_root=p["data_root"],
                 results_dir=p["results_dir"], train=train_config(p, m, s))
            for d in p["datasets"] for m in p["methods"] for s in p["seeds"]]


def train_config(p: dict[str, Any], method: str, seed: int) -> TrainConfig:
    """The config of `method` in validated parameters `p`: flat keys, then its own section over them."""
    flat = {k: v for k, v in p.items() if k in SHARED_KEYS or k in REGISTRY[method].hparams}
    merged = {k: v for k, v in {**flat, **(p["method_settings"] or {}).get(method, {})}.items() if v is not None}
    try:
        return TrainConfig.from_params(merged, method=method, seed=seed)
    except ValueError as e:
        raise ParamError(str(e)) from None


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`--key value` pairs; values are YAML (numbers, null, [lists]); list keys also take `a,b,c`."""
    out: dict[str, Any] = {}
    it = iter(pairs)
    for flag in it:
        if not flag.startswith("--"):
            raise ParamError(f"expected --name value, got {flag!r}")
        key = flag[2:].replace("-", "_")
        try:
            raw = next(it)
        except StopIteration:
            raise ParamError(f"parameter {key!r} has no value") from None
        value = yaml.safe_load(raw)
        if key in SCHEMA and list in SCHEMA[key][0] and not isinstance(value, list):
            value = [yaml.safe_load(x) for x in str(raw).split(",") if x.strip()]
        out[key] = value
    return out
