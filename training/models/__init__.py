"""Forecasting architectures, listed in one explicit dict.

Each entry pairs a config dataclass with its builder; ``build_model(name, lookback, horizon,
**overrides)`` is the one way the rest of the code makes a model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from training.models import dmae, himtm, mlp, patchtst, simmtm
from training.models.base import Forecaster


@dataclass(frozen=True)
class ModelSpec:
    config: type
    build: Callable[[Any], Forecaster]
    kind: str  # "student" or "teacher"


MODELS: dict[str, ModelSpec] = {
    "mlp": ModelSpec(mlp.MLPConfig, mlp.build, "student"),
    "patchtst": ModelSpec(patchtst.PatchTSTConfig, patchtst.build, "teacher"),
    # Masked-pretraining teachers: each module also has ``build_pretrainer`` (training.pretrain).
    "simmtm": ModelSpec(simmtm.SimMTMConfig, simmtm.build, "teacher"),
    "himtm": ModelSpec(himtm.HiMTMConfig, himtm.build, "teacher"),
    "dmae": ModelSpec(dmae.DMAEConfig, dmae.build, "teacher"),
}


def make_config(name: str, **values: Any) -> Any:
    """Build a model's config, refusing keys the architecture does not have."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    cls = MODELS[name].config
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"model {name!r} has no setting(s) {unknown}; known: {sorted(known)}")
    return cls(**values)


def build_model(name: str, *, channels: int | None = None, **values: Any) -> Forecaster:
    """``channels`` (the data's) fills a config's ``channels`` field when the values lack it."""
    spec = MODELS.get(name)
    has_channels = spec is not None and "channels" in {f.name for f in fields(spec.config)}
    if channels is not None and has_channels and "channels" not in values:
        values["channels"] = channels
    return MODELS[name].build(make_config(name, **values))


__all__ = ["MODELS", "Forecaster", "ModelSpec", "build_model", "make_config"]
