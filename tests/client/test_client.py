"""distilcast_client against the real service over HTTP (uvicorn): DataFrames in and out (JSON for
a few series, Arrow for many), the Arrow answer equal to the JSON one, retries honouring
Retry-After within a bounded time, typed errors, backtest and actuals, and the plot."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest
import uvicorn
from distilcast_client import (
    AsyncClient,
    Client,
    InvalidInput,
    NotFound,
    RetryPolicy,
    SeriesFailed,
    Unavailable,
    Unreachable,
)

from tests.service.conftest import HORIZON, LOOKBACK, NAME, Served, make_registry, serving


def long_frame(n_series: int, n: int = LOOKBACK + 4, columns: tuple[str, ...] = ("y", "z"),
               seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    ds = pd.date_range("2024-01-01", periods=n, freq="h")
    parts = []
    for i in range(n_series):
        data: dict[str, Any] = {"unique_id": f"s{i}", "ds": ds}
        for j, c in enumerate(columns):
            data[c] = (10 * j + i + rng.normal(0, 1, n)).astype(np.float64)
        parts.append(pd.DataFrame(data))
    return pd.concat(parts, ignore_index=True)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("registry")
    make_registry(root)
    with serving(registry_root=root) as served:
        yield served


@pytest.fixture
def client(service: Served) -> Iterator[Client]:
    with Client(service.url) as c:
        yield c


def expected_last_value(df: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """The fixture student forecasts each column's last value; ds continues hourly."""
    rows = []
    for sid, g in df.groupby("unique_id", sort=False):
        last = g.iloc[-1]
        for t in range(1, HORIZON + 1):
            rows.append({"unique_id": sid, "ds": last["ds"] + pd.Timedelta(hours=t),
                         **{c: np.float32(last[c]) for c in columns}})
    return pd.DataFrame(rows)


def test_one_series_json_round_trip(client: Client) -> None:
    df = long_frame(1, columns=("y", "z", "w")).sample(frac=1.0, random_state=0)  # any row order
    out = client.forecast(df, level=[80, 95], model=NAME)
    assert list(out.columns) == ["unique_id", "ds", "y", "z", "w",
                                 "y-lo-80", "y-hi-80", "y-lo-95", "y-hi-95",
                                 "z-lo-80", "z-hi-80", "z-lo-95", "z-hi-95",
                                 "w-lo-80", "w-hi-80", "w-lo-95", "w-hi-95"]
    want = expected_last_value(df.sort_values("ds"), ["y", "z", "w"])
    assert out["unique_id"].tolist() == want["unique_id"].tolist()
    assert (out["ds"].to_numpy() == want["ds"].to_numpy()).all()
    for c in ("y", "z", "w"):
        np.testing.assert_allclose(out[c], want[c], rtol=1e-6)
        for level in ("80", "95"):
            assert (out[f"{c}-lo-{level}"] < out[c]).all()
            assert (out[f"{c}-hi-{level}"] > out[c]).all()
        assert (out[f"{c}-lo-95"] <= out[f"{c}-lo-80"]).all()
    assert out.attrs["model"] == NAME and out.attrs["version"] == 1
    assert out.attrs["mode"] == "fast" and out.attrs["failures"] == []


def test_500_series_arrow_equals_json(service: Served) -> None:
    df = long_frame(500, columns=("y", "z"), seed=1)
    rows = LOOKBACK + 4
    with Client(service.url) as arrow_client, \
            Client(service.url, arrow_min_series=10_000) as json_client, \
            Client(service.url, max_values_per_call=2 * rows * 60,
                   transport=(counting := Counting())) as chunked:
        by_arrow = arrow_client.forecast(df, h=6, level=[80], model=NAME)
        by_json = json_client.forecast(df, h=6, level=[80], model=NAME)
        by_chunks = chunked.forecast(df, h=6, level=[80], model=NAME)
    assert counting.attempts == 9  # 8 x 60 series + 20
    pd.testing.assert_frame_equal(by_chunks, by_arrow)
    assert len(by_arrow) == 500 * 6
    assert list(by_arrow.columns) == list(by_json.columns) == [
        "unique_id", "ds", "y", "z", "y-lo-80", "y-hi-80", "z-lo-80", "z-hi-80"]
    assert by_arrow["unique_id"].tolist() == by_json["unique_id"].tolist()
    assert (by_arrow["ds"].to_numpy() == by_json["ds"].to_numpy()).all()
    for c in by_arrow.columns[2:]:
        np.testing.assert_allclose(by_arrow[c], by_json[c], rtol=1e-6, atol=1e-6)
    want = expected_last_value(df, ["y", "z"])
    want = want.groupby("unique_id", sort=False).head(6).reset_index(drop=True)
    np.testing.assert_allclose(by_arrow[["y", "z"]], want[["y", "z"]], rtol=1e-6)
    assert (by_arrow.attrs["model"], by_arrow.attrs["version"]) == (NAME, 1)


def test_async_client_and_accurate_mode(service: Served) -> None:
    df = long_frame(30, columns=("y",), seed=2)

    async def run() -> tuple[pd.DataFrame, list[dict[str, Any]], dict[str, Any]]:
        async with AsyncClient(service.url) as c:
            out = await c.forecast(df, mode="accurate", model=NAME, level=[90])
            return out, await c.models(), await c.model(NAME)

    out, models, card = asyncio.run(run())
    assert out.attrs["mode"] == "accurate" and out.attrs["model"] == f"{NAME}-ensemble"
    assert {"y", "y-lo-90", "y-hi-90"} <= set(out.columns) and len(out) == 30 * HORIZON
    assert NAME in {m["name"] for m in models}
    assert card["name"] == NAME and card["card"]["lookback"] == LOOKBACK


def test_typed_errors(client: Client) -> None:
    df = long_frame(2, columns=("y",))
    with pytest.raises(NotFound) as nf:
        client.forecast(df, model="no-such-model")
    assert nf.value.status == 404 and nf.value.code == "model_not_found"
    with pytest.raises(InvalidInput) as bad:
        client.forecast(df, model=NAME, h=HORIZON + 1)
    assert bad.value.status == 422 and bad.value.field == "horizon"
    with pytest.raises(NotFound):
        client.model("no-such-model")


def test_a_bad_series_in_an_arrow_batch(client: Client) -> None:
    df = long_frame(25, columns=("y",))
    df.loc[df.index[df["unique_id"] == "s3"][-1], "y"] = np.nan
    with pytest.raises(SeriesFailed) as failed:
        client.forecast(df, model=NAME)
    assert [f["id"] for f in failed.value.failures] == ["s3"]
    assert failed.value.failures[0]["error"]["field"].startswith("y[")
    assert set(failed.value.frame["unique_id"]) == {f"s{i}" for i in range(25)} - {"s3"}
    kept = client.forecast(df, model=NAME, errors="ignore")
    assert len(kept) == 24 * HORIZON and len(kept.attrs["failures"]) == 1


class Flaky:
    """A real HTTP server answering 503 + Retry-After `failures` times, then 200."""

    def __init__(self, failures: int, retry_after: str = "1") -> None:
        self.failures, self.retry_after, self.calls = failures, retry_after, []
        config = uvicorn.Config(self.app, log_level="warning", access_log=False,
                                interface="asgi3")
        self.server = uvicorn.Server(config)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    async def app(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.calls.append(time.monotonic())
        if len(self.calls) <= self.failures:
            status, body = 503, b'{"error":{"code":"overloaded","message":"busy"}}'
            headers = [(b"retry-after", self.retry_after.encode())]
        else:
            status, body, headers = 200, b'{"models":[{"name":"m"}]}', []
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), *headers]})
        await send({"type": "http.response.body", "body": body})

    def __enter__(self) -> Flaky:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        return self

    def __exit__(self, *_: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def test_retries_503_honouring_retry_after() -> None:
    with Flaky(failures=2) as flaky, Client(flaky.url) as c:
        assert c.models() == [{"name": "m"}]
    assert len(flaky.calls) == 3
    gaps = np.diff(flaky.calls)
    assert (gaps >= 0.95).all(), gaps  # waited what Retry-After asked, not the 0.1 s backoff


def test_retries_stop_within_the_time_budget() -> None:
    with Flaky(failures=100) as flaky, \
            Client(flaky.url, retry=RetryPolicy(max_s=2.5)) as c:
        t0 = time.monotonic()
        with pytest.raises(Unavailable) as exc:
            c.models()
        elapsed = time.monotonic() - t0
    assert exc.value.status == 503 and exc.value.retry_after == 1.0
    assert elapsed < 3.5 and 2 <= len(flaky.calls) <= 4


class Counting(httpx.HTTPTransport):
    """The real transport, counting the connection attempts."""

    def __init__(self) -> None:
        super().__init__()
        self.attempts = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.attempts += 1
        return super().handle_request(request)


def test_connection_errors_are_retried_then_raised() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # bound, not listening: every connection is refused
    transport = Counting()
    policy = RetryPolicy(max_s=1.0, initial_s=0.05, max_wait_s=0.2)
    t0 = time.monotonic()
    with Client(f"http://127.0.0.1:{sock.getsockname()[1]}", retry=policy,
                transport=transport) as c, pytest.raises(Unreachable) as exc:
        c.models()
    sock.close()
    assert isinstance(exc.value.__cause__, httpx.ConnectError)
    assert transport.attempts >= 3 and time.monotonic() - t0 < 2.0


def test_backtest_and_actuals(client: Client) -> None:
    df = long_frame(2, n=LOOKBACK + 40, columns=("y",))
    bt = client.backtest(df, h=4, n_windows=3, step=4, level=[80], mode="both", model=NAME)
    assert len(bt.frame) == 2 * 3 * 4
    assert {"unique_id", "ds", "cutoff", "y", "y-fast", "y-accurate", "y-fast-lo-80"} <= set(
        bt.frame.columns)
    assert set(bt.metrics) == {"fast", "accurate"} and bt.gap is not None
    # The actual y of each window row is the history's value at that time.
    merged = bt.frame.merge(df, on=["unique_id", "ds"], suffixes=("", "_hist"))
    np.testing.assert_allclose(merged["y"], merged["y_hist"], rtol=1e-6)

    history = df.groupby("unique_id").head(LOOKBACK + 30)
    out = client.forecast(history, model=NAME, level=[80])
    actual = df.merge(out[["unique_id", "ds"]], on=["unique_id", "ds"])
    assert len(actual) == 2 * HORIZON
    report = client.send_actuals(actual)
    assert (report["received"], report["matched"], report["unmatched"]) == (16, 16, 0)


def test_actuals_match_forecasts_made_over_arrow(client: Client) -> None:
    df = long_frame(25, n=LOOKBACK + 20, columns=("y", "z"), seed=3)
    out = client.forecast(df.groupby("unique_id").head(LOOKBACK + 10), model=NAME)
    assert len(out) == 25 * HORIZON  # 25 series: sent as Arrow
    actual = df.merge(out[["unique_id", "ds"]], on=["unique_id", "ds"])
    report = client.send_actuals(actual)
    assert (report["received"], report["matched"]) == (25 * HORIZON, 25 * HORIZON)
    errors = report["errors"][0]
    assert (errors["model"], errors["mode"], errors["points"]) == (NAME, "fast", 25 * HORIZON * 2)


def test_plot(client: Client, tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from distilcast_client import plot

    df = long_frame(2, columns=("y",))
    fast = client.forecast(df, model=NAME, level=[80, 95])
    accurate = client.forecast(df, model=NAME, level=[80], mode="accurate")
    fig = plot(df, [fast, accurate], actuals=df.tail(5))
    assert len(fig.axes) == 2
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[0] == "history" and "actual" in labels
    assert any(lbl.startswith("fast") for lbl in labels)
    assert any(lbl.startswith("accurate") for lbl in labels)
    assert len(ax.collections) == 3  # two bands for fast, one for accurate
    fig.savefig(tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_columns_are_the_batch_jobs(client: Client) -> None:
    """The client's frame and the Ray batch job's Parquet have the same columns, in order."""
    import pyarrow as pa

    from service.batch.scoring import ScoreSpec
    from service.core.engine import EngineOptions

    spec = ScoreSpec(registry_root="", name=NAME, version=1, mode="fast", horizon=HORIZON,
                     levels=(80.0, 95.0), channels=("y", "z"), id_type=pa.string(),
                     time_type=pa.timestamp("ns"), engine=EngineOptions())
    few = client.forecast(long_frame(2), model=NAME, level=[80, 95])
    many = client.forecast(long_frame(30), model=NAME, level=[80, 95])
    assert list(few.columns) == list(many.columns) == spec.output_schema().names
