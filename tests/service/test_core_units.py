"""Core pieces on their own: windows, time axes, calibration, cost model, dynamic batcher."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from service.api.decode import Limits, batch_request, forecast_request
from service.core.batcher import CostModel, DynamicBatcher
from service.core.errors import InvalidInput, LimitExceeded, MalformedBody, Overloaded
from service.core.intervals import Calibration
from service.core.timeaxis import from_start, from_timestamps, parse_freq
from service.core.types import SeriesFailure, SeriesInput
from service.core.windows import flat_to_windows, to_window

LIMITS = Limits(100, 10_000)


def test_to_window_shapes() -> None:
    arr, uni = to_window([[1, 2.5], [3, 4]], "v")
    assert arr.dtype == np.float32 and arr.shape == (2, 2) and not uni
    arr, uni = to_window([1, 2, 3], "v")
    assert arr.shape == (3, 1) and uni


@pytest.mark.parametrize(("values", "field"), [
    ([[1.0, 2.0], [3.0]], "v[1]"),
    ([[1.0, 2.0], 3.0], "v[1]"),
    ([1.0, [2.0]], "v[1]"),
    ([[1.0, float("inf")]], "v[0][1]"),
    ([1.0, float("nan")], "v[1]"),
    ([[1.0], [None]], "v[1][0]"),
    ([[[1.0]]], "v[0][0]"),
    ({"a": 1}, "v"),
])
def test_to_window_names_the_bad_element(values: object, field: str) -> None:
    with pytest.raises(InvalidInput) as err:
        to_window(values, "v")
    assert err.value.field.startswith(field)


def test_flat_to_windows_reports_per_series() -> None:
    values = [1.0] * 12
    values[7] = None  # type: ignore[call-overload]
    flat, errors = flat_to_windows(values, [2, 2, 2], 2, "values")
    assert flat.shape == (6, 2)
    assert errors[0] is None and errors[2] is None
    assert errors[1] is not None and errors[1].field == "values[7]"


def test_time_axes() -> None:
    axis = from_timestamps(["2024-01-01T00:00:00+00:00", "2024-01-01T00:30:00+00:00"], 2, "t")
    assert axis.future(2) == ["2024-01-01T01:00:00+00:00", "2024-01-01T01:30:00+00:00"]
    assert from_timestamps([0.5, 1.0], 2, "t").future(1) == [1.5]
    assert from_start(1000, "2s", 3, "s", "f").future(1) == [1006]
    assert from_start("2024-01-01", "W", 2, "s", "f").future(1) == ["2024-01-15 00:00:00"]
    assert parse_freq("15T", "f").total_seconds() == 900
    with pytest.raises(InvalidInput) as err:
        from_timestamps(["2024-01-01T00:00:00", "2024-01-01T00:00:00+00:00"], 2, "t")
    assert err.value.field == "t[1]"
    with pytest.raises(InvalidInput):
        from_timestamps([2, 1], 2, "t")
    with pytest.raises(InvalidInput):
        from_timestamps(["2024-01-01", 5], 2, "t")
    # Date-only stamps are read as midnight and extended by their own spacing.
    days = from_timestamps(["2024-01-01", "2024-01-02"], 2, "t")
    assert days.future(2) == ["2024-01-03 00:00:00", "2024-01-04 00:00:00"]
    with pytest.raises(InvalidInput) as err:
        from_timestamps(["2024-01-01", "2024-13-01"], 2, "t")  # no 13th month
    assert err.value.field == "t[1]"


def test_calibration_levels_and_bands() -> None:
    cal = Calibration([80, 95], np.array([[1.0, 2.0], [2.0, 3.0]]))
    rows = cal.check_levels([95.0], horizon=2)
    (lo, hi), = cal.bands(np.zeros((1, 2, 1), np.float32), np.full((1, 1), 2.0, np.float32), rows)
    assert hi[0, :, 0].tolist() == [4.0, 6.0] and lo[0, :, 0].tolist() == [-4.0, -6.0]
    with pytest.raises(InvalidInput) as err:
        cal.check_levels([80, 90], horizon=2)
    assert err.value.field == "level[1]"


def test_cost_model_learns_a_line() -> None:
    cost = CostModel()
    assert cost.predict(4) == 0.0
    for rows in (1, 8, 1, 8, 64):
        cost.observe(rows, 0.001 + 0.0001 * rows)
    assert cost.predict(100) == pytest.approx(0.011, rel=1e-3)


def test_decode_errors_name_fields() -> None:
    with pytest.raises(InvalidInput) as err:
        forecast_request(b'{"series": [{"id": "a", "values": [1], "freq": 5}]}', LIMITS)
    assert err.value.field == "series[0].freq"
    with pytest.raises(MalformedBody):
        forecast_request(b'{"series": ', LIMITS)
    with pytest.raises(LimitExceeded):
        forecast_request(b'{"series": [{"id": "a", "values": [' + b"1," * 10_000 + b'1]}]}',
                         LIMITS)
    req = batch_request(b'{"ids": ["a", "b"], "sizes": [1, 1], "values": [1.0, NaN]}', LIMITS)
    assert isinstance(req.series[0], SeriesInput) and isinstance(req.series[1], SeriesFailure)
    assert req.series[1].error.field == "values[1]"


def _run_batcher(max_queue: int, n: int, sleep: float) -> tuple[list[int], list[Any]]:
    calls: list[int] = []
    lock = threading.Lock()

    def run(x: np.ndarray) -> np.ndarray:
        with lock:
            calls.append(x.shape[0])
        time.sleep(sleep)
        return x[:, :2] * 2

    async def main() -> list[Any]:
        with ThreadPoolExecutor(1) as executor:
            b = DynamicBatcher(run, max_batch=64, max_delay_s=0.0, max_queue=max_queue,
                               inline_max_s=0.0, executor=executor)
            b.cost.observe(1, 0.001)  # known to be slow enough for the worker thread
            xs = [np.full((1, 4, 1), i, np.float32) for i in range(n)]
            first = asyncio.create_task(b.submit(xs[0]))
            await asyncio.sleep(0.02)  # the first call is now running
            rest = [asyncio.create_task(b.submit(x)) for x in xs[1:]]
            out = await asyncio.gather(first, *rest, return_exceptions=True)
            await b.close()
            return out

    return calls, asyncio.run(main())


def test_batcher_coalesces_requests_that_arrive_while_busy() -> None:
    calls, out = _run_batcher(max_queue=16, n=6, sleep=0.05)
    assert calls == [1, 5]
    for i, (y, timing) in enumerate(out):
        assert np.all(y == 2 * i) and y.shape == (1, 2, 1)
        assert timing.batch_rows == (1 if i == 0 else 5)


def test_batcher_bounded_queue_raises_overloaded() -> None:
    calls, out = _run_batcher(max_queue=2, n=5, sleep=0.05)
    rejected = [r for r in out if isinstance(r, Overloaded)]
    assert len(rejected) == 2 and rejected[0].retry_after_s >= 1
    assert calls == [1, 2]


def test_idle_batcher_runs_a_lone_request_inline() -> None:
    thread_ids: list[int] = []

    def run(x: np.ndarray) -> np.ndarray:
        thread_ids.append(threading.get_ident())
        return x

    async def main() -> None:
        with ThreadPoolExecutor(1) as executor:
            b = DynamicBatcher(run, max_batch=8, max_delay_s=0.01, max_queue=4,
                               inline_max_s=0.01, executor=executor)
            _, timing = await b.submit(np.zeros((1, 2, 1), np.float32))
            assert timing.queue_s == 0.0

    asyncio.run(main())
    assert thread_ids == [threading.get_ident()]


_ROWS = '[[1, 2.5], [3, 4e-3]]'


@pytest.mark.parametrize("body", [
    '{"series": [{"id": "a", "values": ROWS}]}',
    '{"series": [{"id": 7, "values": ROWS, "start": "2024-01-01", "freq": "h"}], "mode": "auto",'
    ' "horizon": 4, "level": [80, 95.5], "deadline_ms": 3, "model": "m@2"}',
    '{"series": [{"id": "a", "values": ROWS}, {"id": "b", "values": [[1], [2]]}]}',
    '{"series": [{"id": "a", "values": [1, 2, 3]}]}',  # univariate: the general path
    '{"series": [{"id": "a", "values": [[1, true]]}]}',
    '{"series": [{"id": "a", "values": [[1, "2"]]}]}',
    '{"series": [{"id": "a", "values": [[1, NaN]]}]}',
    '{"series": [{"id": "a", "values": [[1, 1e39]]}]}',
    '{"series": [{"id": "a", "values": [[1, 1e400]]}]}',
    '{"series": [{"id": "a", "values": [[1, 2], [3]]}]}',
    '{"series": [{"id": "a", "values": [[]]}]}',
    '{"series": [{"id": "a", "values": []}]}',
    '{"series": [{"id": "a", "values": ROWS}, {"id": "a", "values": ROWS}]}',
    '{"series": []}',
    '{"series": [{"id": "a", "values": ROWS}], "mode": "fastest"}',
    '{"series": [{"id": "a", "values": ROWS}], "horizon": 0}',
    '{"series": [{"id": "a", "values": ROWS, "colour": 1}]}',
    '{"series": [{"id": "a", "values": ROWS}], "extra": 1}',
    '{"series": [{"id": "a", "values": ROWS}]',
    # simdjson flattens any nesting and the shape is proven on the text: every wrong shape
    # whose numbers still add up must reach the general path.
    '{"series": [{"id": "a", "values": [[1, [2]], [3, 4]]}]}',
    '{"series": [{"id": "a", "values": [[[1], 2], [3, 4]]}]}',
    '{"series": [{"id": "a", "values": [[1, 2], 3]}]}',
    '{"series": [{"id": "a", "values": [3, [1, 2]]}]}',
    '{"series": [{"id": "a", "values": [[1, 2], [3], [4, 5, 6]]}]}',
    '{"series": [{"id": "a", "values": [[1, 2, 3], [4], [5, 6]]}]}',
    '{"series": [{"id": "a", "values": [[1, 2], [], [3, 4, 5, 6]]}]}',
    '{"series": [{"id": "a", "values": [[1, 2], [3, 4, 5], [6]]}]}',
    '{"series": [{"id": "a", "values": [[1, null]]}]}',
    '{"series": [{"id": "a", "values": [[1, {"v": 2}]]}]}',
    '{"series": [{"id": "a", "values": {"v": [[1, 2]]}}]}',
    '{"series": [{"id": "a", "values": "[[1, 2]]"}]}',
    '{"series": [{"id": "a", "values": 5}]}',
    '{"series": [{"id": "a", "values": null}]}',
    '{"series": [{"id": "a", "values": [[1]]}]}',
    '{"series": [{"id": "a", "values": [ [ 1 ,\n 2 ] ,\t[3,4]\r\n ] }]}',
    '{"series": [{"id": "a", "values": [[-0, 0.0, -0.0, 1E2, 1e-2, 5e-324, 3.4028235e38]]}]}',
    '{"series": [{"id": "a", "values": [[9223372036854775807, -9223372036854775808]]}]}',
    '{"series": [{"id": "a", "values": [[18446744073709551615, 1]]}]}',
    '{"series": [{"id": "a", "values": [[18446744073709551616, 1]]}]}',
    '{"series": [{"id": "a", "values": [[1.00000000000000000000000000001, 0.1]]}]}',
    '{"series": [{"id": "a", "values": [[1, 2]], "values": [[3, 4]]}]}',
    '{"series": [{"id": "a", "values": ROWS}], "series": [{"id": "b", "values": [[5]]}]}',
    '{"series": [{"id": "a", "values": [[1, 2]]}, {"id": "b", "values": [[1, 2], [3]]}]}',
    '{"series": [{"id": "a,[", "values": ROWS}]}',
    '{"series": [{"id": "a", "values": ' + "[" * 1000 + "]" * 1000 + "}]}",
    '{"series": [{"id": "a", "values": ' + "[" * 3000 + "1" + "]" * 3000 + "}]}",
])
def test_one_pass_decode_agrees_with_the_general_path(body: str) -> None:
    """/v1/forecast decodes the common body on a fast road (msgspec + simdjson); whatever it
    accepts must be exactly what the general path builds, and whatever it refuses the general
    path explains."""
    from service.api.decode import general_forecast_request

    raw = body.replace("ROWS", _ROWS).encode()
    outcomes = []
    for decode in (forecast_request, general_forecast_request):
        try:
            req = decode(raw, LIMITS)
        except Exception as exc:
            outcomes.append(("error", type(exc), str(exc), getattr(exc, "field", None)))
            continue
        series = [
            (s.id, s.values.dtype, s.values.tolist(), s.univariate, s.index, s.timestamps,
             s.start, s.freq) if isinstance(s, SeriesInput) else s
            for s in req.series
        ]
        outcomes.append(("ok", series, req.model, req.mode, req.horizon, req.levels,
                         req.deadline_ms))
    assert outcomes[0] == outcomes[1]


def _outcome(decode: Any, raw: bytes) -> tuple[Any, ...]:
    try:
        req = decode(raw, LIMITS)
    except Exception as exc:
        return ("error", type(exc), str(exc), getattr(exc, "field", None))
    return ("ok", [(s.id, s.values.tobytes(), s.values.shape) if isinstance(s, SeriesInput) else s
                   for s in req.series])


def test_one_pass_decode_agrees_on_random_numbers_and_shapes() -> None:
    """Random windows written the many ways JSON writes numbers (integers, exponents, 17
    digits, subnormals, signs, spacing), some rows made ragged: the fast road's float32 values
    are bit for bit the general path's, and every shape it must not take it leaves alone."""
    from service.api.decode import _rows_request, general_forecast_request

    rng = np.random.default_rng(7)
    formats = ["{:.17g}", "{:.3f}", "{:e}", "{:d}", "{:.6E}", "{!r}"]
    taken = 0
    for case in range(300):
        n, c = int(rng.integers(1, 40)), int(rng.integers(1, 9))
        scale = 10.0 ** float(rng.uniform(-320, 38))
        values = rng.standard_normal((n, c)) * scale
        rows = []
        for row in values:
            cells = []
            for v in row:
                fmt = formats[int(rng.integers(len(formats)))]
                cells.append(fmt.format(int(v)) if fmt == "{:d}" else fmt.format(float(v)))
            rows.append(cells)
        if case % 5 == 4 and n > 1:  # ragged: move one number to another row
            moved = rows[0].pop()
            rows[-1].append(moved)
        sep = [",", ", ", " ,\n "][case % 3]
        text = "[" + sep.join("[" + sep.join(r) + "]" for r in rows) + "]"
        raw = ('{"series": [{"id": "s", "values": ' + text + "}]}").encode()
        fast, general = _outcome(forecast_request, raw), _outcome(general_forecast_request, raw)
        assert fast == general, text[:200]
        taken += _rows_request(raw, LIMITS) is not None
    assert taken > 100, taken  # the fast road was exercised, not skipped
