"""Hostile input: schemathesis over the OpenAPI schema, a shape-aware fuzz of the numeric core, and
hand-written cases. The property everywhere: never a 5xx, never a hang; refusals are our JSON
error with a `field` where one is at fault.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from tests.reliability.harness import AUTH, Answer, Failed, RawClient

NAME = "etth1-h96"
LOOKBACK, HORIZON = 32, 8
JSON = {"content-type": "application/json"}
# The hostile-input service runs with these limits (small, so the oversized cases stay cheap).
MAX_BODY = 1024 * 1024


@dataclass
class FuzzReport:
    cases: int = 0
    by_operation: Counter[str] = field(default_factory=Counter)
    status_codes: Counter[int] = field(default_factory=Counter)
    server_errors: list[str] = field(default_factory=list)
    not_our_error_shape: list[str] = field(default_factory=list)
    bad_answers: list[str] = field(default_factory=list)
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)

    def record(self, label: str, status: int, body: bytes, curl: Callable[[], str],
               ms: float) -> None:
        self.cases += 1
        self.by_operation[label] += 1
        self.status_codes[status] += 1
        self.latencies_ms.append(ms)
        if status >= 500:
            self.server_errors.append(f"{status} {curl()} -> {body[:200]!r}")
        elif status >= 400 and not _error_shape(body):
            self.not_our_error_shape.append(f"{status} {curl()} -> {body[:200]!r}")


def _error_shape(body: bytes) -> bool:
    try:
        error = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(error, dict) and bool(error.get("code")) and "message" in error


def _settings(examples: int, derandomize: bool) -> settings:
    return settings(max_examples=examples, deadline=None, database=None, derandomize=derandomize,
                    suppress_health_check=list(HealthCheck), phases=[Phase.generate],
                    report_multiple_bugs=False)


def _fuzz_operation(op: Any, mode: GenerationMode, headers: dict[str, str] | None, label: str,
                    url: str, session: requests.Session, examples: int, derandomize: bool,
                    report: FuzzReport) -> None:
    @_settings(examples, derandomize)
    @given(case=op.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        started = time.monotonic()
        response = case.call(base_url=url, session=session, headers=headers, timeout=10)
        ms = (time.monotonic() - started) * 1000
        report.record(label, response.status_code, response.content,
                      lambda: case.as_curl_command(headers=headers), ms)

    run()


def schemathesis_fuzz(url: str, examples: int, *, derandomize: bool = True,
                      report: FuzzReport | None = None) -> FuzzReport:
    """Every operation of the service's own /openapi.json, `examples` positive and `examples`
    negative (schema-violating) cases each where the operation has inputs; the admin route once
    without and once with the admin token."""
    report = report or FuzzReport()
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    session = requests.Session()
    t0 = time.monotonic()
    for result in schema.get_all_operations():
        op = result.ok()
        variants: list[dict[str, str] | None] = [None]
        if op.method.upper() == "PUT":
            variants.append(AUTH)
        modes = [GenerationMode.POSITIVE]
        if len(op.body) or len(op.query) or len(op.headers):  # something to violate
            modes.append(GenerationMode.NEGATIVE)
        for mode in modes:
            for headers in variants:
                label = f"{op.label} {mode.value}{' +token' if headers else ''}"
                try:
                    _fuzz_operation(op, mode, headers, label, url, session, examples,
                                    derandomize, report)
                except Unsatisfiable:
                    pass  # no schema-violating value can be sent for it
    report.seconds += time.monotonic() - t0
    session.close()
    return report


# -- a fuzz that reaches the numeric core (schema-valid shapes, hostile values) ------------------

_FLOATS = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.floats(allow_nan=False, allow_infinity=False),  # beyond float32, down to denormals
    st.sampled_from([0.0, -0.0, 1e-45, 3.4028234e38, -3.4028234e38, 1e308, 5e-324, 1e38]),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
)
_IDS = st.one_of(st.text(max_size=30), st.integers(min_value=-(2**63), max_value=2**63 - 1))
_STAMPS = st.one_of(
    st.integers(min_value=-(2**62), max_value=2**62), st.floats(allow_nan=False),
    st.datetimes().map(lambda d: d.isoformat()),
)


@st.composite
def forecast_bodies(draw: st.DrawFn) -> dict[str, Any]:
    channels = draw(st.integers(1, 3))
    n = draw(st.sampled_from([LOOKBACK, LOOKBACK + 1, 2 * LOOKBACK]))
    value = _FLOATS
    if channels == 1 and draw(st.booleans()):
        values: list[Any] = draw(st.lists(value, min_size=n, max_size=n))
    else:
        values = draw(st.lists(st.lists(value, min_size=channels, max_size=channels),
                               min_size=n, max_size=n))
    series: dict[str, Any] = {"id": draw(_IDS), "values": values}
    timing = draw(st.sampled_from(["none", "timestamps", "start"]))
    if timing == "timestamps":
        start, step = draw(_STAMPS), draw(st.sampled_from([1, 3600, 1e300, -1, 0.5]))
        if isinstance(start, str):
            series["timestamps"] = [start] * n
        else:
            series["timestamps"] = [start + step * i for i in range(n)]
    elif timing == "start":
        series["start"] = draw(_STAMPS)
        series["freq"] = draw(st.sampled_from(["h", "15min", "D", "W", "30s", "1ms",
                                               "99999999D", "0h", "x"]))
    body: dict[str, Any] = {
        "model": draw(st.sampled_from([NAME, f"{NAME}@production", f"{NAME}@1",
                                       f"{NAME}-ensemble", f"{NAME}@2"])),
        "mode": draw(st.sampled_from(["fast", "accurate", "auto"])),
        "series": [series],
    }
    if draw(st.booleans()):
        body["horizon"] = draw(st.integers(1, HORIZON + 1))
    if draw(st.booleans()):
        body["level"] = draw(st.lists(st.sampled_from([50, 80, 95, 99, 99.5, 1e-9]), max_size=3))
    if draw(st.booleans()):
        body["deadline_ms"] = draw(st.floats(min_value=1e-6, max_value=1e308))
    return body


def core_fuzz(url: str, examples: int, *, derandomize: bool = True,
              report: FuzzReport | None = None) -> FuzzReport:
    """Schema-valid forecast bodies with hostile numbers, ids and time axes: 200 or 4xx only."""
    report = report or FuzzReport()
    session = requests.Session()
    t0 = time.monotonic()

    @_settings(examples, derandomize)
    @given(body=forecast_bodies(), batch=st.booleans())
    def run(body: dict[str, Any], batch: bool) -> None:
        path = "/v1/forecast/batch" if batch else "/v1/forecast"
        raw = json.dumps(body).encode()  # inf timestamps go out as Infinity literals
        started = time.monotonic()
        r = session.post(url + path, data=raw, headers=JSON, timeout=10)
        report.record(f"POST {path} core", r.status_code, r.content,
                      lambda: f"POST {path} {raw[:300]!r}", (time.monotonic() - started) * 1000)
        if r.status_code == 200:
            out = r.json()
            for f in out["forecasts"]:
                assert "error" in f or _finite(f["values"]), f

    try:
        run()
    except AssertionError as exc:  # hypothesis shrank it to a minimal body: report that
        report.bad_answers.append(f"200 with a non-finite forecast: {exc}"[:500])
    report.seconds += time.monotonic() - t0
    session.close()
    return report


def _finite(values: Any) -> bool:
    flat = values if not values or not isinstance(values[0], list) else sum(values, [])
    return all(v is not None and math.isfinite(v) for v in flat)


# -- hand-written cases ----------------------------------------------------------------------------


def _window(channels: int = 1) -> list[list[float]]:
    return [[float(t) + c for c in range(channels)] for t in range(LOOKBACK)]


def _body(**series: Any) -> bytes:
    s = {"id": "a", "values": _window(), **series}
    return json.dumps({"model": NAME, "series": [s]}).encode()


def _raw(text: str) -> bytes:
    return text.encode()


@dataclass(frozen=True)
class Case:
    name: str
    method: str
    path: str
    body: bytes | None
    expect: tuple[int, ...]
    field: str | None = None
    headers: dict[str, str] | None = None
    check: Callable[[dict[str, Any]], bool] | None = None
    send_body: bool = True  # False: announce `content-length` of the body but send none


W = json.dumps(_window()).encode()
LONG_ID = "x" * 10_000
UNICODE_IDS = ["序列-😀", "\u0000nul", "\u202eevil", "é" * 3, " ", LONG_ID]


def _echo(ids: list[str]) -> Callable[[dict[str, Any]], bool]:
    return lambda out: [f["id"] for f in out["forecasts"]] == ids


CASES: list[Case] = [
    # Huge bodies: refused by size, before being read when Content-Length says so.
    Case("huge body (content-length, not sent)", "POST", "/v1/forecast", b"x" * (MAX_BODY + 1),
         (413,), "body", send_body=False),
    Case("huge body (sent)", "POST", "/v1/forecast", b'{"series": [' + b" " * (2 * MAX_BODY)
         + b"]}", (413,), "body"),
    Case("huge batch body", "POST", "/v1/forecast/batch", b"[" + b"1," * MAX_BODY + b"1]",
         (413,), "body"),
    Case("huge body on the admin route, no token", "PUT",
         f"/v1/models/{NAME}/aliases/production", b'{"version": 1, "x": "'
         + b"a" * (2 * MAX_BODY) + b'"}', (413,), "body"),
    Case("huge body on a GET route", "GET", "/v1/models", b"x" * (2 * MAX_BODY), (413,), "body",
         send_body=False),
    Case("too many series", "POST", "/v1/forecast",
         json.dumps({"series": [{"id": i, "values": [1.0]} for i in range(60)]}).encode(),
         (413,), "series"),
    Case("too many levels", "POST", "/v1/forecast",
         json.dumps({"model": NAME, "level": [80] * 10_000, "series": [
             {"id": "a", "values": _window()}]}).encode(), (422,), "level"),
    # Deeply nested JSON.
    Case("100k nested arrays", "POST", "/v1/forecast", b"[" * 100_000 + b"]" * 100_000, (400,),
         "body"),
    Case("5k nested objects", "POST", "/v1/forecast", b'{"a":' * 5000 + b"1" + b"}" * 5000,
         (400,), "body"),
    Case("1000-deep values", "POST", "/v1/forecast",
         b'{"series":[{"id":1,"values":' + b"[" * 1000 + b"1" + b"]" * 1000 + b"}]}", (422,),
         "series[0].values[0][0]"),
    Case("deep nesting with a NaN literal", "POST", "/v1/forecast",
         b'{"series":[{"id":1,"values":[NaN,' + b"[" * 50_000 + b"]" * 50_000 + b"]}]}",
         (400,), "body"),
    Case("deeply nested batch values", "POST", "/v1/forecast/batch",
         b'{"ids":["a"],"sizes":[1],"values":' + b"[" * 900 + b"]" * 900 + b"}", (200, 422)),
    # Extreme numbers.
    Case("1e308", "POST", "/v1/forecast", _body(values=[[1e308]] * LOOKBACK), (422,),
         "series[0].values[0][0]"),
    Case("-1e308 last", "POST", "/v1/forecast", _body(values=[[1.0]] * 31 + [[-1e308]]), (422,),
         "series[0].values[31][0]"),
    Case("just above float32", "POST", "/v1/forecast", _body(values=[3.5e38] * LOOKBACK),
         (422,), "series[0].values[0]"),
    Case("denormals and signed zeros", "POST", "/v1/forecast",
         _body(values=[5e-324, -0.0, 1e-45, 0.0] * 8), (200,),
         check=lambda out: out["forecasts"][0]["values"] == [0.0] * HORIZON),
    Case("values near float32 max: no finite forecast", "POST", "/v1/forecast",
         _body(values=[3.4e38] * LOOKBACK), (422,), "series[0].values"),
    Case("values near float32 max in a batch: that series fails", "POST",
         "/v1/forecast/batch", json.dumps({"model": NAME, "mode": "accurate", "series": [
             {"id": "a", "values": _window()}, {"id": "b", "values": [3.4e38] * LOOKBACK}]}
         ).encode(), (200,), check=lambda out: "values" in out["forecasts"][0]
         and out["forecasts"][1]["error"]["field"] == "series[1].values"),
    Case("1e999 literal", "POST", "/v1/forecast", _raw('{"series":[{"id":1,"values":[1e999]}]}'),
         (422,), "series[0].values[0]"),
    Case("integer beyond 64 bits", "POST", "/v1/forecast",
         _raw('{"series":[{"id":1,"values":[' + "9" * 400 + "]}]}"), (400, 422)),
    Case("5000-digit integer with NaN", "POST", "/v1/forecast",
         _raw('{"series":[{"id":1,"values":[NaN,' + "9" * 5000 + "]}]}"), (400, 422)),
    # NaN and infinity, as literals and as strings.
    Case("NaN literal", "POST", "/v1/forecast", _raw('{"series":[{"id":1,"values":[1.0,NaN]}]}'),
         (422,), "series[0].values[1]"),
    Case("-Infinity literal", "POST", "/v1/forecast",
         _raw('{"series":[{"id":1,"values":[[-Infinity]]}]}'), (422,), "series[0].values[0][0]"),
    Case("NaN string", "POST", "/v1/forecast", _body(values=["NaN"] * LOOKBACK), (422,),
         "series[0].values[0]"),
    Case("nan string in a row", "POST", "/v1/forecast", _body(values=[[1.0, "nan"]] * LOOKBACK),
         (422,), "series[0].values[0][1]"),
    Case("Infinity string, batch columnar", "POST", "/v1/forecast/batch",
         json.dumps({"model": NAME, "ids": ["a", "b"], "sizes": [LOOKBACK, LOOKBACK],
                     "values": [1.0] * LOOKBACK + ["Infinity"] * LOOKBACK}).encode(), (200,),
         check=lambda out: "values" in out["forecasts"][0]
         and out["forecasts"][1]["error"]["field"] == f"values[{LOOKBACK}]"),
    # Numbers that are not numbers: strict, a 422 naming the element.
    Case('"1" and true in values', "POST", "/v1/forecast", _body(values=["1", True] + [1.0] * 30),
         (422,), "series[0].values[0]"),
    Case("true in values", "POST", "/v1/forecast", _body(values=[1.0, True] + [1.0] * 30),
         (422,), "series[0].values[1]"),
    Case("false in a row", "POST", "/v1/forecast", _body(values=[[1.0, False]] * LOOKBACK),
         (422,), "series[0].values[0][1]"),
    Case('"1" in columnar values: that series fails', "POST", "/v1/forecast/batch",
         json.dumps({"model": NAME, "ids": ["a", "b"], "sizes": [LOOKBACK, LOOKBACK],
                     "values": [1.0] * LOOKBACK + ["1"] + [1.0] * 31}).encode(), (200,),
         check=lambda out: "values" in out["forecasts"][0]
         and out["forecasts"][1]["error"]["field"] == f"values[{LOOKBACK}]"),
    Case("true in a batch row: that series fails", "POST", "/v1/forecast/batch",
         json.dumps({"model": NAME, "series": [{"id": "a", "values": _window()}, {
             "id": "b", "values": [[True]] * LOOKBACK}]}).encode(), (200,),
         check=lambda out: "values" in out["forecasts"][0]
         and out["forecasts"][1]["error"]["field"] == "series[1].values[0][0]"),
    Case("null in values", "POST", "/v1/forecast", _body(values=[1.0, None] + [1.0] * 30),
         (422,), "series[0].values[1]"),
    Case("object in values", "POST", "/v1/forecast", _body(values=[{"v": 1}] * LOOKBACK),
         (422,), "series[0].values[0]"),
    # Unicode ids: echoed exactly; a lone surrogate cannot be echoed, so it is refused.
    *[Case(f"unicode id {i}", "POST", "/v1/forecast", _body(id=sid), (200,),
           check=_echo([sid])) for i, sid in enumerate(UNICODE_IDS)],
    Case("lone surrogate id", "POST", "/v1/forecast",
         _raw('{"series":[{"id":"\\ud800","values":' + W.decode() + "}]}"), (400,), "body"),
    Case("lone surrogate id with a NaN", "POST", "/v1/forecast",
         _raw('{"series":[{"id":"\\udfff","values":[NaN]}]}'), (400,), "body"),
    Case("invalid UTF-8", "POST", "/v1/forecast",
         b'{"series":[{"id":"\xff\xfe","values":' + W + b"}]}", (400,), "body"),
    # Horizons.
    Case("negative horizon", "POST", "/v1/forecast",
         json.dumps({"model": NAME, "horizon": -3, "series": [{"id": 1, "values": _window()}]}
                    ).encode(), (422,), "horizon"),
    Case("huge horizon", "POST", "/v1/forecast",
         json.dumps({"model": NAME, "horizon": 10**18, "series": [
             {"id": 1, "values": _window()}]}).encode(), (422,), "horizon"),
    Case("fractional horizon", "POST", "/v1/forecast",
         json.dumps({"model": NAME, "horizon": 2.5, "series": [{"id": 1, "values": _window()}]}
                    ).encode(), (422,), "horizon"),
    Case("boolean horizon", "POST", "/v1/forecast",
         json.dumps({"model": NAME, "horizon": True, "series": [
             {"id": 1, "values": _window()}]}).encode(), (422,), "horizon"),
    # Duplicate ids.
    Case("duplicate series ids", "POST", "/v1/forecast",
         json.dumps({"model": NAME, "series": [{"id": "a", "values": _window()}] * 2}).encode(),
         (422,), "series[1]"),
    Case("duplicate batch ids (columnar)", "POST", "/v1/forecast/batch",
         json.dumps({"model": NAME, "ids": [7, 7], "sizes": [LOOKBACK, LOOKBACK],
                     "values": [1.0] * (2 * LOOKBACK)}).encode(), (422,), "ids[1]"),
    Case("duplicate batch ids (rows)", "POST", "/v1/forecast/batch",
         json.dumps({"model": NAME, "series": [{"id": "a", "values": _window()}] * 3}).encode(),
         (422,), "series[1]"),
    # Time axes at the edges of the representable.
    Case("start near year 9999", "POST", "/v1/forecast",
         _body(start="9999-12-31T20:00:00", freq="h"), (422,), "series[0].start"),
    Case("timestamps ending at year 9999", "POST", "/v1/forecast",
         _body(timestamps=[(datetime(9999, 12, 31, 20) - timedelta(hours=LOOKBACK - 1 - i))
                           .isoformat() for i in range(LOOKBACK)]),
         (422,), "series[0].timestamps"),
    Case("numeric timestamps overflowing", "POST", "/v1/forecast",
         _body(timestamps=[1.79e308 - (LOOKBACK - 1 - i) * 1e306 for i in range(LOOKBACK)]),
         (422,),
         "series[0].timestamps"),
    Case("freq with 5000 digits", "POST", "/v1/forecast", _body(start=0, freq="9" * 5000 + "h"),
         (422,), "series[0].freq"),
    Case("freq beyond timedelta", "POST", "/v1/forecast", _body(start=0, freq="999999999999D"),
         (422,), "series[0].freq"),
    # Shapes and encodings.
    Case("empty body", "POST", "/v1/forecast", b"", (400,), "body"),
    Case("null body", "POST", "/v1/forecast", b"null", (422,), "body"),
    Case("array body", "POST", "/v1/forecast", b"[]", (422,), "body"),
    Case("series is an object", "POST", "/v1/forecast", b'{"series": {"id": 1}}', (422,),
         "series"),
    Case("garbage msgpack", "POST", "/v1/forecast", b"\xc1\xc1\xc1",
         (400,), "body", headers={"content-type": "application/msgpack"}),
    Case("msgpack with a bool value", "POST", "/v1/forecast",
         b"\x81\xa6series\x91\x82\xa2id\x01\xa6values\x92\xcb?\xf0\x00\x00\x00\x00\x00\x00\xc3",
         (422,), "series[0].values[1]", headers={"content-type": "application/msgpack"}),
    Case("model path traversal", "POST", "/v1/forecast",
         json.dumps({"model": "../../etc/passwd", "series": [{"id": 1, "values": _window()}]}
                    ).encode(), (422,), "model"),
    Case("10k-char model name", "POST", "/v1/forecast",
         json.dumps({"model": "a" * 10_000, "series": [{"id": 1, "values": _window()}]}
                    ).encode(), (422,), "model"),
    Case("version beyond 64 bits", "POST", "/v1/forecast",
         json.dumps({"model": f"{NAME}@{10**30}", "series": [{"id": 1, "values": _window()}]}
                    ).encode(), (404, 422), "model"),
    Case("admin body not JSON, with token", "PUT", f"/v1/models/{NAME}/aliases/staging",
         b"\x00\x01", (400, 422), headers=AUTH),
    Case("admin version beyond 64 bits, with token", "PUT",
         f"/v1/models/{NAME}/aliases/staging", json.dumps({"version": 10**30}).encode(),
         (404, 409, 422), headers=AUTH),
]


@dataclass
class CaseResult:
    case: Case
    status: int | None
    body: dict[str, Any] | None
    ms: float
    error: str | None = None

    @property
    def problem(self) -> str | None:
        c = self.case
        if self.error is not None:
            return f"{c.name}: no answer ({self.error})"
        if self.status not in c.expect:
            return f"{c.name}: {self.status}, expected {c.expect}: {str(self.body)[:200]}"
        if self.status is not None and self.status >= 400:
            if self.body is None or not _error_shape(json.dumps(self.body).encode()):
                return f"{c.name}: {self.status} without our error body"
            if c.field is not None and self.body["error"].get("field") != c.field:
                return f"{c.name}: field {self.body['error'].get('field')!r}, expected {c.field!r}"
        if self.status == 200 and c.check is not None and not (self.body and c.check(self.body)):
            return f"{c.name}: answer failed its check: {str(self.body)[:200]}"
        return None


async def _send(client: RawClient, case: Case) -> CaseResult:
    headers = {**JSON, **(case.headers or {})}
    started = time.monotonic()
    try:
        if not case.send_body:
            answer = await _announce_only(client, case, headers)
        else:
            answer = await client.request(case.method, case.path, case.body, headers)
    except Failed as exc:
        return CaseResult(case, None, None, (time.monotonic() - started) * 1000, exc.kind)
    try:
        body = json.loads(answer.body) if answer.body else None
    except ValueError:
        body = None
    return CaseResult(case, answer.status, body, (time.monotonic() - started) * 1000)


async def _announce_only(client: RawClient, case: Case, headers: dict[str, str]
                         ) -> Answer:
    """Headers announcing `len(case.body)` bytes, then nothing: the refusal must not wait."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    head = [f"{case.method} {case.path} HTTP/1.1", f"host: {client.host}",
            f"content-length: {len(case.body or b'')}"] + [f"{k}: {v}" for k, v in
                                                            headers.items()]
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode())
    await writer.drain()
    try:
        async with asyncio.timeout(client.timeout):
            status = int((await reader.readline()).split()[1])
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                key, _, value = line.decode().partition(":")
                if key.strip().lower() == "content-length":
                    length = int(value)
            data = await reader.readexactly(length)
    except TimeoutError:
        raise Failed("timeout", "no answer to an announced body", True) from None
    finally:
        writer.close()
    return Answer(status, {}, data)


def run_cases(url: str, cases: list[Case] | None = None, timeout: float = 15.0
              ) -> list[CaseResult]:
    async def main() -> list[CaseResult]:
        out = []
        for case in cases or CASES:
            client = RawClient(url, timeout)
            try:
                out.append(await _send(client, case))
            finally:
                client.close()
        return out

    return asyncio.run(main())
