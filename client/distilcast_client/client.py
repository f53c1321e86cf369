"""`Client` (sync) and `AsyncClient`: forecasts, backtests, actuals and model cards as DataFrames.

Every call is retried on connection errors and on 503/429 with exponential backoff (tenacity),
waiting what `Retry-After` asks when the service says, never past `retry_max_s` in total: the
service's forecasts are idempotent, so a retry cannot do harm.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
import numpy as np
import pandas as pd
import tenacity

from distilcast_client import frames
from distilcast_client.errors import (
    RETRYABLE,
    DistilcastError,
    SeriesFailed,
    Unreachable,
    from_response,
)

Mode = Literal["fast", "accurate", "auto"]
BacktestMode = Literal["fast", "accurate", "both"]
DEFAULT_ARROW_MIN_SERIES = 20
ACTUALS_PER_CALL = 50_000


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, (httpx.TransportError, *RETRYABLE))


class _Wait:
    """Exponential backoff with jitter; the service's Retry-After when it gives one."""

    def __init__(self, initial_s: float, max_s: float) -> None:
        self.backoff = tenacity.wait_exponential_jitter(multiplier=initial_s, max=max_s)

    def __call__(self, state: tenacity.RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome is not None else None
        if isinstance(exc, DistilcastError) and exc.retry_after is not None:
            return exc.retry_after
        return float(self.backoff(state))


@dataclass
class RetryPolicy:
    """`max_s` bounds the whole call (tries and waits); a wait that would pass it is not taken."""

    max_s: float = 30.0
    max_attempts: int = 8
    initial_s: float = 0.1
    max_wait_s: float = 5.0

    def kwargs(self) -> dict[str, Any]:
        return {
            "retry": tenacity.retry_if_exception(_retryable),
            "wait": _Wait(self.initial_s, self.max_wait_s),
            "stop": (tenacity.stop_before_delay(self.max_s)
                     | tenacity.stop_after_attempt(self.max_attempts)),
            "reraise": True,
        }


@dataclass
class BacktestResult:
    """Per-window forecasts in long form (`unique_id`, `ds`, `cutoff`, the actual value columns,
    `<col>-<mode>` and `<col>-<mode>-lo/hi-<level>`), and the service's scores."""

    frame: pd.DataFrame
    metrics: dict[str, Any]
    gap: dict[str, Any] | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


def _forecast_plan(df: pd.DataFrame, h: int | None, level: list[float] | None, mode: Mode,
                   model: str | None, id_col: str, time_col: str, target_cols: list[str] | None,
                   arrow_min_series: int) -> tuple[frames.Prepared, bool, dict[str, Any]]:
    prep = frames.prepare(df, id_col, time_col, target_cols)
    options: dict[str, Any] = {"mode": mode}
    if model is not None:
        options["model"] = model
    if h is not None:
        options["horizon"] = h
    if level:
        options["level"] = list(level)
    return prep, prep.n_series >= arrow_min_series, options


def _arrow_request(prep: frames.Prepared, options: Mapping[str, Any]) -> dict[str, Any]:
    params: list[tuple[str, Any]] = [("mode", options["mode"])]
    if "model" in options:
        params.append(("model", options["model"]))
    if "horizon" in options:
        params.append(("h", options["horizon"]))
    params += [("level", f"{lv:g}") for lv in options.get("level", [])]
    return {"url": "/v1/forecast/batch", "params": params, "content": frames.to_arrow(prep),
            "headers": {"content-type": frames.ARROW, "accept": frames.ARROW}}


def _json_request(prep: frames.Prepared, options: Mapping[str, Any]) -> dict[str, Any]:
    return {"url": "/v1/forecast", "json": {**options, "series": frames.json_series(prep)}}


def _finish(frame: pd.DataFrame, meta: Mapping[str, Any], failures: list[dict[str, Any]],
            errors: str) -> pd.DataFrame:
    frame.attrs.update({"model": meta["model"], "version": int(meta["version"]),
                        "mode": meta["mode"], "provider": meta.get("provider"),
                        "failures": failures})
    if failures and errors == "raise":
        raise SeriesFailed(failures, frame)
    return frame


def _chunks(prep: frames.Prepared, max_values: int, max_series: int) -> list[frames.Prepared]:
    """Whole series per request, at most `max_values` values and `max_series` series each (the
    service refuses bigger requests with 413); a single larger series goes alone."""
    sizes = prep.frame.groupby(frames.ID, sort=False).size().tolist()
    width = len(prep.targets)
    bounds: list[tuple[int, int, int]] = []  # (first row, end row, series)
    start = row = count = 0
    for n in sizes:
        if count and ((row - start + n) * width > max_values or count >= max_series):
            bounds.append((start, row, count))
            start, count = row, 0
        row += n
        count += 1
    bounds.append((start, row, count))
    return [frames.Prepared(prep.frame.iloc[a:b], prep.targets, prep.has_time, k)
            for a, b, k in bounds]


def _from_arrow(responses: list[httpx.Response], errors: str) -> pd.DataFrame:
    import json

    parts = [frames.from_arrow(r.content) for r in responses]
    meta = parts[0][1]
    failures = [f for _, m in parts for f in json.loads(m.get("failures", "[]"))]
    frame = pd.concat([f for f, _ in parts], ignore_index=True) if len(parts) > 1 else parts[0][0]
    versions = sorted({int(m["version"]) for _, m in parts})
    if len(versions) > 1:  # a promotion landed between two chunks: say so
        frame.attrs["versions"] = versions
    return _finish(frame, meta, failures, errors)


def _from_json(response: httpx.Response, prep: frames.Prepared, errors: str) -> pd.DataFrame:
    answer = response.json()
    frame, failures = frames.from_json(answer, prep)
    return _finish(frame, answer, failures, errors)


def _backtest_body(df: pd.DataFrame, h: int | None, n_windows: int, step: int | None,
                   level: list[float] | None, mode: BacktestMode, model: str | None, id_col: str,
                   time_col: str, target_cols: list[str] | None
                   ) -> tuple[frames.Prepared, dict[str, Any]]:
    prep = frames.prepare(df, id_col, time_col, target_cols)
    body: dict[str, Any] = {"series": frames.json_series(prep), "mode": mode,
                            "n_windows": n_windows}
    for key, value in (("model", model), ("h", h), ("step", step)):
        if value is not None:
            body[key] = value
    if level:
        body["level"] = list(level)
    return prep, body


def _backtest_frame(answer: dict[str, Any], prep: frames.Prepared) -> BacktestResult:
    rows: list[dict[str, Any]] = []
    c = len(prep.targets)
    for w in answer["windows"]:
        h = len(w["ds"])
        cols: dict[str, np.ndarray] = {}
        y = np.asarray(w["y"], np.float64).reshape(h, c)
        for mode, values in w["forecast"].items():
            cols[mode] = np.asarray(values, np.float64).reshape(h, c)
        for mode, bands in (w.get("intervals") or {}).items():
            for label, band in bands.items():
                cols[f"{mode}-lo-{label}"] = np.asarray(band["lower"], np.float64).reshape(h, c)
                cols[f"{mode}-hi-{label}"] = np.asarray(band["upper"], np.float64).reshape(h, c)
        for t in range(h):
            row: dict[str, Any] = {frames.ID: w["unique_id"], frames.DS: w["ds"][t],
                                   "cutoff": w["cutoff"]}
            for j, name in enumerate(prep.targets):
                row[name] = float(y[t, j])
                for key, arr in cols.items():
                    row[f"{name}-{key}"] = float(arr[t, j])
            rows.append(row)
    frame = pd.DataFrame(rows)
    if prep.has_time and len(frame) and pd.api.types.is_datetime64_any_dtype(prep.frame[frames.DS]):
        dtype = prep.frame[frames.DS].dtype
        frame[frames.DS] = pd.to_datetime(frame[frames.DS]).astype(dtype)
        frame["cutoff"] = pd.to_datetime(frame["cutoff"]).astype(dtype)
    return BacktestResult(frame, answer["metrics"], answer.get("gap"), answer)


def _actuals_bodies(df: pd.DataFrame, id_col: str, time_col: str,
                    target_cols: list[str] | None) -> list[dict[str, Any]]:
    prep = frames.prepare(df, id_col, time_col, target_cols)
    if not prep.has_time:
        raise ValueError(f"actuals need the time column {time_col!r}")
    f = prep.frame
    ids = [frames.stamp(v) for v in f[frames.ID].tolist()]
    times = frames.stamps(f[frames.DS])
    values = f[prep.targets].to_numpy(float).tolist()
    items = [{"unique_id": i, "ds": t, "values": v}
             for i, t, v in zip(ids, times, values, strict=True)]
    return [{"actuals": items[k : k + ACTUALS_PER_CALL]}
            for k in range(0, len(items), ACTUALS_PER_CALL)]


def _merge_actuals(answers: list[dict[str, Any]]) -> dict[str, Any]:
    if len(answers) == 1:
        return answers[0]
    out: dict[str, Any] = {"errors": []}
    for a in answers:
        for key in ("received", "matched", "unmatched", "duplicates", "pairs"):
            out[key] = out.get(key, 0) + a.get(key, 0)
        out["errors"] += a.get("errors", [])
    return out


def _check(response: httpx.Response) -> httpx.Response:
    if response.status_code >= 400:
        raise from_response(response.status_code, response.content,
                            response.headers.get("retry-after"))
    return response


class _Base:
    def __init__(self, base_url: str, *, timeout: float, api_key: str | None,
                 retry: RetryPolicy | None, arrow_min_series: int, max_series_per_call: int,
                 max_values_per_call: int) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.headers = {"X-API-Key": api_key} if api_key else {}
        self.retry = retry or RetryPolicy()
        self.arrow_min_series = arrow_min_series
        self.max_series = max_series_per_call
        self.max_values = max_values_per_call


class Client(_Base):
    """Synchronous client. `Client("http://127.0.0.1:8000").forecast(df, h=24, level=[80])`.

    Many series are sent as Arrow batches of whole series, at most `max_series_per_call` series
    and `max_values_per_call` values (rows x value columns) each, within the service's default
    limits; the answers are joined into one frame."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", *, timeout: float = 30.0,
                 api_key: str | None = None, retry: RetryPolicy | None = None,
                 arrow_min_series: int = DEFAULT_ARROW_MIN_SERIES,
                 max_series_per_call: int = 10_000, max_values_per_call: int = 4_000_000,
                 transport: httpx.BaseTransport | None = None) -> None:
        super().__init__(base_url, timeout=timeout, api_key=api_key, retry=retry,
                         arrow_min_series=arrow_min_series,
                         max_series_per_call=max_series_per_call,
                         max_values_per_call=max_values_per_call)
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, headers=self.headers,
                                  transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _call(self, method: str, url: str, **kw: Any) -> httpx.Response:
        def send() -> httpx.Response:
            return _check(self._http.request(method, url, **kw))

        try:
            out: httpx.Response = tenacity.Retrying(**self.retry.kwargs())(send)
        except httpx.TransportError as exc:
            raise Unreachable(f"{method} {url}: {exc!r}") from exc
        return out

    def forecast(self, df: pd.DataFrame, h: int | None = None, level: list[float] | None = None,
                 mode: Mode = "fast", model: str | None = None, id_col: str = "unique_id",
                 time_col: str = "ds", target_cols: list[str] | None = None, *,
                 errors: Literal["raise", "ignore"] = "raise") -> pd.DataFrame:
        """Forecast every series of a long DataFrame. Many series go as one Arrow batch, a few as
        JSON. `attrs`: model, version, mode, provider, failures (per-series errors of a batch;
        raised as `SeriesFailed` unless errors="ignore")."""
        prep, arrow, options = _forecast_plan(df, h, level, mode, model, id_col, time_col,
                                              target_cols, self.arrow_min_series)
        if arrow:
            responses = []
            for part in _chunks(prep, self.max_values, self.max_series):
                req = _arrow_request(part, options)
                responses.append(self._call("POST", req.pop("url"), **req))
            return _from_arrow(responses, errors)
        req = _json_request(prep, options)
        return _from_json(self._call("POST", req.pop("url"), **req), prep, errors)

    def backtest(self, df: pd.DataFrame, h: int | None = None, n_windows: int = 1,
                 step: int | None = None, level: list[float] | None = None,
                 mode: BacktestMode = "fast", model: str | None = None,
                 id_col: str = "unique_id", time_col: str = "ds",
                 target_cols: list[str] | None = None) -> BacktestResult:
        """Rolling-origin backtest (POST /v1/backtest), like neuralforecast's cross_validation."""
        prep, body = _backtest_body(df, h, n_windows, step, level, mode, model, id_col, time_col,
                                    target_cols)
        return _backtest_frame(self._call("POST", "/v1/backtest", json=body).json(), prep)

    def send_actuals(self, df: pd.DataFrame, id_col: str = "unique_id", time_col: str = "ds",
                     target_cols: list[str] | None = None) -> dict[str, Any]:
        """Report what happened (POST /v1/actuals): the service scores the forecasts it gave
        for those series and times. Returns matched/unmatched counts and this batch's errors."""
        bodies = _actuals_bodies(df, id_col, time_col, target_cols)
        return _merge_actuals([self._call("POST", "/v1/actuals", json=b).json() for b in bodies])

    def models(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = self._call("GET", "/v1/models").json()["models"]
        return out

    def model(self, name: str) -> dict[str, Any]:
        """One model: versions, aliases and the default version's card."""
        out: dict[str, Any] = self._call("GET", f"/v1/models/{name}").json()
        return out


class AsyncClient(_Base):
    """The same calls, awaitable: `async with AsyncClient(url) as c: await c.forecast(df)`."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", *, timeout: float = 30.0,
                 api_key: str | None = None, retry: RetryPolicy | None = None,
                 arrow_min_series: int = DEFAULT_ARROW_MIN_SERIES,
                 max_series_per_call: int = 10_000, max_values_per_call: int = 4_000_000,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        super().__init__(base_url, timeout=timeout, api_key=api_key, retry=retry,
                         arrow_min_series=arrow_min_series,
                         max_series_per_call=max_series_per_call,
                         max_values_per_call=max_values_per_call)
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=timeout,
                                       headers=self.headers, transport=transport)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def _call(self, method: str, url: str, **kw: Any) -> httpx.Response:
        async def send() -> httpx.Response:
            return _check(await self._http.request(method, url, **kw))

        try:
            out: httpx.Response = await tenacity.AsyncRetrying(**self.retry.kwargs())(send)
        except httpx.TransportError as exc:
            raise Unreachable(f"{method} {url}: {exc!r}") from exc
        return out

    async def forecast(self, df: pd.DataFrame, h: int | None = None,
                       level: list[float] | None = None, mode: Mode = "fast",
                       model: str | None = None, id_col: str = "unique_id", time_col: str = "ds",
                       target_cols: list[str] | None = None, *,
                       errors: Literal["raise", "ignore"] = "raise") -> pd.DataFrame:
        prep, arrow, options = _forecast_plan(df, h, level, mode, model, id_col, time_col,
                                              target_cols, self.arrow_min_series)
        if arrow:
            responses = []
            for part in _chunks(prep, self.max_values, self.max_series):
                req = _arrow_request(part, options)
                responses.append(await self._call("POST", req.pop("url"), **req))
            return _from_arrow(responses, errors)
        req = _json_request(prep, options)
        return _from_json(await self._call("POST", req.pop("url"), **req), prep, errors)

    async def backtest(self, df: pd.DataFrame, h: int | None = None, n_windows: int = 1,
                       step: int | None = None, level: list[float] | None = None,
                       mode: BacktestMode = "fast", model: str | None = None,
                       id_col: str = "unique_id", time_col: str = "ds",
                       target_cols: list[str] | None = None) -> BacktestResult:
        prep, body = _backtest_body(df, h, n_windows, step, level, mode, model, id_col, time_col,
                                    target_cols)
        response = await self._call("POST", "/v1/backtest", json=body)
        return _backtest_frame(response.json(), prep)

    async def send_actuals(self, df: pd.DataFrame, id_col: str = "unique_id",
                           time_col: str = "ds",
                           target_cols: list[str] | None = None) -> dict[str, Any]:
        bodies = _actuals_bodies(df, id_col, time_col, target_cols)
        answers = [(await self._call("POST", "/v1/actuals", json=b)).json() for b in bodies]
        return _merge_actuals(answers)

    async def models(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = (await self._call("GET", "/v1/models")).json()["models"]
        return out

    async def model(self, name: str) -> dict[str, Any]:
        out: dict[str, Any] = (await self._call("GET", f"/v1/models/{name}")).json()
        return out
