"""Plain request/result types of the core (no HTTP, no wire format)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from service.core.errors import ServiceError
from service.core.timeaxis import Stamp

Mode = Literal["fast", "accurate", "auto"]


@dataclass(slots=True)
class SeriesInput:
    """One decoded series: values [n, C] float32 (finite), and its optional time information."""

    id: str | int
    values: np.ndarray
    univariate: bool
    index: int
    columnar: bool = False
    timestamps: list[Stamp] | None = None
    start: Stamp | None = None
    freq: str | None = None

    def at(self, part: str) -> str:
        """The request field holding `part` (values, timestamps, start, freq) of this series."""
        if not self.columnar:
            return f"series[{self.index}].{part}"
        return {"values": f"sizes[{self.index}]", "start": f"starts[{self.index}]"}.get(part, part)


@dataclass(slots=True)
class ForecastRequest:
    series: list[SeriesInput | SeriesFailure]
    """Decoded series, or why one could not be decoded (batch: answered per series)."""
    model: str | None = None
    mode: Mode = "fast"
    horizon: int | None = None
    levels: list[float] = field(default_factory=list)
    deadline_ms: float | None = None


@dataclass(slots=True)
class SeriesForecast:
    id: str | int
    values: np.ndarray
    """[h, C], or [h] when the input was univariate."""
    timestamps: list[Stamp] | None = None
    intervals: dict[str, tuple[np.ndarray, np.ndarray]] | None = None
    """Level (as text, e.g. "80") -> (lower, upper), shaped like `values`."""


@dataclass(slots=True)
class SeriesFailure:
    id: str | int | None
    error: ServiceError


@dataclass(slots=True)
class Answered:
    """What every forecast answer says first: the model version that made it, where it ran."""

    model: str
    version: int
    mode: Literal["fast", "accurate"]
    provider: str
    horizon: int


@dataclass(slots=True)
class ForecastResult(Answered):
    results: list[SeriesForecast | SeriesFailure]
    queue_ms: float = 0.0
    inference_ms: float = 0.0
