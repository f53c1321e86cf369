"""What the reliability scenarios share: the service as a real process, a load generator, figures.

* `ServiceProcess` starts `scripts/launch_service.sh` (uvicorn, Prometheus multiprocess mode,
  graceful SIGTERM) on a free loopback port with `DISTILCAST_*` settings, logs to a file, and
  reads the serving process's RSS from /proc.
* `Load` sends HTTP requests from an asyncio loop in a background thread, closed loop (N workers)
  or open loop (a fixed rate), and records one `Outcome` per request, with what went wrong
  classified (refused, unsent, lost, truncated, invalid, timeout, ...) and whether any byte of
  the request was written on its connection.
* `summarise` sorts every outcome into `answered`, `refused_503`, `refused_connect` or `failed`
  (what a scenario allows is its `Judge`) and lists any failure as a problem.
* `Lengths` holds every duration and count, so the CI tests and `bench/reliability.py` run the
  same code, short and full length.

Everything binds 127.0.0.1 only; load is bounded in time, rate and concurrency.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "scripts" / "launch_service.sh"
TOKEN = "reliability-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


# -- lengths ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lengths:
    """Durations (seconds) and counts of every scenario: `SHORT` in CI, `FULL` in the bench."""

    name: str
    redis_outage_s: float
    redis_settle_s: float
    promotions: int
    promotion_interval_s: float
    overload_capacity_s: float
    overload_s: float
    overload_recovery_s: float
    shutdown_load_s: float
    fuzz_examples: int  # per operation and generation mode (positive, negative)
    load_workers: int = 4
    redis_frozen_s: float = 10.0
    slowloris_s: float = 20.0  # each half: without, then with the slow connections
    slowloris_connections: int = 200
    head_timeout_s: float = 10.0  # DISTILCAST_HEAD_TIMEOUT_S in the slowloris scenario


FULL = Lengths("full", redis_outage_s=10.0, redis_settle_s=3.0, promotions=10,
               promotion_interval_s=2.0, overload_capacity_s=6.0, overload_s=20.0,
               overload_recovery_s=8.0, shutdown_load_s=3.0, fuzz_examples=150)
SHORT = Lengths("short", redis_outage_s=2.5, redis_settle_s=1.0, promotions=3,
                promotion_interval_s=0.7, overload_capacity_s=2.5, overload_s=4.0,
                overload_recovery_s=2.5, shutdown_load_s=1.0, fuzz_examples=40,
                redis_frozen_s=3.0, slowloris_s=6.0, head_timeout_s=2.0)


# -- small helpers ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.05,
               what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout} s")
        time.sleep(interval)


def rss_mb(pid: int) -> float:
    """Resident set size of one process, in MiB (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0.0


def children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(FileNotFoundError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError):
                out += [int(c) for c in (task / "children").read_text().split()]
    return out


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` (0 when there is none)."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, rest = head.partition("{")
        if metric != name:
            continue
        if all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += float(value)
    return total


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = max(0, math.ceil(q / 100.0 * len(ordered)) - 1)
    return ordered[k]


# -- the service as a process ----------------------------------------------------------------------


class ServiceProcess:
    """`scripts/launch_service.sh` on a free loopback port; stdout+stderr go to `log_path`."""

    def __init__(self, workdir: Path, registry_root: Path, *, workers: int = 1,
                 graceful_s: float | None = None, **settings: Any) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / f"service-{self.port}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILCAST_")}
        env.update({
            "PORT": str(self.port), "HOST": "127.0.0.1", "WORKERS": str(workers),
            "PYTHON": sys.executable,
            "PROMETHEUS_MULTIPROC_DIR": str(workdir / f"prom-{self.port}"),
            "DISTILCAST_REGISTRY_ROOT": str(registry_root),
            "DISTILCAST_ADMIN_TOKEN": TOKEN,
            "DISTILCAST_SHADOW_FRACTION": "0",
            "DISTILCAST_PROVIDERS": '["CPUExecutionProvider"]',
            "PYTHONUNBUFFERED": "1",
        })
        if graceful_s is not None:
            env["UVICORN_ARGS"] = f"--timeout-graceful-shutdown {graceful_s:g}"
        for key, value in settings.items():
            env[f"DISTILCAST_{key.upper()}"] = (
                value if isinstance(value, str) else str(value).lower()
                if isinstance(value, bool) else str(value)
            )
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    def start(self, timeout: float = 90.0) -> ServiceProcess:
        self._log = open(self.log_path, "ab")  # noqa: SIM115  # closed in stop()
        self.proc = subprocess.Popen(["bash", str(LAUNCH)], env=self.env, cwd=REPO,
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited ({self.proc.returncode}):\n{self.log()}")
            try:
                return httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, timeout, interval=0.2, what="service ready")
        return self

    @property
    def server_pids(self) -> list[int]:
        """The uvicorn process (and its workers when there are several)."""
        if self.proc is None:
            return []
        out, todo = [], children(self.proc.pid)
        while todo:
            pid = todo.pop()
            out.append(pid)
            todo += children(pid)
        return out

    def rss_mb(self) -> float:
        return sum(rss_mb(p) for p in self.server_pids)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def client(self, **kw: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, **{"timeout": 30.0, **kw})

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=10).text

    def terminate(self) -> None:
        """SIGTERM to the launch script (it forwards to uvicorn), as a container stop does."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> ServiceProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- load generation -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    body: bytes | None = None
    headers: Mapping[str, str] | None = None
    tag: str = "forecast"


@dataclass(slots=True)
class Outcome:
    tag: str
    sent: float
    done: float
    status: int | None = None
    error: str | None = None  # why there is no complete answer, None when there is one
    retry_after: str | None = None
    version: int | None = None
    values: Any = None
    detail: str = ""
    written: bool = False  # some bytes of the request were handed to its connection
    @property
    def ms(self) -> float:
        return (self.done - self.sent) * 1000.0


class Failed(Exception):
    """A request without a complete answer. `kind`:

    * refused: the connection could not be opened (nothing was sent);
    * unsent: the connection was found closed before any byte of the request was written on it;
    * lost: the request was written, and the connection closed (or was reset) before any byte of
      an answer: the server may or may not have read it, so it is a lost request, never clean;
    * truncated: an answer cut short; timeout: no complete answer in time; other.

    `written` says whether any byte of the request was handed to the connection."""

    def __init__(self, kind: str, detail: str, written: bool) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail
        self.written = written


@dataclass(slots=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass(slots=True)
class _Progress:
    written: bool = False


def peer_closed(writer: asyncio.StreamWriter) -> bool:
    """Whether the peer has closed (or reset) this connection, asked of the socket itself: a
    non-blocking MSG_PEEK reads the FIN (b"") or the reset without consuming anything. Unread
    bytes nobody asked for also make the connection unusable."""
    transport_socket = writer.get_extra_info("socket")
    if transport_socket is None or writer.is_closing():
        return True
    try:
        with socket.socket(fileno=os.dup(transport_socket.fileno())) as sock:
            sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return False  # open, and nothing to read: the peer has not closed it
    except OSError:
        return True
    return True


class RawClient:
    """A lean HTTP/1.1 client on asyncio streams, with a keep-alive pool.

    httpx's pool costs milliseconds of CPU per request once hundreds of connections are open,
    which on two shared cores makes the generator, not the service, the bottleneck. This client
    costs tens of microseconds and reports exactly how an answer failed."""

    # uvicorn closes a keep-alive connection after 5 s idle; reusing one just as it does is a
    # client race (every client retries it), not a server failure: expire them earlier.
    IDLE_EXPIRY_S = 2.0

    def __init__(self, url: str, timeout: float) -> None:
        host, _, port = url.removeprefix("http://").partition(":")
        self.host, self.port = host, int(port)
        self.timeout = timeout
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []

    def _reusable(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        now = time.monotonic()
        while self._idle:
            reader, writer, since = self._idle.pop()
            if (now - since < self.IDLE_EXPIRY_S and not reader.at_eof()
                    and not peer_closed(writer)):
                return reader, writer
            writer.close()  # closed while idle: nothing of the next request goes there
        return None

    async def request(self, method: str, path: str, body: bytes | None,
                      headers: Mapping[str, str] | None) -> Answer:
        progress = _Progress()
        try:
            async with asyncio.timeout(self.timeout):
                return await self._request(method, path, body or b"", headers or {}, progress)
        except TimeoutError:
            raise Failed("timeout", f"no complete answer within {self.timeout} s",
                         progress.written) from None

    async def _request(self, method: str, path: str, body: bytes,
                       headers: Mapping[str, str], progress: _Progress) -> Answer:
        idle = self._reusable()
        if idle is not None:
            reader, writer = idle
        else:
            try:
                reader, writer = await asyncio.open_connection(self.host, self.port)
            except OSError as exc:
                raise Failed("refused", f"{type(exc).__name__}: {exc}", False) from None
            if peer_closed(writer):
                writer.close()
                raise Failed("unsent", "the new connection was closed before the request was "
                             "written", False)
        head = [f"{method} {path} HTTP/1.1", f"host: {self.host}:{self.port}",
                f"content-length: {len(body)}"]
        head += [f"{k}: {v}" for k, v in headers.items()]
        got_bytes = False
        try:
            # From here on the request counts as sent: a closure before any answer is a loss.
            progress.written = True
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
            await writer.drain()
            line = await reader.readline()
            if not line:
                raise Failed("lost", "closed after the request was written, before any answer",
                             True)
            got_bytes = True
            status = int(line.split()[1])
            answer_headers: dict[str, str] = {}
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b"\n"):
                    break
                if not line:
                    raise Failed("truncated", "closed inside the headers", True)
                key, _, value = line.decode("latin-1").partition(":")
                answer_headers[key.strip().lower()] = value.strip()
            if answer_headers.get("transfer-encoding") == "chunked":
                data = await self._chunked(reader)
            else:
                data = await reader.readexactly(int(answer_headers.get("content-length", "0")))
        except asyncio.IncompleteReadError as exc:
            writer.close()
            raise Failed("truncated", f"{len(exc.partial)} of {exc.expected} body bytes", True
                         ) from None
        except (ConnectionError, OSError) as exc:
            writer.close()
            kind = "truncated" if got_bytes else "lost"
            raise Failed(kind, f"{type(exc).__name__}: {exc}", True) from None
        except Failed:
            writer.close()
            raise
        if answer_headers.get("connection", "").lower() == "close":
            writer.close()
        else:
            self._idle.append((reader, writer, time.monotonic()))
        return Answer(status, answer_headers, data)

    @staticmethod
    async def _chunked(reader: asyncio.StreamReader) -> bytes:
        parts = []
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                await reader.readline()
                return b"".join(parts)
            parts.append(await reader.readexactly(size))
            await reader.readline()

    def close(self) -> None:
        for _, writer, _ in self._idle:
            writer.close()
        self._idle.clear()


def _invalid(outcome: Outcome, answer: Answer, why: str) -> None:
    outcome.error = "invalid"
    outcome.detail = f"{why}: {answer.body[:160].decode(errors='replace')}"


def parse_forecast(outcome: Outcome, answer: Answer) -> None:
    """Fill version and the first series' values from a forecast answer (only those: keeping
    every answer's arrays would make the generator's own GC pauses bunch its requests). A 200
    whose body is not a forecast (not JSON, no integer version, no forecast values) is
    `invalid`."""
    if answer.status != 200:
        return
    try:
        data = answer.json()
    except ValueError:
        _invalid(outcome, answer, "not JSON")
        return
    forecasts = data.get("forecasts") if isinstance(data, dict) else None
    first = forecasts[0] if isinstance(forecasts, list) and forecasts else None
    if not (isinstance(data, dict) and isinstance(data.get("version"), int)
            and isinstance(first, dict) and isinstance(first.get("values"), list)
            and first["values"]):
        _invalid(outcome, answer, "not a forecast")
        return
    outcome.version = data["version"]
    outcome.values = [first["values"]]


def parse_object(outcome: Outcome, answer: Answer) -> None:
    """A 200 must be one JSON object."""
    if answer.status != 200:
        return
    try:
        data = answer.json()
    except ValueError:
        _invalid(outcome, answer, "not JSON")
        return
    if not isinstance(data, dict):
        _invalid(outcome, answer, "not a JSON object")


def parse_length(outcome: Outcome, answer: Answer) -> None:
    """For big answers: a 200 must be whole JSON, checked without building its objects."""
    if answer.status == 200 and not (answer.body.startswith(b"{")
                                     and answer.body.rstrip().endswith(b"}")):
        _invalid(outcome, answer, "not a whole JSON object")


class Load:
    """Requests from a background asyncio loop: closed loop (`workers` each sending one request
    after the other, optionally pausing `think_s`) or open loop (`rate` requests per second,
    at most `max_outstanding` at once; beyond that a request is counted `not_sent`)."""

    def __init__(self, url: str, make: Callable[[int], Request], *, workers: int = 0,
                 rate: float = 0.0, timeout: float = 10.0, think_s: float = 0.0,
                 max_outstanding: int = 1024,
                 parse: Callable[[Outcome, Answer], None] = parse_forecast) -> None:
        assert (workers > 0) != (rate > 0), "closed loop (workers) or open loop (rate)"
        self.url = url
        self.make = make
        self.workers = workers
        self.rate = rate
        self.timeout = timeout
        self.think_s = think_s
        self.max_outstanding = max_outstanding
        self.parse = parse
        self.outcomes: list[Outcome] = []
        self.not_sent = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._count = 0
        self.started = 0.0
        self.stopped = 0.0

    def start(self) -> Load:
        self.started = time.monotonic()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True,
                                        name="load")
        self._thread.start()
        return self

    def stop(self) -> list[Outcome]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout + 30)
        self.stopped = time.monotonic()
        return self.outcomes

    def run_for(self, seconds: float) -> list[Outcome]:
        self.start()
        time.sleep(seconds)
        return self.stop()

    def _next(self) -> Request:
        i = self._count
        self._count += 1
        return self.make(i)

    async def _one(self, client: RawClient, req: Request) -> None:
        out = Outcome(req.tag, time.monotonic(), 0.0)
        try:
            answer = await client.request(req.method, req.path, req.body, req.headers)
            out.written = True
            out.status = answer.status
            out.retry_after = answer.headers.get("retry-after")
            self.parse(out, answer)
            if out.status >= 400 and out.error is None:
                out.detail = answer.body[:200].decode(errors="replace")
        except Failed as exc:
            out.error, out.detail, out.written = exc.kind, exc.detail, exc.written
        except Exception as exc:  # every failure is a figure, never a crash of the generator
            out.error, out.detail = "other", f"{type(exc).__name__}: {exc}"
        out.done = time.monotonic()
        self.outcomes.append(out)

    async def _main(self) -> None:
        client = RawClient(self.url, self.timeout)
        try:
            if self.workers:
                await asyncio.gather(*(self._worker(RawClient(self.url, self.timeout))
                                       for _ in range(self.workers)))
            else:
                await self._open_loop(client)
        finally:
            client.close()

    async def _worker(self, client: RawClient) -> None:
        try:
            while not self._stop.is_set():
                await self._one(client, self._next())
                if self.think_s:
                    await asyncio.sleep(self.think_s)
                elif self.outcomes[-1].status is None:
                    await asyncio.sleep(0.01)  # refused: do not spin on a closed port
        finally:
            client.close()

    async def _open_loop(self, client: RawClient) -> None:
        tasks: set[asyncio.Task[None]] = set()
        t0 = time.monotonic()
        i = 0
        while not self._stop.is_set():
            due = t0 + i / self.rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            i += 1
            if len(tasks) >= self.max_outstanding:
                self.not_sent += 1
                continue
            task = asyncio.create_task(self._one(client, self._next()))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(tasks)


# -- figures ---------------------------------------------------------------------------------------


ANSWERED, REFUSED_503, REFUSED_CONNECT, FAILED = (
    "answered", "refused_503", "refused_connect", "failed")
CATEGORIES = (ANSWERED, REFUSED_503, REFUSED_CONNECT, FAILED)


def whole_200(o: Outcome) -> bool:
    return o.status == 200 and o.error is None


@dataclass(frozen=True)
class Judge:
    """What a scenario accepts of one outcome. `answer`: the expected answer (default: a 200
    whose body parsed); `allow_503`: a 503 with Retry-After is a clean refusal;
    `allow_connect`: a connection refused, or found closed before any byte of the request was
    written on it, is a clean refusal. Anything else is `failed`."""

    answer: Callable[[Outcome], bool] = whole_200
    allow_503: bool = False
    allow_connect: bool = False

    def __call__(self, o: Outcome) -> str:
        if o.error is None and o.status is not None and self.answer(o):
            return ANSWERED
        if self.allow_503 and o.status == 503 and o.error is None and o.retry_after:
            return REFUSED_503
        if (self.allow_connect and o.status is None and o.error in ("refused", "unsent")
                and not o.written):
            return REFUSED_CONNECT
        return FAILED


def outcome_label(o: Outcome) -> str:
    """A status code, or what went wrong (`200 invalid` for a 200 whose body was wrong)."""
    if o.status is None:
        return o.error or "none"
    return str(o.status) if o.error is None else f"{o.status} {o.error}"


def counts(outcomes: list[Outcome], judge: Callable[[Outcome], str]) -> dict[str, Any]:
    """requests, answered, refused_503, refused_connect, failed and the failures by kind."""
    by = Counter(judge(o) for o in outcomes)
    failed_kinds = Counter(outcome_label(o) for o in outcomes if judge(o) == FAILED)
    return {"requests": len(outcomes), **{c: by.get(c, 0) for c in CATEGORIES},
            "failures": dict(sorted(failed_kinds.items()))}


def summarise(scenario: str, outcomes: list[Outcome], *, problems: list[str],
              judge: Callable[[Outcome], str] = Judge(), rss_before: float | None = None,
              rss_after: float | None = None, **extra: Any) -> dict[str, Any]:
    """The record of one scenario: every outcome judged (`counts`), status codes, p50/p99/max
    latency of the answers. Any failed outcome is a problem: no scenario can forget it."""
    tally = counts(outcomes, judge)
    codes = Counter(outcome_label(o) for o in outcomes)
    answered = [o.ms for o in outcomes if o.status is not None and o.error is None]
    p50, p99 = percentile(answered, 50), percentile(answered, 99)
    samples = [f"{outcome_label(o)}: {o.detail[:160]}" for o in outcomes
               if judge(o) == FAILED][:5]
    if tally[FAILED]:
        problems = [*problems, f"{tally[FAILED]} failed outcomes: {tally['failures']}"]
        extra.setdefault("failure_samples", samples)
    return {
        "scenario": scenario,
        **tally,
        "status_codes": dict(sorted(codes.items())),
        "p50_ms": None if p50 is None else round(p50, 2),
        "p99_ms": None if p99 is None else round(p99, 2),
        "max_ms": round(max(answered), 2) if answered else None,
        "rss_before_mb": None if rss_before is None else round(rss_before, 1),
        "rss_after_mb": None if rss_after is None else round(rss_after, 1),
        **extra,
        "problems": problems,
    }


class RssSampler:
    """Samples a service's RSS every `interval` seconds in a thread; `peak` is the maximum."""

    def __init__(self, service: ServiceProcess, interval: float = 0.1) -> None:
        self.service = service
        self.interval = interval
        self.peak = 0.0
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss")

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = self.service.rss_mb()
            self.samples.append((time.monotonic(), rss))
            self.peak = max(self.peak, rss)
            self._stop.wait(self.interval)

    def between(self, start: float, end: float, points: int = 5) -> list[float]:
        """RSS at `points` evenly spaced instants of [start, end] (to show it levels off)."""
        out = []
        for i in range(points):
            t = start + (end - start) * i / (points - 1)
            before = [rss for at, rss in self.samples if at <= t] or [
                rss for _, rss in self.samples[:1]]
            out.append(round(before[-1], 1) if before else 0.0)
        return out

    @contextlib.contextmanager
    def running(self) -> Iterator[RssSampler]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join(timeout=5)


# -- a deliberately heavy model (overload and shutdown need requests that take time) -------------


def heavy_bytes(lookback: int, horizon: int, *, width: int = 1024, depth: int = 120,
                seed: int = 0) -> bytes:
    """Per-channel: x[B, L, C] -> [B, C, L] @ P -> `depth` x (@ Q, Q orthogonal) -> @ R -> y.

    About 2 * depth * width^2 FLOPs per series channel (120 x 1024^2 x 2 = 250 MFLOP): ~10 ms
    per channel on one core, while the rest of the request path (parse, encode) stays small. One
    orthogonal Q shared by every layer keeps the weights small and the values finite."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((width, width)))
    inits = [
        numpy_helper.from_array((rng.standard_normal((lookback, width)) / np.sqrt(lookback))
                                .astype(np.float32), "p"),
        numpy_helper.from_array(q.astype(np.float32), "q"),
        numpy_helper.from_array((rng.standard_normal((width, horizon)) / np.sqrt(width))
                                .astype(np.float32), "r"),
    ]
    nodes = [helper.make_node("Transpose", ["x"], ["h0"], perm=[0, 2, 1])]  # [B, C, L]
    nodes.append(helper.make_node("MatMul", ["h0", "p"], ["z0"]))  # [B, C, W]
    for i in range(depth):
        nodes.append(helper.make_node("MatMul", [f"z{i}", "q"], [f"z{i + 1}"]))  # [B, C, W]
    nodes.append(helper.make_node("MatMul", [f"z{depth}", "r"], ["o"]))  # [B, C, H]
    nodes.append(helper.make_node("Transpose", ["o"], ["y"], perm=[0, 2, 1]))  # [B, H, C]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", lookback, "channels"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", horizon, "channels"])
    graph = helper.make_graph(nodes, "heavy", [x], [y], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


# -- a small filesystem that can run full --------------------------------------------------------


@contextlib.contextmanager
def small_filesystem(path: Path, size_kb: int) -> Iterator[Path]:
    """A tmpfs of `size_kb` KiB mounted at `path` for the block (needs root, or CAP_SYS_ADMIN;
    `FileSystemUnavailable` otherwise), unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k,mode=0755", "tmpfs",
                           str(path)], capture_output=True, text=True)
    if made.returncode != 0:
        raise FileSystemUnavailable(f"cannot mount a tmpfs at {path}: {made.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


class FileSystemUnavailable(RuntimeError):
    """No small filesystem can be made here (not root, or mounts are not allowed)."""


def fill(path: Path) -> int:
    """Write a filler file in `path` until its filesystem is full; returns the bytes written."""
    written = 0
    chunk = b"\0" * 4096
    with open(path / "filler", "ab", buffering=0) as f:
        while True:
            try:
                written += f.write(chunk) or 0
            except OSError:
                break
    for size in (512, 64, 1):  # the last partial page too
        with open(path / "filler", "ab", buffering=0) as f:
            try:
                while True:
                    written += f.write(b"\0" * size) or 0
            except OSError:
                pass
    return written


@dataclass
class Timeline:
    """Named instants (monotonic seconds) of a scenario, reported relative to its start."""

    t0: float = field(default_factory=time.monotonic)
    marks: dict[str, float] = field(default_factory=dict)

    def mark(self, name: str) -> float:
        now = time.monotonic()
        self.marks[name] = now
        return now

    def relative(self) -> dict[str, float]:
        return {k: round(v - self.t0, 3) for k, v in self.marks.items()}
