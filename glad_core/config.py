"""A run's configuration (`TrainConfig`): the shared knobs and the method's own hyper-parameters, checked
against the registry of methods (importing it registers every method)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .methods.base import NOT_IDENTITY, SHARED, check_hparams, method_info


@dataclass
class TrainConfig:
    """Every knob of a run: the shared ones (`SHARED`; None = the method's registered default, else the
    shared default) and the method's own hyper-parameters (`hparams`, declared in its file; defaults filled
    in). Every value is checked by its `Hparam` on construction (a bad one raises ValueError naming it)."""

    method: str = "glad"
    seed: int = 1
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float | None = None
    kl_weight: float | None = None
    rho: float | None = None
    alpha: float | None = None
    delta: float | None = None
    aug_scale_min: float | None = None
    aug_flip: bool | None = None
    device: str | None = None
    precision: str | None = None
    num_workers: int | str | None = None
    eval_batch_size: int | None = None
    hparams: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        info = method_info(self.method)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed = {self.seed!r} of method {self.method!r} is invalid: must be an int >= 0")
        for key, knob in SHARED.items():
            value = getattr(self, key)
            if value is None:
                setattr(self, key, info.knob_default(key))
                continue
            try:
                setattr(self, key, knob.parse(value))
            except ValueError as e:
                raise ValueError(f"training parameter {key!r} = {value!r} of method {self.method!r} is invalid: "
                                 f"{e}") from None
        self.hparams = check_hparams(self.method, self.hparams)

    @classmethod
    def from_params(cls, params: dict[str, Any], **fixed: Any) -> "TrainConfig":
        """From a flat mapping (a record's or parameter file's): shared keys, and the keys the method declares."""
        p = {**params, **fixed}
        own = method_info(p["method"]).hparams
        return cls(**{k: p[k] for k in ("method", "seed", *SHARED) if p.get(k) is not None},
                   hparams={k: p[k] for k in own if k in p})

    def knobs(self) -> tuple[str, ...]:
        """The shared knobs its method reads with these hyper-parameters (`Method.knobs`)."""
        return method_info(self.method).cls.knobs(self.hparams)

    def to_dict(self) -> dict[str, Any]:
        """Flat: method, seed, the shared knobs the method reads, then its own hyper-parameters."""
        return {"method": self.method, "seed": self.seed, **{k: getattr(self, k) for k in self.knobs()},
                **self.hparams}

    def identity(self) -> dict[str, Any]:
        """`to_dict` without the knobs that do not change the method's numbers (`NOT_IDENTITY`; the
        evaluation batch size stays for a method whose predictions depend on it)."""
        keep = {"eval_batch_size"} if method_info(self.method).cls.batch_dependent(self.hparams) else set()
        return {k: v for k, v in self.to_dict().items() if k not in NOT_IDENTITY or k in keep}
