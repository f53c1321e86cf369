"""Bodies of POST /v1/backtest and POST /v1/actuals: msgspec wire structs (validation) and their
pydantic twins (OpenAPI only), as `service.api.schemas` does for the forecast routes."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta
from pydantic import Field

from service.api.schemas import Levels, PositiveInt, SeriesIn, SeriesWire, Stamp, _Doc

BacktestMode = Literal["fast", "accurate", "both"]
MAX_ACTUALS = 100_000

# -- wire -----------------------------------------------------------------------------------------


class BacktestWire(msgspec.Struct, forbid_unknown_fields=True):
    series: list[SeriesWire]
    model: str | None = None
    mode: BacktestMode = "fast"
    h: PositiveInt | None = None
    n_windows: PositiveInt = 1
    step: PositiveInt | None = None
    level: Levels | None = None


class ActualWire(msgspec.Struct, forbid_unknown_fields=True):
    unique_id: str | int
    ds: Stamp
    values: float | list[float]


class ActualsWire(msgspec.Struct, forbid_unknown_fields=True):
    actuals: Annotated[list[ActualWire], Meta(max_length=MAX_ACTUALS)]


# -- documentation --------------------------------------------------------------------------------


class BacktestIn(_Doc):
    series: list[SeriesIn] = Field(
        min_length=1,
        description="Histories, shaped as in /v1/forecast (`id`, `values`, and `timestamps` or "
        "`start` + `freq` for dated windows; without them `ds` and `cutoff` are row positions).",
    )
    model: str | None = Field(None, description="As in /v1/forecast.", examples=["etth1-h96"])
    mode: BacktestMode = Field(
        "fast", description="fast: student; accurate: teacher ensemble; both: each, and the "
        "distillation gap per window.")
    h: int | None = Field(None, ge=1, description="Forecast steps per window (default: the "
                          "model's horizon).")
    n_windows: int = Field(1, ge=1, description="Windows per series (series x windows count "
                           "against the series limit per request).")
    step: int | None = Field(None, ge=1, description="Rows between window origins (default h).")
    level: list[float] | None = Field(None, description="Interval levels in percent.",
                                      examples=[[80, 95]])


class BandOut(_Doc):
    lower: list[list[float]] | list[float]
    upper: list[list[float]] | list[float]


class GapOut(_Doc):
    mae: float = Field(description="Mean |fast - accurate| in the series' units.")
    zmae: float = Field(description="The same over the window's std (as the shadow gap).")


class WindowOut(_Doc):
    unique_id: str | int
    cutoff: str | int | float = Field(description="Time of the last row the model saw.")
    ds: list[str | int | float] = Field(description="Times of the h forecast rows.")
    y: list[list[float]] | list[float] = Field(description="The actual rows (h x C, or h).")
    forecast: dict[str, list[list[float]] | list[float]] = Field(
        description="Mode (fast, accurate) -> the forecast rows.")
    intervals: dict[str, dict[str, BandOut]] | None = Field(
        None, description="Mode -> level ('80') -> lower/upper.")
    gap: GapOut | None = Field(None, description="mode both: fast vs accurate on this window.")


class ScoreOut(_Doc):
    mse: float
    mae: float
    coverage: dict[str, float] = Field(description="Level -> share of actual values inside.")
    points: int = Field(description="Values scored (rows x channels).")


class SeriesScoreOut(ScoreOut):
    unique_id: str | int


class ModeScoresOut(_Doc):
    model: str
    version: int
    lookback: int
    overall: ScoreOut
    series: list[SeriesScoreOut]


class BacktestOut(_Doc):
    h: int
    n_windows: int
    step: int
    windows: list[WindowOut] = Field(description="Per series (input order), oldest window first.")
    metrics: dict[str, ModeScoresOut] = Field(description="Mode -> scores.")
    gap: GapOut | None = Field(None, description="mode both: the mean gap over all windows.")


class ActualIn(_Doc):
    unique_id: str | int = Field(description="The series id the forecast was asked for.")
    ds: str | int | float = Field(description="The time, as the forecast's timestamps give it.")
    values: float | list[float] = Field(description="One value per channel (or one value).")


class ActualsIn(_Doc):
    actuals: list[ActualIn] = Field(max_length=MAX_ACTUALS)


class ModelErrorOut(_Doc):
    model: str
    version: int
    mode: str
    points: int
    mae: float
    mse: float
    coverage: dict[str, float]


class ActualsOut(_Doc):
    received: int
    matched: int = Field(description="Actuals that matched at least one remembered forecast.")
    unmatched: int = Field(description="Actuals no remembered forecast holds (never "
                           "forecast, expired, or evicted by the memory bound).")
    duplicates: int = Field(description="(actual, forecast step) pairs already reported (not "
                            "scored again); an actual with only such pairs is neither matched "
                            "nor unmatched.")
    pairs: int = Field(description="(actual, forecast step) pairs scored.")
    errors: list[ModelErrorOut] = Field(description="This batch's errors by model and mode.")


def schemas() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for model in (BacktestIn, ActualsIn):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        out.update(schema.pop("$defs", {}))
        out[model.__name__] = schema
    return out
