"""Core results -> JSON (orjson: numpy arrays natively, no jsonable_encoder) or msgpack bytes."""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np
import orjson

from service.core.types import ForecastResult, SeriesFailure, SeriesForecast

_OPTS = orjson.OPT_SERIALIZE_NUMPY


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):  # orjson handles C-contiguous arrays only
        return np.ascontiguousarray(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot serialise {type(obj).__name__}")


def _series(r: SeriesForecast | SeriesFailure) -> dict[str, Any]:
    if isinstance(r, SeriesFailure):
        return {"id": r.id, "error": r.error.to_dict()}
    out: dict[str, Any] = {"id": r.id, "values": r.values}
    if r.timestamps is not None:
        out["timestamps"] = r.timestamps
    if r.intervals is not None:
        out["intervals"] = {k: {"lower": lo, "upper": hi} for k, (lo, hi) in r.intervals.items()}
    return out


def _payload(result: ForecastResult, total_ms: float) -> dict[str, Any]:
    return {
        "model": result.model,
        "version": result.version,
        "mode": result.mode,
        "provider": result.provider,
        "horizon": result.horizon,
        "forecasts": [_series(r) for r in result.results],
        "timing": {
            "total_ms": round(total_ms, 3),
            "queue_ms": round(result.queue_ms, 3),
            "inference_ms": round(result.inference_ms, 3),
        },
    }


def forecast_body(result: ForecastResult, total_ms: float) -> bytes:
    return orjson.dumps(_payload(result, total_ms), option=_OPTS, default=_default)


def _bin(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):  # msgpack answers carry arrays as float32 little-endian bins
        return np.ascontiguousarray(obj, dtype="<f4").tobytes()
    return _default(obj)


_MSGPACK = msgspec.msgpack.Encoder(enc_hook=_bin)


def forecast_msgpack(result: ForecastResult, total_ms: float) -> bytes:
    """The same answer as msgpack; every `values`/`lower`/`upper` is a bin of float32
    (little-endian, row-major [h, C], or [h] for univariate input)."""
    return _MSGPACK.encode(_payload(result, total_ms))
