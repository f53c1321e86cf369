"""The manifest every registered version carries, and the small types around it.

A manifest describes its artifact completely (see docs/contracts.md), so the service can load and
serve a model from the registry alone. Models are frozen: a registered version is immutable, and the
store produces updated copies with `model_copy`/`model_validate` rather than mutating.
"""

from __future__ import annotations

import math
import re
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from models_registry.errors import InvalidName

NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
_NAME_RE = re.compile(NAME_PATTERN)
SHA256_PATTERN = r"^[0-9a-f]{64}$"

DEFAULT_ALIAS = "production"
"""The alias a bare model name resolves to (if set; otherwise the latest version)."""

Kind = Literal["student", "teacher", "ensemble"]
Dim = int | str
"""A tensor dimension: a fixed size, or the name of a symbolic (dynamic) axis."""


def check_name(name: str, what: str = "model name") -> str:
    """Return `name` if it is a valid registry name, else raise `InvalidName`.

    Names become directory names under the registry root, so the rule is deliberately narrow:
    lower-case, no path separators, no leading dot and no `..` anywhere.
    """
    # fullmatch, not match: `$` would accept a trailing newline.
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or ".." in name:
        raise InvalidName(
            f"invalid {what} {name!r}: must match {NAME_PATTERN} and must not contain '..'",
            part="alias" if what == "alias" else "name",
        )
    return name


def check_alias(alias: str) -> str:
    """Validate an alias name. All-digit aliases are refused: `name@3` always means version 3."""
    check_name(alias, "alias")
    if alias.isdigit():
        raise InvalidName(f"invalid alias {alias!r}: an alias cannot be all digits",
                          part="alias")
    return alias


def check_version(version: int) -> int:
    """Validate a version number (a positive int; bools are not versions)."""
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise InvalidName(f"invalid version {version!r}: must be an integer >= 1",
                          part="version")
    return version


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelRef(_Frozen):
    """A pointer to one registered version, e.g. an ensemble member."""

    name: str
    version: int = Field(ge=1)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v)

    @classmethod
    def parse(cls, ref: str) -> ModelRef:
        """Parse `"name@3"`; aliases are not resolved here (that needs a store)."""
        name, sep, version = ref.partition("@")
        if not sep or not version.isdigit():
            raise InvalidName(f"invalid model reference {ref!r}: expected NAME@VERSION")
        return cls(name=check_name(name), version=int(version))

    def __str__(self) -> str:
        return f"{self.name}@{self.version}"


class AliasEvent(_Frozen):
    """An alias now points at `version` (it pointed at `previous`, None if it was unset).

    `source` says how this process learnt of it: its own promotion, a pub/sub message, or a
    resynchronisation from the filesystem (after a reconnect, or the periodic check).
    """

    name: str
    alias: str
    version: int = Field(ge=1)
    previous: int | None = None
    source: Literal["local", "remote", "resync"] = "local"


class GateCheck(_Frozen):
    """The promotion gate's comparison: the candidate's validation metric against the current
    holder's (None when there was nothing to compare)."""

    metric: str
    candidate: float | None
    current: float | None
    current_version: int | None
    tolerance: float
    passed: bool


class AliasChange(_Frozen):
    """One line of a model's alias history (`<root>/<name>/history.jsonl`)."""

    time: datetime
    name: str
    alias: str
    previous: int | None
    version: int = Field(ge=1)
    actor: str
    """Who or what moved it: `register`, `cli:<user>`, `api:<request id>`, `pipeline`, ..."""
    forced: bool = False
    gate: GateCheck | None = None


class DatasetInfo(_Frozen):
    """The data a model was trained on."""

    name: str
    file: str | None = None
    split_borders: dict[str, tuple[int, int]] = Field(default_factory=dict)
    """Row ranges `[start, end)` per split, e.g. `{"train": (0, 8640), "val": ..., "test": ...}`."""
    features: str | list[str] | None = None
    """The feature mode (`"M"`, `"S"`, `"MS"`) or the column names used."""
    target: str | None = None


class Lineage(_Frozen):
    """Where a version came from: the code, the seed, the data file and the run that made it.

    Every field is optional: manifests written before lineage was recorded have none (and load),
    and an ensemble group has no seed or run of its own (its members carry theirs).
    """

    git_commit: str | None = Field(None, pattern=r"^[0-9a-f]{40}$")
    """``git rev-parse HEAD`` of the checkout that exported the version."""
    git_dirty: bool | None = None
    """True when files that shape a model (``training/``, ``models_registry/``, ``data/``, the
    dependency pins) had uncommitted changes at export: the commit alone does not rebuild it."""
    seed: int | None = None
    data_file: str | None = None
    data_sha256: str | None = Field(None, pattern=SHA256_PATTERN)
    run_dir: str | None = None
    """The training run folder (relative to the repository when inside it)."""
    train: dict[str, Any] = Field(default_factory=dict)
    """The run's optimisation settings (``TrainConfig``)."""
    distill: dict[str, Any] = Field(default_factory=dict)
    """Students only: the distillation settings (``DistillConfig``)."""


class Calibration(_Frozen):
    """Split-conformal residual quantiles (docs/contracts.md, "Calibration")."""

    method: Literal["split-conformal"] = "split-conformal"
    score: Literal["abs_residual_over_window_std"] = "abs_residual_over_window_std"
    split: str = "val"
    n: int = Field(ge=1)
    levels: list[int]
    quantiles: list[list[float]]
    """`quantiles[i][t]`: the score quantile for `levels[i]` at forecast step `t`."""

    @model_validator(mode="after")
    def _consistent(self) -> Calibration:
        if len(self.quantiles) != len(self.levels):
            raise ValueError("calibration: one row of quantiles per level is required")
        if any(not 0 < lvl < 100 for lvl in self.levels) or self.levels != sorted(set(self.levels)):
            raise ValueError("calibration: levels must be strictly increasing, within (0, 100)")
        steps = {len(row) for row in self.quantiles}
        if len(steps) > 1:
            raise ValueError("calibration: every level needs the same number of steps")
        for row in self.quantiles:
            if any(not math.isfinite(q) or q < 0 for q in row):
                raise ValueError("calibration: quantiles must be finite and >= 0")
        # Order statistics of the same scores cannot decrease with the level; if they do, the
        # table was built wrongly and the intervals would cross.
        for lo, hi in zip(self.quantiles, self.quantiles[1:], strict=False):
            if any(b < a for a, b in zip(lo, hi, strict=True)):
                raise ValueError("calibration: quantiles must not decrease as the level rises")
        return self


class Manifest(_Frozen):
    """Everything needed to serve, audit and reproduce one registered version.

    `version`, `sha256` and `created_at` are filled in by the store at registration; a manifest
    handed to `FilesystemStore.register` leaves them at their defaults (version 0 = unregistered).
    """

    schema_version: Literal[1] = 1
    name: str
    version: int = Field(0, ge=0)
    kind: Kind
    architecture: str = Field(min_length=1)
    config: dict[str, Any] = Field(default_factory=dict)
    lookback: int = Field(ge=1)
    horizon: int = Field(ge=1)
    channels: int | None = Field(None, ge=1)
    """Fixed channel count, or None when the model serves any number (channel-independent)."""
    input_name: str = "x"
    output_name: str = "y"
    input_shape: list[Dim] | None = None
    """Defaults to `["batch", lookback, channels or "channels"]`."""
    output_shape: list[Dim] | None = None
    """Defaults to `["batch", horizon, channels or "channels"]`."""
    normalisation: dict[str, Any] = Field(default_factory=dict)
    dataset: DatasetInfo | None = None
    frequency: str | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    """Flat keys on the z-scored split: `val_mse`, `val_mae`, `test_mse`, `test_mae`, ..."""
    calibration: Calibration | None = None
    teachers: list[ModelRef] = Field(default_factory=list)
    parity_max_abs_err: float | None = Field(None, ge=0)
    sha256: str | None = Field(None, pattern=SHA256_PATTERN)
    opset: int | None = Field(None, ge=1)
    created_at: datetime | None = None
    code_version: str | None = None
    members: list[ModelRef] = Field(default_factory=list)
    """Ensemble groups only: the member versions the service averages."""
    lineage: Lineage | None = None
    """Git commit, seed, data file and run folder (None in manifests older than lineage)."""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v)

    @field_validator("teachers", mode="before")
    @classmethod
    def _teachers(cls, v: Any) -> Any:
        # Accept "name@3" strings as a convenience for training code and hand-written manifests.
        if isinstance(v, list):
            return [ModelRef.parse(t) if isinstance(t, str) else t for t in v]
        return v

    @model_validator(mode="before")
    @classmethod
    def _default_shapes(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        channels: Dim = data.get("channels") or "channels"
        if data.get("input_shape") is None and "lookback" in data:
            data = {**data, "input_shape": ["batch", data["lookback"], channels]}
        if data.get("output_shape") is None and "horizon" in data:
            data = {**data, "output_shape": ["batch", data["horizon"], channels]}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        if self.kind == "ensemble":
            if not self.members:
                raise ValueError("an ensemble manifest needs at least one member")
            if self.sha256 is not None:
                raise ValueError("an ensemble has no model.onnx, so no sha256")
            if len({(m.name, m.version) for m in self.members}) != len(self.members):
                raise ValueError("ensemble members must be distinct")
        elif self.members:
            raise ValueError(f"only ensembles have members, not kind={self.kind!r}")
        for label, shape, steps in (
            ("input_shape", self.input_shape, self.lookback),
            ("output_shape", self.output_shape, self.horizon),
        ):
            if shape is not None and (len(shape) != 3 or shape[1] != steps):
                raise ValueError(f"{label} must be [batch, {steps}, channels], got {shape}")
        if self.calibration is not None:
            rows = {len(row) for row in self.calibration.quantiles}
            if rows and rows != {self.horizon}:
                raise ValueError(f"calibration quantiles need {self.horizon} steps per level")
        return self

    @property
    def ref(self) -> ModelRef:
        """This version as a `ModelRef` (only meaningful once registered)."""
        return ModelRef(name=self.name, version=self.version)
