"""Request and response schemas.

Two views of one contract:
* msgspec Structs validate the hot-path bodies parsed by orjson (typed validation; errors carry
  the JSON path of the offending field). `values` is left alone here and becomes a numpy array in
  one pass in `core.windows`, so the float arrays never go through per-element validators.
* pydantic models describe the same shapes for OpenAPI only (`openapi_extra` / response_model in
  the routes). tests/service check the two stay in step.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta
from pydantic import BaseModel, ConfigDict, Field

Mode = Literal["fast", "accurate", "auto"]
Stamp = str | int | float
PositiveInt = Annotated[int, Meta(ge=1)]
Level = Annotated[float, Meta(gt=0, lt=100)]
# Each level costs a pass over the forecasts: an unbounded list would let a small body buy
# seconds of event-loop time. Calibrated levels are the integers 50..99.
MAX_LEVELS = 50
Levels = Annotated[list[Level], Meta(max_length=MAX_LEVELS)]

# -- wire (msgspec) -------------------------------------------------------------------------------


class SeriesWire(msgspec.Struct, forbid_unknown_fields=True):
    id: str | int
    values: Any  # checked and converted by numpy in core.windows, not element by element
    timestamps: list[Stamp] | None = None
    start: Stamp | None = None
    freq: str | None = None


class ForecastWire(msgspec.Struct, forbid_unknown_fields=True):
    series: list[SeriesWire]
    model: str | None = None
    mode: Mode = "fast"
    horizon: PositiveInt | None = None
    level: Levels | None = None
    deadline_ms: Annotated[float, Meta(gt=0)] | None = None


class BatchWire(msgspec.Struct, forbid_unknown_fields=True):
    model: str | None = None
    mode: Mode = "fast"
    horizon: PositiveInt | None = None
    level: Levels | None = None
    deadline_ms: Annotated[float, Meta(gt=0)] | None = None
    # Row form.
    series: list[SeriesWire] | None = None
    # Columnar form.
    ids: list[str | int] | None = None
    sizes: list[PositiveInt] | None = None
    values: Any = None
    n_channels: PositiveInt = 1
    starts: list[Stamp] | None = None
    freq: str | None = None


# -- documentation (pydantic, OpenAPI only) -------------------------------------------------------


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SeriesIn(_Doc):
    id: str | int = Field(description="Echoed back in the answer.")
    values: list[list[float]] | list[float] = Field(
        description="L x C rows (time-major) or L values (univariate). At least the model's "
        "lookback; the last `lookback` points are used. Finite numbers only.",
    )
    timestamps: list[str | int | float] | None = Field(
        None, description="One per row (ISO 8601 or numbers); the step is inferred."
    )
    start: str | int | float | None = Field(None, description="First row's time, with `freq`.")
    freq: str | None = Field(
        None,
        description="With `start` (or with `timestamps`, to state a calendar step): a fixed step "
        "('15min', 'h', 'D', 'W', '30s') or a calendar one ('MS', 'ME', 'QS', 'QE', 'YS', 'YE', "
        "'B', 'W-MON', with multipliers like '2MS').",
    )


class _Options(_Doc):
    model: str | None = Field(
        None,
        description="'name' (alias production, else latest), 'name@alias' or 'name@3'; "
        "'name-ensemble[@sel]' names the teacher ensemble (accurate only).",
        examples=["etth1-h96"],
    )
    mode: Mode = Field("fast", description="fast: student; accurate: teacher ensemble; auto: "
                       "accurate when its predicted queue wait + compute fits deadline_ms.")
    horizon: int | None = Field(None, ge=1, description="At most the model's horizon.")
    level: list[float] | None = Field(
        None, max_length=MAX_LEVELS, description="Interval levels in percent (calibrated: 50..99).",
        examples=[[80, 95]],
    )
    deadline_ms: float | None = Field(None, gt=0, description="Budget for mode auto.")


class ForecastIn(_Options):
    series: list[SeriesIn] = Field(min_length=1)


class BatchIn(_Options):
    """Either `series` (row form) or `ids` + `sizes` + `values` (columnar form)."""

    series: list[SeriesIn] | None = None
    ids: list[str | int] | None = Field(None, description="Columnar form: one id per series.")
    sizes: list[int] | None = Field(None, description="Columnar form: rows per series.")
    values: list[float] | None = Field(
        None, description="Columnar form: all rows of all series, flat, channels innermost."
    )
    n_channels: int = Field(1, ge=1, description="Columnar form: channels per row.")
    starts: list[str | int | float] | None = Field(None, description="Columnar: first times.")
    freq: str | None = Field(None, description="Columnar form: the step of every series.")


class Band(_Doc):
    lower: list[list[float]] | list[float]
    upper: list[list[float]] | list[float]


class ErrorBody(_Doc):
    code: str = Field(examples=["invalid_input"])
    message: str
    field: str | None = Field(None, examples=["series[0].values[3][2]"])


class ErrorOut(_Doc):
    error: ErrorBody


class SeriesOut(_Doc):
    id: str | int
    values: list[list[float]] | list[float] | None = Field(
        None, description="h x C (or h for univariate input)."
    )
    timestamps: list[str | int | float] | None = None
    intervals: dict[str, Band] | None = Field(None, description="Keyed by level, e.g. '80'.")
    error: ErrorBody | None = Field(None, description="Batch only: why this series failed.")


class Timing(_Doc):
    total_ms: float
    queue_ms: float
    inference_ms: float


class ForecastOut(_Doc):
    model: str
    version: int
    mode: Literal["fast", "accurate"] = Field(description="The mode actually used.")
    provider: str = Field(description="ONNX Runtime execution provider that ran it.")
    horizon: int
    forecasts: list[SeriesOut]
    timing: Timing


class BatchOut(ForecastOut):
    """`forecasts` in input order; a failed series has `error` instead of `values`."""


class AliasIn(_Doc):
    version: int = Field(ge=1)
    force: bool = Field(
        False, description="Promote past the gate (a worse validation MSE than production's "
        "beyond the tolerance); recorded in the history as forced.",
    )


class GateOut(_Doc):
    metric: str
    candidate: float | None
    current: float | None
    current_version: int | None
    tolerance: float
    passed: bool


class AliasOut(_Doc):
    name: str
    alias: str
    version: int
    previous: int | None
    serving: int | None = Field(description="Version this replica serves for the alias now.")
    forced: bool = False
    gate: GateOut | None = Field(None, description="The promotion gate's figures (production).")


class AliasChangeOut(_Doc):
    time: str
    alias: str
    previous: int | None
    version: int
    actor: str
    forced: bool
    gate: GateOut | None


class HistoryOut(_Doc):
    name: str
    changes: list[AliasChangeOut] = Field(description="Every alias change, oldest first.")


class ReadyOut(_Doc):
    name: str
    ready: bool
    versions: list[int] = Field(description="Versions of this model loaded on this replica.")
    default_version: int | None


class TensorSpec(_Doc):
    name: str
    shape: list[int | str]
    datatype: str = "FP32"


class VersionCard(_Doc):
    """One version's manifest card (KServe/Triton-style model metadata)."""

    name: str
    version: int
    kind: str
    architecture: str
    frequency: str | None
    features: list[str] | str | None = Field(
        description="The feature columns (or feature mode) the model was trained on."
    )
    target: str | None
    lookback: int
    horizon: int
    channels: int | None
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    normalisation: dict[str, Any]
    dataset: dict[str, Any] | None
    metrics: dict[str, float]
    calibration_levels: list[int] | None
    teachers: list[str] = Field(description="Lineage: the teachers it was distilled from.")
    members: list[str] | None = Field(description="Ensembles: the member versions.")
    sha256: str | None
    opset: int | None
    parity_max_abs_err: float | None
    created_at: str | None
    code_version: str | None
    lineage: dict[str, Any] | None = Field(
        description="Git commit (and whether model code was dirty), seed, data file and its "
        "sha256, training run folder and settings; null for manifests older than lineage."
    )
    aliases: list[str] = Field(description="Aliases pointing at this version.")
    loaded: bool = Field(description="Loaded on this replica.")


class VersionInfo(_Doc):
    version: int
    kind: str
    architecture: str
    lookback: int
    horizon: int
    channels: int | None
    metrics: dict[str, float]
    created_at: str | None
    sha256: str | None
    members: list[str] | None
    teachers: list[str]
    calibration_levels: list[int] | None
    loaded: bool
    provider: str | None


class ModelOut(_Doc):
    name: str
    kind: str
    versions: list[VersionInfo]
    aliases: dict[str, int] = Field(description="The registry's aliases.")
    serving: dict[str, Any] = Field(
        description="What this replica serves: default version and alias -> version."
    )
    card: VersionCard = Field(
        description="The model card of the default version (the one a bare name serves: "
        "production, else the latest): lineage, metrics (validation and test MSE), teachers."
    )


class ModelSummary(_Doc):
    name: str
    kind: str
    versions: list[int]
    aliases: dict[str, int]
    default_version: int | None
    loaded: list[dict[str, Any]]
    metrics: dict[str, float] = Field(description="The default version's manifest metrics.")


class ModelsOut(_Doc):
    models: list[ModelSummary]


def forecast_example(model: str | None, lookback: int, channels: int | None,
                     batch: bool = False) -> dict[str, Any]:
    """A request "Try it out" can send as is: `lookback` hourly points of a daily cycle."""
    import math

    def values(shift: float) -> list[float] | list[list[float]]:
        wave = [round(10 + 3 * math.sin(2 * math.pi * (t + shift) / 24), 3)
                for t in range(lookback)]
        if channels is None or channels == 1:
            return wave
        return [[v + c for c in range(channels)] for v in wave]

    series: list[dict[str, Any]] = [
        {"id": "sensor-1", "values": values(0), "start": "2024-01-01T00:00:00", "freq": "h"}
    ]
    if batch:
        series.append({"id": "sensor-2", "values": values(6)})
    out: dict[str, Any] = {"series": series, "level": [80, 95]}
    if model is not None:
        out = {"model": model, **out}
    return out


def body_doc(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` documenting a JSON request body the route decodes itself (the example is
    added when the OpenAPI document is built: `service.app`)."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {
        "requestBody": {
            "required": True,
            "description": "JSON, or the same shape as application/msgpack (where the columnar "
            "`values` may be a bin of little-endian float32). `Accept: application/msgpack` "
            "answers in msgpack with float32 bins for the arrays.",
            "content": {"application/json": {"schema": ref},
                        "application/msgpack": {"schema": ref}},
        }
    }


REQUEST_MODELS: tuple[type[BaseModel], ...] = (ForecastIn, BatchIn)


def request_schemas() -> dict[str, Any]:
    """Component schemas of the bodies documented with `body_doc` (merged into OpenAPI)."""
    out: dict[str, Any] = {}
    for model in REQUEST_MODELS:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        out.update(schema.pop("$defs", {}))
        out[model.__name__] = schema
    return out
