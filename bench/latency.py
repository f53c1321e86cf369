"""Latency and throughput of the forecasting service against JSON-over-HTTP floors.

    python bench/latency.py [--registry var/registry] [--model etth1-h96] [--duration 10]

One run measures, against uvicorn on loopback (the server pinned to one core with taskset, the
load generator - wrk, else a small asyncio client - in its own process on another core), at
concurrency 1 and 8, with the same forecast-shaped body (one series, lookback x 7 real ETTh1 rows):

  echo_naive  FastAPI route validating the body with pydantic list[list[float]], replying with a
              forecast-sized dict through FastAPI's default response encoding
  echo_min    minimal ASGI app: orjson parse, numpy validation, orjson reply (the floor)
  fast        POST /v1/forecast, mode fast (student)
  accurate    POST /v1/forecast, mode accurate (teacher ensemble)
  batch       POST /v1/forecast/batch, columnar form, 1000 series
  batch_msgpack  the same batch as msgpack, its values one float32 bin (informative)
  batch_arrow the same 1000 windows as an Arrow IPC stream (long form: unique_id and the 7
              value columns, float32), answered in Arrow (the client's path for many series)
  raw_ort     in-process ONNX Runtime on the same 1000 windows (same core, one thread)
  raw_ort_1   in-process ONNX Runtime on one window, the fast body's size (same core, one
              thread): the model's own share of a fast request, so `raw_ort_1/echo_min` says how
              far below `fast/echo_min` no serving work can go (fast ~ echo + this)

and writes bench/results/latency.json (records + ratio records) and latency.md. A run of some
`--cases` (and `--concurrency`) keeps the previous file's records it did not measure, e.g.
`--cases batch_arrow raw_ort --concurrency 1` for `batch_arrow/raw_ort` alone.
`python bench/latency.py arrow` measures `batch_arrow/raw_ort` alone, the two interleaved in rounds
(bench/latency_arrow.py; steadier on a shared machine), and replaces that record.
`python bench/latency.py workers` measures the fast path with 1 and 2 uvicorn workers and adds
the record `workers2/workers1` (bench/latency_workers.py); a full run keeps that record.
The service runs with shadow_fraction=0 so `fast` measures only the request path.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parent.parent
CHANNELS = 7
BATCH_SERIES = 1000
FAST_ROUTE = "/v1/forecast"

# -- the two echo baselines (served by this file: `latency.py serve echo_min|echo_naive`) -------


class EchoSeries(BaseModel):
    id: str
    values: list[list[float]]


class EchoBody(BaseModel):
    model: str | None = None
    mode: str = "fast"
    series: list[EchoSeries]


def echo_naive_app() -> Any:
    from fastapi import FastAPI

    app = FastAPI()
    horizon = int(os.environ.get("ECHO_HORIZON", "96"))

    @app.post(FAST_ROUTE)
    def echo(body: EchoBody) -> dict[str, Any]:
        s = body.series[0]
        return {"model": body.model, "forecasts": [{"id": s.id, "values": s.values[-horizon:]}]}

    return app


def echo_min_app() -> Any:
    import orjson

    horizon = int(os.environ.get("ECHO_HORIZON", "96"))
    headers = [(b"content-type", b"application/json")]

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["method"] != "POST":  # the readiness probe
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": b"{}"})
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        obj = orjson.loads(b"".join(chunks))
        s = obj["series"][0]
        values = np.array(s["values"], dtype=np.float32)
        if values.ndim != 2 or not np.isfinite(values).all():
            status, body = 422, b'{"error":"bad values"}'
        else:
            status = 200
            body = orjson.dumps(
                {
                    "model": obj.get("model"),
                    "forecasts": [{"id": s["id"], "values": values[-horizon:]}],
                },
                option=orjson.OPT_SERIALIZE_NUMPY,
            )
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


def serve(kind: str, port: int) -> None:
    import uvicorn

    app = echo_naive_app() if kind == "echo_naive" else echo_min_app()
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


# -- bodies ----------------------------------------------------------------------------------------


def etth1_rows(n: int) -> np.ndarray:
    path = ROOT / "data" / "ETTh1.csv"
    data = np.loadtxt(path, delimiter=",", skiprows=1, usecols=range(1, 1 + CHANNELS))
    return data[-n:].astype(np.float64)


def registry_model(registry: Path, model: str) -> tuple[int, int, bytes]:
    sys.path.insert(0, str(ROOT))
    from models_registry.store import FilesystemStore

    store = FilesystemStore(registry)
    name, version = store.resolve(model)
    m = store.manifest(name, version)
    return m.lookback, m.horizon, store.onnx_bytes(name, version)


def bodies(model: str, lookback: int, out: Path) -> tuple[dict[str, Path], np.ndarray]:
    import msgspec
    import orjson

    rows = etth1_rows(lookback + BATCH_SERIES)
    window = rows[-lookback:].round(4)
    one = {"id": "s0", "values": window.tolist()}
    paths = {}
    for mode in ("fast", "accurate"):
        p = out / f"{mode}.json"
        p.write_bytes(orjson.dumps({"model": model, "mode": mode, "series": [one]}))
        paths[mode] = p
    # 1000 overlapping windows of real data, columnar form.
    windows = np.stack([rows[i : i + lookback] for i in range(BATCH_SERIES)]).round(4)
    p = out / "batch.json"
    p.write_bytes(
        orjson.dumps(
            {
                "model": model,
                "mode": "fast",
                "ids": [f"s{i}" for i in range(BATCH_SERIES)],
                "sizes": [lookback] * BATCH_SERIES,
                "n_channels": CHANNELS,
                "values": windows.reshape(-1).tolist(),
            }
        )
    )
    paths["batch"] = p
    # The same batch as msgpack, the values as one float32 bin (no number parsing).
    p = out / "batch.msgpack"
    p.write_bytes(
        msgspec.msgpack.encode(
            {
                "model": model,
                "mode": "fast",
                "ids": [f"s{i}" for i in range(BATCH_SERIES)],
                "sizes": [lookback] * BATCH_SERIES,
                "n_channels": CHANNELS,
                "values": windows.astype("<f4").tobytes(),
            }
        )
    )
    paths["batch_msgpack"] = p
    paths["batch_arrow"] = arrow_body(windows, out)
    return paths, windows.astype(np.float32)


ARROW = "application/vnd.apache.arrow.stream"


def arrow_body(windows: np.ndarray, out: Path) -> Path:
    """The batch as the client sends many series: an Arrow IPC stream in long form (one row per
    series and time step: unique_id, then one float32 column per channel)."""
    import pyarrow as pa

    n, lookback, c = windows.shape
    flat = windows.astype(np.float32).reshape(n * lookback, c)
    cols = {"unique_id": pa.array(np.repeat([f"s{i}" for i in range(n)], lookback))}
    for j in range(c):
        cols[f"c{j}"] = pa.array(np.ascontiguousarray(flat[:, j]))
    table = pa.table(cols)
    p = out / "batch.arrow"
    with pa.OSFile(str(p), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return p


# -- servers ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except urllib.error.HTTPError:
            if not url.endswith("/readyz"):
                return  # the echo apps have no health route: any answer means they are up
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server at {url} did not become ready")


class Server:
    def __init__(self, cmd: list[str], env: dict[str, str], ready_url: str) -> None:
        self.proc = subprocess.Popen(cmd, env=env, cwd=ROOT, start_new_session=True)
        try:
            wait_ready(ready_url)
        except Exception:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def pinned(core: int, cmd: list[str]) -> list[str]:
    """`cmd` on CPU `core` (a negative core: unpinned)."""
    return ["taskset", "-c", str(core), *cmd] if core >= 0 and shutil.which("taskset") else cmd


# -- load generation -------------------------------------------------------------------------------

WRK_LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = os.getenv("BENCH_CTYPE")
wrk.headers["Accept"] = os.getenv("BENCH_CTYPE")
local f = io.open(os.getenv("BENCH_BODY"), "rb"); wrk.body = f:read("*a"); f:close()
done = function(summary, latency, requests)
  io.write(string.format("BENCH p50_us=%f p99_us=%f\\n",
    latency:percentile(50), latency:percentile(99)))
end
"""


def ctype(body: Path) -> str:
    if body.suffix == ".arrow":
        return ARROW
    return "application/msgpack" if body.suffix == ".msgpack" else "application/json"


def check_once(url: str, body: Path) -> None:
    import msgspec

    headers = {"Content-Type": ctype(body), "Accept": ctype(body)}
    req = urllib.request.Request(url, data=body.read_bytes(), headers=headers)
    with urllib.request.urlopen(req, timeout=120) as r:
        raw = r.read()
    if body.suffix == ".arrow":
        import pyarrow as pa

        meta = pa.ipc.open_stream(raw).schema.metadata or {}
        if json.loads(meta.get(b"failures", b"[]")):
            raise RuntimeError(f"{url}: {meta[b'failures'][:300]!r}")
        return
    payload = msgspec.msgpack.decode(raw) if body.suffix == ".msgpack" else json.loads(raw)
    errors = [f["error"] for f in payload.get("forecasts", []) if "error" in f]
    if "error" in payload or errors:
        raise RuntimeError(f"{url}: {payload.get('error') or errors[0]}")


def run_wrk(
    url: str, body: Path, conc: int, duration: float, core: int, lua: Path
) -> dict[str, float]:
    env = {**os.environ, "BENCH_BODY": str(body), "BENCH_CTYPE": ctype(body)}
    cmd = pinned(
        core,
        [
            "wrk",
            "-t1",
            f"-c{conc}",
            f"-d{max(1, int(duration))}s",
            "--timeout",
            "30s",
            "-s",
            str(lua),
            url,
        ],
    )
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    m = re.search(r"BENCH p50_us=([\d.]+) p99_us=([\d.]+)", out)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m is None or rps is None:
        raise RuntimeError(f"cannot parse wrk output:\n{out}")
    if bad is not None:
        raise RuntimeError(f"{url}: {bad.group(1)} error responses under load:\n{out}")
    return {
        "p50_ms": float(m.group(1)) / 1000,
        "p99_ms": float(m.group(2)) / 1000,
        "rps": float(rps.group(1)),
    }


async def _client(host: str, port: int, request: bytes, stop: float, lat: list[float]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            m = re.search(rb"content-length: *(\d+)", head, re.I)
            if m is None or not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"bad response: {head[:200]!r}")
            await reader.readexactly(int(m.group(1)))
            lat.append(time.perf_counter() - t0)
    finally:
        writer.close()


def run_asyncio_client(url: str, body: Path, conc: int, duration: float) -> dict[str, float]:
    """Fallback load generator (a process of its own, pinned by the caller)."""
    m = re.match(r"http://([^:/]+):(\d+)(/.*)", url)
    assert m is not None
    host, port, path = m.group(1), int(m.group(2)), m.group(3)
    payload = body.read_bytes()
    request = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {ctype(body)}\r\n"
        f"Accept: {ctype(body)}\r\nContent-Length: {len(payload)}\r\n\r\n"
    ).encode() + payload
    lat: list[float] = []

    async def main() -> None:
        stop = time.perf_counter() + duration
        await asyncio.gather(*(_client(host, port, request, stop, lat) for _ in range(conc)))

    t0 = time.perf_counter()
    asyncio.run(main())
    elapsed = time.perf_counter() - t0
    ms = np.array(lat) * 1000
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "rps": len(lat) / elapsed,
    }


def measure(
    url: str, body: Path, conc: int, duration: float, warmup: float, core: int, lua: Path
) -> dict[str, float]:
    check_once(url, body)
    if shutil.which("wrk"):
        run_wrk(url, body, conc, warmup, core, lua)
        # wrk stops mid-request: the server still works through the warm-up's last requests
        # (seconds of decoding for 8 x 50 MB batch bodies), which would land in the measured
        # window. One request of our own waits behind them.
        check_once(url, body)
        return run_wrk(url, body, conc, duration, core, lua)
    cmd = pinned(
        core, [sys.executable, __file__, "client", url, str(body), str(conc), str(duration)]
    )
    subprocess.run(cmd[:-1] + [str(warmup)], check=True, capture_output=True)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    result: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return result


def raw_ort(onnx_bytes: bytes, windows: np.ndarray, duration: float, core: int) -> dict[str, float]:
    """In-process session.run on the batch's windows, one thread on the server's core."""
    import onnxruntime as ort

    if hasattr(os, "sched_setaffinity"):
        before = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {core})
    try:
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        sess = ort.InferenceSession(onnx_bytes, so, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        for _ in range(3):
            sess.run(None, {name: windows})
        times: list[float] = []
        stop = time.perf_counter() + duration
        while time.perf_counter() < stop or len(times) < 5:
            t0 = time.perf_counter()
            sess.run(None, {name: windows})
            times.append(time.perf_counter() - t0)
    finally:
        if hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, before)
    ms = np.array(times) * 1000
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "rps": 1000.0 / statistics.mean(ms.tolist()),
    }


# -- the run ---------------------------------------------------------------------------------------


def record(case: str, conc: int, m: dict[str, float], series: int) -> dict[str, Any]:
    return {
        "case": case,
        "concurrency": conc,
        "p50_ms": round(m["p50_ms"], 4),
        "p99_ms": round(m["p99_ms"], 4),
        "rps": round(m["rps"], 2),
        "series_per_s": round(m["rps"] * series, 1),
    }


def rewrite_md(out: Path) -> None:
    """latency.md from latency.json as it now stands (the sub-commands that merge one record
    into the JSON call this, so the two never disagree)."""
    data = json.loads((out / "latency.json").read_text())
    if data.get("meta"):
        records = data["records"]
        write_md(out / "latency.md", [r for r in records if "case" in r],
                 [r for r in records if "ratio" in r], data["meta"])


def write_md(
    path: Path, records: list[dict[str, Any]], ratios: list[dict[str, Any]], meta: dict[str, Any]
) -> None:
    lines = [
        "# Service latency",
        "",
        f"Model `{meta['model']}` from `{meta['registry']}`; body: one series "
        f"{meta['lookback']} x {CHANNELS} (batch: {BATCH_SERIES} series, columnar). Server on "
        f"core {meta['server_core']}, load generator ({meta['load_generator']}) on core "
        f"{meta['client_core']}; {meta['duration_s']} s per point; {meta['machine']}.",
        "",
        "| case | concurrency | p50 ms | p99 ms | req/s | series/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in records:
        lines.append(
            f"| {r['case']} | {r['concurrency']} | {r['p50_ms']:.3f} | "
            f"{r['p99_ms']:.3f} | {r['rps']:.1f} | {r['series_per_s']:.0f} |"
        )
    lines += ["", "| ratio | concurrency | value | target |", "| --- | ---: | ---: | --- |"]
    targets = {
        "fast/echo_min": "<= 1.5",
        "raw_ort_1/echo_min": "(informative: the model's share; fast/echo_min >= ~1 + this)",
        "fast_rps/echo_naive_rps": ">= 2.5 (at 8)",
        "batch/raw_ort": ">= 0.7",
        "batch_msgpack/raw_ort": "(informative)",
        "batch_arrow/raw_ort": ">= 0.8",
    }
    for r in ratios:
        lines.append(
            f"| {r['ratio']} | {r.get('concurrency', '')} | {r['value']:.3f} | "
            f"{targets.get(r['ratio'], '')} |"
        )
    lines += [
        "",
        "Reproduce: `python bench/latency.py --registry "
        f"{meta['registry']} --model {meta['model']}`",
        "",
    ]
    path.write_text("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--registry", type=Path, default=ROOT / "var" / "registry")
    p.add_argument("--model", default="etth1-h96")
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    p.add_argument("--server-core", type=int, default=0)
    p.add_argument("--client-core", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument(
        "--cases",
        nargs="+",
        default=["echo_naive", "echo_min", "fast", "accurate", "batch", "batch_msgpack",
                 "batch_arrow", "raw_ort", "raw_ort_1"],
    )
    args = p.parse_args()

    lookback, horizon, student_onnx = registry_model(args.registry, args.model)
    tmp = Path(tempfile.mkdtemp(prefix="latency-"))
    lua = tmp / "post.lua"
    lua.write_text(WRK_LUA)
    paths, windows = bodies(args.model, lookback, tmp)
    results: dict[tuple[str, int], dict[str, Any]] = {}
    records: list[dict[str, Any]] = []
    py = sys.executable

    def bench_server(
        case_urls: dict[str, tuple[str, Path, int]], cmd: list[str], env: dict[str, str], ready: str
    ) -> None:
        server = Server(pinned(args.server_core, cmd), env, ready)
        try:
            for case, (url, body, series) in case_urls.items():
                for conc in args.concurrency:
                    m = measure(url, body, conc, args.duration, args.warmup, args.client_core, lua)
                    rec = record(case, conc, m, series)
                    results[(case, conc)] = rec
                    records.append(rec)
                    print(json.dumps(rec), flush=True)
        finally:
            server.stop()

    base_env = {**os.environ, "ECHO_HORIZON": str(horizon), "PYTHONPATH": str(ROOT)}
    for echo in ("echo_naive", "echo_min"):
        if echo in args.cases:
            port = free_port()
            url = f"http://127.0.0.1:{port}{FAST_ROUTE}"
            bench_server(
                {echo: (url, paths["fast"], 1)},
                [py, __file__, "serve", echo, str(port)],
                base_env,
                _probe(url),
            )
    service_cases = [c for c in ("fast", "accurate", "batch", "batch_msgpack", "batch_arrow")
                     if c in args.cases]
    if service_cases:
        port = free_port()
        env = {
            **base_env,
            "DISTILCAST_REGISTRY_ROOT": str(args.registry),
            "DISTILCAST_SHADOW_FRACTION": "0",
            # Eight concurrent 1000-series bodies (~17 MB each) exceed the default admission
            # budget (64 MiB in flight); raise it so the batch case measures throughput, not 503s.
            "DISTILCAST_MAX_IN_FLIGHT_BYTES": str(512 * 1024 * 1024),
            "DISTILCAST_DEFAULT_MODEL": args.model,
        }
        env.pop("DISTILCAST_REDIS_URL", None)
        urls = {
            "fast": (f"http://127.0.0.1:{port}/v1/forecast", paths["fast"], 1),
            "accurate": (f"http://127.0.0.1:{port}/v1/forecast", paths["accurate"], 1),
            "batch": (f"http://127.0.0.1:{port}/v1/forecast/batch", paths["batch"], BATCH_SERIES),
            "batch_msgpack": (
                f"http://127.0.0.1:{port}/v1/forecast/batch",
                paths["batch_msgpack"],
                BATCH_SERIES,
            ),
            "batch_arrow": (
                f"http://127.0.0.1:{port}/v1/forecast/batch?model={args.model}&mode=fast",
                paths["batch_arrow"],
                BATCH_SERIES,
            ),
        }
        bench_server(
            {c: urls[c] for c in service_cases},
            [
                py,
                "-m",
                "uvicorn",
                "service.app:app_factory",
                "--factory",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--log-level",
                "warning",
                "--no-access-log",
            ],
            env,
            f"http://127.0.0.1:{port}/readyz",
        )
    if "raw_ort" in args.cases:
        m = raw_ort(student_onnx, windows, args.duration, args.server_core)
        rec = record("raw_ort", 1, m, BATCH_SERIES)
        results[("raw_ort", 1)] = rec
        records.append(rec)
        print(json.dumps(rec), flush=True)

    if "raw_ort_1" in args.cases:
        m = raw_ort(student_onnx, windows[-1:], args.duration, args.server_core)
        rec = record("raw_ort_1", 1, m, 1)
        results[("raw_ort_1", 1)] = rec
        records.append(rec)
        print(json.dumps(rec), flush=True)

    ratios: list[dict[str, Any]] = []
    one, emin1 = results.get(("raw_ort_1", 1)), results.get(("echo_min", 1))
    if one and emin1:
        ratios.append({"ratio": "raw_ort_1/echo_min", "concurrency": 1,
                       "value": round(one["p50_ms"] / emin1["p50_ms"], 3)})
    for conc in args.concurrency:
        fast, emin, naive = (results.get((c, conc)) for c in ("fast", "echo_min", "echo_naive"))
        if fast and emin:
            ratios.append(
                {
                    "ratio": "fast/echo_min",
                    "concurrency": conc,
                    "value": round(fast["p50_ms"] / emin["p50_ms"], 3),
                }
            )
        if fast and naive:
            ratios.append(
                {
                    "ratio": "fast_rps/echo_naive_rps",
                    "concurrency": conc,
                    "value": round(fast["rps"] / naive["rps"], 3),
                }
            )
        ort_rec = results.get(("raw_ort", 1))
        for case in ("batch", "batch_msgpack", "batch_arrow"):
            batch = results.get((case, conc))
            if batch and ort_rec:
                ratios.append(
                    {
                        "ratio": f"{case}/raw_ort",
                        "concurrency": conc,
                        "value": round(batch["series_per_s"] / ort_rec["series_per_s"], 3),
                    }
                )
    meta = {
        "model": args.model,
        "registry": str(args.registry),
        "lookback": lookback,
        "horizon": horizon,
        "server_core": args.server_core,
        "client_core": args.client_core,
        "duration_s": args.duration,
        "load_generator": "wrk" if shutil.which("wrk") else "asyncio client",
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, {platform.python_version()}",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "latency.json"
    # Records this run did not measure (`latency.py workers`' workers2/workers1, or cases and
    # concurrencies left out of --cases/--concurrency) are kept from the previous file.
    def key(r: dict[str, Any]) -> tuple[str, Any]:
        return r.get("case") or r.get("ratio") or "", r.get("concurrency")

    measured = {key(r) for r in records + ratios}
    previous = json.loads(out.read_text()) if out.exists() else {}
    kept = [r for r in previous.get("records", []) if key(r) not in measured]
    if previous.get("meta", meta) != meta:
        # Measured on another setup (model, registry, machine): each kept record says which.
        kept = [{**r, "meta": r.get("meta", previous["meta"])} for r in kept]
    out.write_text(
        json.dumps({"meta": meta, "records": records + ratios + kept}, indent=2) + "\n"
    )
    write_md(args.out / "latency.md", records + [r for r in kept if "case" in r],
             ratios + [r for r in kept if "ratio" in r], meta)
    for r in ratios:
        print(json.dumps(r))
    shutil.rmtree(tmp, ignore_errors=True)


def _probe(url: str) -> str:
    # The echo apps have no health route: any answer from the port means it is up.
    return url.rsplit("/v1/", 1)[0] + "/"


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        serve(sys.argv[2], int(sys.argv[3]))
    elif len(sys.argv) > 1 and sys.argv[1] == "arrow":
        import latency_arrow  # bench/, beside this file

        latency_arrow.main(sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "fast":
        import latency_fast  # bench/, beside this file

        latency_fast.main(sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "workers":
        import latency_workers  # bench/, beside this file

        latency_workers.main(sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "client":
        url, body, conc, duration = sys.argv[2:6]
        print(json.dumps(run_asyncio_client(url, Path(body), int(conc), float(duration))))
    else:
        main()
