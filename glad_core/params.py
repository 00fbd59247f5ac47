"""Run parameters: one flat mapping (a YAML file in params/, a notebook's parameters cell, CLI flags),
validated in full before any work starts, and expanded into cells (datasets x methods x seeds).

Which value a method gets, from the lowest precedence to the highest:

1. its registered default (`glad_core.methods`: its published recipe, else the shared default `SHARED`);
2. a flat key of the file (or the command line): it applies to *every* method of the grid that reads
   it, so a flat shared key (`epochs: 2`) overrides the baselines' recipes too: meant for a demo or a
   smoke run of every method alike; a flat hyper-parameter applies to every method declaring it;
3. `method_settings: {method: {key: value}}`: one method's deliberate change.

The paper files (params/*.yaml) therefore hold only the protocol's keys flat (datasets, shots, seeds,
backbone, ...) and state GLAD's values under `method_settings`, so every baseline keeps its recipe.
`explain` (`python -m glad_core.batch FILE --dry-run --explain`) shows every method's resolved values
and where each came from.

Every problem raises `ParamError` naming the key, the value and what is allowed.
"""
from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterator

import yaml

from .checks import in_range, one_of, str_list
from .methods import REGISTRY, SHARED, Hparam
from .protocols import PROTOCOLS, TARGET_PARTS, Cell
from .config import TrainConfig


class ParamError(ValueError):
    """A parameter is unknown, of the wrong type or out of range."""


def _int_list(v: Any) -> str | None:
    ok = v and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v)
    return None if ok else "must be a non-empty list of integers >= 0"


def _methods(v: list) -> str | None:
    return str_list(v) or next((f"unknown method {m!r}; allowed: {list(REGISTRY)}" for m in v if m not in REGISTRY),
                               None)


_LIST, _STR, _OPT_STR = (list,), (str,), (str, type(None))
#: The protocol's keys (not the methods'). Grid keys hold lists; the rest are single values.
PROTOCOL_KEYS: dict[str, Hparam] = {
    "protocol": Hparam("base_to_novel", "evaluation protocol", one_of(PROTOCOLS)),
    "datasets": Hparam([], "datasets to train on (grid axis); the source for transfer protocols", str_list, _LIST),
    "methods": Hparam(["glad"], "methods (grid axis)", _methods, _LIST),
    "seeds": Hparam([1], "seeds (grid axis)", _int_list, _LIST),
    "targets": Hparam([], "datasets the source model is evaluated on (transfer protocols)", str_list, _LIST),
    "shots": Hparam(16, "training images per class", in_range(1)),
    "backbone": Hparam("glad-mini", "open_clip model name, 'hf-hub:' / 'local-dir:' id, or glad-mini"),
    "pretrained": Hparam(None, "open_clip pretrained tag or local checkpoint path; null = random init", types=_OPT_STR),
    "data_root": Hparam(None, "folder holding the datasets in CoOp's layout (demo sets need none)", types=_OPT_STR),
    "results_dir": Hparam("results", "where records and adapters are written"),
    "feature_cache": Hparam(True, "keep the image features of test splits of methods with a frozen image tower "
                                  "in <results_dir>/feature_cache and reuse them (false: encode every time; "
                                  "--no-feature-cache); never changes the numbers"),
    "held_out": Hparam([], "multi_source_dg: domains held out in turn (grid axis); [] = every domain", str_list,
                       _LIST),
    "target_part": Hparam("test", "multi_source_dg: test the held-out domain on its test part or on all its images",
                          one_of(TARGET_PARTS)),
    "method_settings": Hparam(None, "settings of single methods, over the flat keys: {method: {key: value}}, "
                              "e.g. {coop: {lr: 0.002}}", types=(dict, type(None))),
}
GRID_KEYS = ("datasets", "methods", "seeds")


def method_keys() -> dict[str, list[str]]:
    """Every method's own hyper-parameter: the registered methods declaring it (read when called, so a
    method registered after this module is imported counts)."""
    out: dict[str, list[str]] = {}
    for info in REGISTRY.values():
        for key in info.hparams:
            out.setdefault(key, []).append(info.name)
    return out


class _Schema(Mapping):
    """Every key a parameter mapping may hold -> its `Hparam`: the protocol's, the shared knobs (null: the
    method's default), then the methods' own (a key several methods declare shows its first declaration;
    values are checked by each method's own). Computed on access, so it includes later registrations."""

    def _all(self) -> dict[str, Hparam]:
        own = {k: REGISTRY[names[0]].hparams[k] for k, names in method_keys().items()}
        return {**PROTOCOL_KEYS, **SHARED, **{k: h for k, h in own.items() if k not in SHARED}}

    def __getitem__(self, key: str) -> Hparam:
        return self._all()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())


SCHEMA: Mapping[str, Hparam] = _Schema()


class Validated(dict):
    """Parameters `validate` returned: `cells` does not validate them again."""


def _fail(key: str, value: Any, why: str) -> ParamError:
    return ParamError(f"parameter {key!r} = {value!r} is invalid: {why}")


def _parsed(key: str, value: Any, knob: Hparam, nullable: bool = False, label: str | None = None) -> Any:
    """`value` parsed by `knob` (null allowed where `nullable`), or a ParamError naming `label` or `key`."""
    if value is None and (nullable or knob.default is None):
        return None
    try:
        return knob.parse(value)
    except ValueError as e:
        raise _fail(label or key, value, str(e)) from None


def validate(params: dict[str, Any]) -> Validated:
    """Check every key, type and range (each method's keys by that method's own `Hparam`); returns the
    parameters with defaults filled in."""
    if not isinstance(params, dict):
        raise ParamError(f"parameters must be a mapping of name: value, got {type(params).__name__}")
    own = method_keys()
    for key in params:
        if key not in PROTOCOL_KEYS and key not in SHARED and key not in own:
            known = sorted({*PROTOCOL_KEYS, *SHARED, *own})
            near = difflib.get_close_matches(str(key), known, n=1)
            hint = f" Did you mean {near[0]!r}?" if near else ""
            raise ParamError(f"unknown parameter {key!r} (= {params[key]!r}).{hint} Allowed: {known}")
    out = {**defaults(), **params}
    for key, knob in PROTOCOL_KEYS.items():
        out[key] = _parsed(key, out[key], knob)
    for key, knob in SHARED.items():
        out[key] = _parsed(key, out[key], knob, nullable=True)
    for key, names in own.items():  # a flat key applies to, and is checked by, every method of the grid declaring it
        if key not in SHARED and out[key] is not None:
            for name in (n for n in out["methods"] if n in names):
                try:
                    REGISTRY[name].hparams[key].parse(out[key])
                except ValueError as e:
                    raise _fail(key, out[key], f"{e} (a flat key: checked by method {name!r}, which declares it; "
                                "set other values per method under method_settings)") from None
    settings = dict(out["method_settings"] or {})
    for name, section in settings.items():
        if name not in REGISTRY:
            raise _fail("method_settings", name, f"unknown method; allowed: {list(REGISTRY)}")
        if not isinstance(section, dict):
            raise _fail(f"method_settings.{name}", section, "expected a mapping of key: value")
        knobs = {**SHARED, **REGISTRY[name].hparams}
        for key, value in section.items():
            if key not in knobs:
                raise _fail(f"method_settings.{name}.{key}", value,
                            f"not a setting of method {name!r}; allowed: {sorted(knobs)}")
        settings[name] = {key: _parsed(key, value, knobs[key], nullable=key in SHARED,
                                       label=f"method_settings.{name}.{key}") for key, value in section.items()}
    out["method_settings"] = settings or None
    if out["protocol"] == "multi_source_dg":
        _check_multi_source(out)
    else:
        _check_transfer(out)
    _check_backbone(out["backbone"])
    return Validated(out)


def _check_transfer(out: dict[str, Any]) -> None:
    """The other protocols: known datasets and targets (at least one where the protocol transfers), no
    held-out domains."""
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


def defaults() -> dict[str, Any]:
    """Every key: the protocol's defaults; null for the methods' keys (each method's own default applies)."""
    protocol = {k: list(h.default) if isinstance(h.default, list) else h.default for k, h in PROTOCOL_KEYS.items()}
    return {**protocol, **{k: None for k in (*SHARED, *method_keys())}}


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


def read(source: str | Path | dict[str, Any]) -> dict[str, Any]:
    """The mapping of a YAML file (or a copy of a mapping), not validated."""
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
    return params


def load(source: str | Path | dict[str, Any], **overrides: Any) -> Validated:
    """Read a YAML file (or take a mapping), apply overrides, validate."""
    return validate({**read(source), **overrides})


def cells(params: dict[str, Any]) -> list[Cell]:
    """The grid datasets x methods x seeds as cells, in that order (multi_source_dg: datasets x held-out
    domains x methods x seeds). Parameters `validate` returned are not validated again."""
    p = params if isinstance(params, Validated) else validate(params)
    configs = {(m, s): train_config(p, m, s) for m in p["methods"] for s in p["seeds"]}
    shared = dict(protocol=p["protocol"], shots=p["shots"], backbone=p["backbone"], pretrained=p["pretrained"],
                  data_root=p["data_root"], results_dir=p["results_dir"], feature_cache=p["feature_cache"])
    if p["protocol"] == "multi_source_dg":
        return [Cell(dataset=d, targets=[h], target_part=p["target_part"], train=configs[m, s], **shared)
                for d in p["datasets"] for h in (p["held_out"] or domains_of(d)) for m in p["methods"]
                for s in p["seeds"]]
    return [Cell(dataset=d, targets=list(p["targets"]), train=configs[m, s], **shared)
            for d in p["datasets"] for m in p["methods"] for s in p["seeds"]]


def train_config(p: dict[str, Any], method: str, seed: int) -> TrainConfig:
    """The config of `method` in validated parameters `p`: its defaults, the flat keys it reads or declares,
    then its own `method_settings` section over them."""
    own = REGISTRY[method].hparams
    flat = {k: v for k, v in p.items() if k in SHARED or k in own}
    merged = {k: v for k, v in {**flat, **(p["method_settings"] or {}).get(method, {})}.items() if v is not None}
    try:
        return TrainConfig.from_params(merged, method=method, seed=seed)
    except ValueError as e:
        raise ParamError(str(e)) from None


SOURCES = ("method default", "file", "method_settings", "command line")


def explain(source: str | Path | dict[str, Any], overrides: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Per method of the grid: every resolved value it reads (`TrainConfig.to_dict`: the shared knobs it
    reads and its own hyper-parameters) and where each came from (one of `SOURCES`: a method_settings
    given on the command line counts as the command line)."""
    overrides = overrides or {}
    raw = read(source)
    p = validate({**raw, **overrides})
    out = []
    for method in p["methods"]:
        cfg = train_config(p, method, p["seeds"][0]).to_dict()
        section = (p["method_settings"] or {}).get(method, {})

        def where(key: str) -> str:
            if key in section:
                return "command line" if "method_settings" in overrides else "method_settings"
            if p.get(key) is not None:
                return "command line" if key in overrides else "file"
            return "method default"
        values = {k: v for k, v in cfg.items() if k not in ("method", "seed")}
        out.append({"method": method, "params": json.loads(json.dumps(values, default=str)),
                    "sources": {k: where(k) for k in values}})
    return out


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`--key value` pairs; values are YAML (numbers, null, [lists]); list keys also take `a,b,c`; `--no-key`
    (no value) sets a key whose default is a bool to false (`--no-feature-cache`)."""
    out: dict[str, Any] = {}
    it = iter(pairs)
    for flag in it:
        if not flag.startswith("--"):
            raise ParamError(f"expected --name value, got {flag!r}")
        key = flag[2:].replace("-", "_")
        if key.startswith("no_") and isinstance(getattr(SCHEMA.get(key[3:]), "default", None), bool):
            out[key[3:]] = False
            continue
        try:
            raw = next(it)
        except StopIteration:
            raise ParamError(f"parameter {key!r} has no value") from None
        value = yaml.safe_load(raw)
        if _takes_list(key) and not isinstance(value, list):
            value = [yaml.safe_load(x) for x in str(raw).split(",") if x.strip()]
        out[key] = value
    return out


def _takes_list(key: str) -> bool:
    """Whether a key holds a list (in any method declaring it): `--key a,b,c` is then split."""
    declared = [PROTOCOL_KEYS.get(key) or SHARED.get(key),
                *(REGISTRY[n].hparams[key] for n in method_keys().get(key, []))]
    return any(h is not None and list in h.accepted() for h in declared)
