"""POST /v1/backtest (rolling-origin evaluation on a history) and POST /v1/actuals (live
accuracy: actuals matched with the forecasts served earlier)."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from service import metrics
from service.api import decode
from service.api.deps import Services
from service.api.errors import error_response, json_error
from service.api.evaluation_schemas import (
    ActualsIn,
    ActualsOut,
    ActualsWire,
    BacktestIn,
    BacktestOut,
    BacktestWire,
)
from service.api.routes.forecast import ERRORS, RawRoute, read_body
from service.core import backtest
from service.core.errors import LimitExceeded, ModelUnavailable, ServiceError, ShuttingDown
from service.core.types import SeriesInput

log = logging.getLogger(__name__)

BACKTEST = "/v1/backtest"
ACTUALS = "/v1/actuals"
_OPTS = orjson.OPT_SERIALIZE_NUMPY


def _json_doc(model: type[Any]) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


@asynccontextmanager
async def _admitted(services: Services, request: Request) -> AsyncIterator[None]:
    """The forecast routes' admission: draining, API key, in-flight requests and bytes."""
    services.load.value += 1
    metrics.IN_FLIGHT.inc()
    reserved = 0
    try:
        if services.draining:
            raise ShuttingDown("the replica is shutting down")
        if services.access is not None:
            await services.access.check(request.scope)
        length = request.headers.get("content-length")
        reserved = services.admit(int(length) if length and length.isdigit() else None)
        yield
    finally:
        services.load.value -= 1
        services.release(reserved)
        metrics.IN_FLIGHT.dec()


def _window(w: backtest.Window) -> dict[str, Any]:
    out: dict[str, Any] = {"unique_id": w.unique_id, "cutoff": w.cutoff, "ds": w.ds, "y": w.y,
                           "forecast": w.forecast}
    if w.intervals:
        out["intervals"] = {mode: {level: {"lower": lo, "upper": hi}
                                   for level, (lo, hi) in bands.items()}
                            for mode, bands in w.intervals.items()}
    if w.gap is not None:
        out["gap"] = w.gap
    return out


def backtest_body(result: backtest.BacktestResult) -> bytes:
    scores = {
        mode: {
            **result.models[mode],
            "overall": result.overall[mode].as_dict(),
            "series": [{"unique_id": sid, **s.as_dict()} for sid, s in result.series[mode]],
        }
        for mode in result.models
    }
    body = {"h": result.h, "n_windows": result.n_windows, "step": result.step,
            "windows": [_window(w) for w in result.windows], "metrics": scores,
            "gap": result.gap}
    return orjson.dumps(body, option=_OPTS)


def build_router(services: Services) -> APIRouter:
    router = APIRouter(route_class=RawRoute, tags=["evaluation"])

    async def answer(request: Request, route: str, work: Any) -> Response:
        t0 = time.perf_counter()
        status = 200
        try:
            async with _admitted(services, request):
                body = await read_body(request.scope, request.receive,
                                       services.settings.max_body_bytes)
                response = Response(await work(body), media_type="application/json")
        except ServiceError as exc:
            response = error_response(exc)
            status = response.status_code
        except Exception:
            log.exception("%s failed", route)
            response = json_error(500, "internal", "internal error")
            status = 500
        metrics.REQUEST_DURATION.labels(route, "", "", str(status)).observe(
            time.perf_counter() - t0)
        return response

    @router.post(
        BACKTEST,
        response_model=BacktestOut,
        responses=ERRORS,
        openapi_extra=_json_doc(BacktestIn),
        summary="Rolling-origin backtest of a history",
    )
    async def run_backtest(request: Request) -> Response:
        """Cut each history into `n_windows` windows of `h` steps, `step` rows apart, the last
        ending at the last row (neuralforecast's `cross_validation`); forecast each from the
        rows before it and score MSE, MAE and interval coverage per series and overall. A
        history too short is a 422 saying how many points it needs."""

        async def work(body: bytes) -> bytes:
            predictor = services.need_predictor()
            wire = decode.decode_struct(body, BacktestWire)
            series = decode._row_form(wire.series, services.limits, partial=False)
            windows = len(series) * wire.n_windows
            if windows > services.limits.max_series:
                raise LimitExceeded(
                    f"{len(series)} series x {wire.n_windows} windows = {windows} forecasts; "
                    f"the limit is {services.limits.max_series} per request", field="n_windows")
            req = backtest.BacktestRequest(
                [s for s in series if isinstance(s, SeriesInput)],
                wire.h, wire.n_windows, wire.step, wire.mode, wire.model, wire.level or [])
            return backtest_body(await backtest.run(predictor, req))

        return await answer(request, BACKTEST, work)

    @router.post(
        ACTUALS,
        response_model=ActualsOut,
        responses=ERRORS,
        openapi_extra=_json_doc(ActualsIn),
        summary="Report actuals: live accuracy of the forecasts served",
    )
    async def actuals(request: Request) -> Response:
        """Match each actual (`unique_id`, `ds`, `values`) with the remembered forecasts of
        that series holding that time (forecasts asked with timestamps or start + freq, within
        their span plus DISTILCAST_ACCURACY_MARGIN_S), and add the errors to the Prometheus
        live-accuracy metrics by model, version, mode and horizon step bucket."""

        async def work(body: bytes) -> bytes:
            live = services.live
            if live is None:
                raise ModelUnavailable("live accuracy is off (DISTILCAST_LIVE_ACCURACY=false)"
                                       if services.pool is not None else "the service is starting")
            wire = decode.decode_struct(body, ActualsWire)
            return orjson.dumps(await live.actuals(wire))

        return await answer(request, ACTUALS, work)

    return router
