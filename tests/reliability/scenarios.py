"""The reliability scenarios, each a function returning its record (see `harness.summarise`).

Every outcome is judged against what the scenario expects and counted as `answered` (the
expected answer, body checked), `refused_503` (503 + Retry-After, only where the scenario allows
a refusal), `refused_connect` (a connection refused or found closed before any byte of the
request was written, only after SIGTERM) or `failed` (everything else: 500s, other codes,
truncated or invalid bodies, lost requests, resets, timeouts). A record carries `problems`:
every expectation that did not hold, in words, any failed outcome included. The tests assert
`failed == 0` and no problem; `bench/reliability.py` runs the same functions at full length and
publishes the records.
Each scenario starts its own service process (scripts/launch_service.sh) on its own registry.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import redis

from models_registry.cache import RedisCache
from models_registry.errors import StorageFull
from models_registry.registry import Registry
from models_registry.store import FilesystemStore
from tests.reliability import hostile, security
from tests.reliability.harness import (
    AUTH,
    Answer,
    Judge,
    Lengths,
    Load,
    Outcome,
    Request,
    RssSampler,
    ServiceProcess,
    Timeline,
    counts,
    fill,
    heavy_bytes,
    metric_value,
    parse_forecast,
    parse_length,
    parse_object,
    percentile,
    small_filesystem,
    summarise,
    wait_until,
)
from tests.service.onnx_models import build_family, linear_bytes, manifest

NAME = "etth1-h96"
LOOKBACK, HORIZON = 32, 8
FORECAST = "/v1/forecast"
JSON = {"content-type": "application/json"}


# -- registries ------------------------------------------------------------------------------------


def family(root: Path, versions: int = 1) -> FilesystemStore:
    """The fixture family (student v1 = last value, teacher ensemble) plus student versions
    2..`versions`, version k forecasting k x the last value, so an answer proves its version."""
    store = FilesystemStore(root)
    build_family(store, NAME, LOOKBACK, HORIZON)
    for k in range(2, versions + 1):
        m = store.register(
            manifest(NAME, "student", LOOKBACK, HORIZON, architecture=f"{k}x-last"),
            linear_bytes(LOOKBACK, HORIZON, w_last=float(k)),
        )
        assert m.version == k
    return store


HEAVY_LOOKBACK, HEAVY_HORIZON, HEAVY_CHANNELS = 64, 16, 4


def heavy_family(root: Path, depth: int = 120) -> FilesystemStore:
    """A student that takes milliseconds to tens of milliseconds per request (overload and
    shutdown), depending on the machine and ``depth``."""
    store = FilesystemStore(root)
    build_family(store, NAME, HEAVY_LOOKBACK, HEAVY_HORIZON,
                 student=heavy_bytes(HEAVY_LOOKBACK, HEAVY_HORIZON, depth=depth))
    return store


def depth_for(target_ms: float, base_depth: int = 120, max_depth: int = 2400) -> int:
    """The heavy student's depth at which one request (HEAVY_CHANNELS channels, one ONNX Runtime
    thread) takes about ``target_ms`` on this machine: measured, so that the scenario means the
    same on a fast idle box and on a slow shared one."""
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(heavy_bytes(HEAVY_LOOKBACK, HEAVY_HORIZON, depth=base_depth),
                                   options, providers=["CPUExecutionProvider"])
    x = np.ones((1, HEAVY_LOOKBACK, HEAVY_CHANNELS), np.float32)
    session.run(None, {"x": x})
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        session.run(None, {"x": x})
        times.append(time.perf_counter() - t0)
    per_layer_ms = 1000 * sorted(times)[2] / base_depth
    return max(base_depth, min(max_depth, round(target_ms / per_layer_ms)))


def forecast_body(last: float = 7.0, channels: int = 1, lookback: int = LOOKBACK,
                  model: str = NAME) -> bytes:
    rows = [[float(t % 5) + c for c in range(channels)] for t in range(lookback - 1)]
    rows.append([last + c for c in range(channels)])
    return json.dumps({"model": model, "series": [{"id": "s", "values": rows}]}).encode()


def forecast_request(_: int) -> Request:
    return Request("POST", FORECAST, forecast_body(), JSON)


def consistent(o: Outcome, last: float = 7.0) -> bool:
    """The answer is what its stated version computes: version k forecasts k x the last value."""
    if o.version is None or not o.values:
        return False
    expected = [[o.version * last]] * HORIZON
    return bool(o.values[0] == expected)


def parse_mixed(o: Outcome, answer: Answer) -> None:
    """Forecasts are checked as forecasts, anything else (model reads, /readyz) as JSON."""
    (parse_forecast if o.tag == "forecast" else parse_object)(o, answer)


def expected_version(o: Outcome) -> bool:
    """A forecast's expected answer: whole, and computed by the version it names."""
    return o.tag != "forecast" or consistent(o)


def _problem(problems: list[str], ok: bool, message: str) -> None:
    if not ok:
        problems.append(message)


def _readyz(svc: ServiceProcess) -> dict[str, Any]:
    r = httpx.get(f"{svc.url}/readyz", timeout=5)
    return {**(r.json() if r.status_code == 200 else {}), "http": r.status_code}


def _serving(svc: ServiceProcess) -> int | None:
    r = httpx.get(f"{svc.url}/v1/models/{NAME}", timeout=5)
    return r.json()["serving"]["aliases"].get("production") if r.status_code == 200 else None


# -- 1. Redis killed and restarted under load ------------------------------------------------------


class ReadyProbe:
    """Polls /readyz every `interval` s from its own generator thread, recording each answer."""

    def __init__(self, svc: ServiceProcess, interval: float = 0.2) -> None:
        self.svc = svc
        self.interval = interval
        self.samples: list[tuple[float, dict[str, Any]]] = []
        self._load = Load(svc.url, lambda _: Request("GET", "/readyz", tag="readyz"), workers=1,
                          think_s=interval, timeout=5, parse=self._parse)

    def _parse(self, o: Outcome, r: Answer) -> None:
        parse_object(o, r)
        body = r.json() if r.status == 200 and o.error is None else {}
        self.samples.append((o.sent, {**body, "http": r.status}))

    def __enter__(self) -> ReadyProbe:
        self._load.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._load.stop()

    @property
    def outcomes(self) -> list[Outcome]:
        return self._load.outcomes


def redis_outage(workdir: Path, lengths: Lengths, redis_server: Any) -> dict[str, Any]:
    """Forecasts (and model reads) keep answering 200 while Redis is dead for
    `redis_outage_s`; after the restart the cache refills and a promotion made through a second
    registry instance reaches the service as a pub/sub event (well inside the 10 s resync)."""
    root = workdir / "registry"
    family(root, versions=2)
    prefix = f"rel-{uuid.uuid4().hex[:8]}:"
    problems: list[str] = []
    tl = Timeline()
    client = redis.Redis.from_url(redis_server.url, socket_connect_timeout=0.5)

    def keys(kind: str) -> list[bytes]:
        return list(client.scan_iter(f"{prefix}*:{kind}:{NAME}*"))

    def mixed(i: int) -> Request:
        if i % 10 == 9:  # reads the alias map through the cache on every call
            return Request("GET", f"/v1/models/{NAME}", tag="models")
        return forecast_request(i)

    with ServiceProcess(workdir, root, redis_url=redis_server.url, redis_prefix=prefix,
                        alias_refresh_s=0) as svc:
        _problem(problems, _readyz(svc).get("events") is True,
                 "the service is not listening to alias events at start")
        rss_before = svc.rss_mb()
        load = Load(svc.url, mixed, workers=lengths.load_workers, think_s=0.002,
                    parse=parse_mixed)
        with ReadyProbe(svc) as probe, RssSampler(svc).running() as rss:
            load.start()
            time.sleep(lengths.redis_settle_s)
            redis_server.stop()
            tl.mark("redis_killed")
            try:
                wait_until(lambda: _readyz(svc).get("cache_available") is False, 5,
                           what="the outage noticed")
                tl.mark("outage_noticed")
            except AssertionError as exc:
                problems.append(str(exc))
            time.sleep(max(0.0, lengths.redis_outage_s - (time.monotonic()
                                                         - tl.marks["redis_killed"])))
            redis_server.start()
            tl.mark("redis_restarted")
            try:
                wait_until(lambda: _readyz(svc).get("events") is True, 15,
                           what="alias events resubscribed")
                tl.mark("events_back")
                wait_until(lambda: keys("aliases"), 5, what="alias map cached again")
                tl.mark("cache_refilled")
            except AssertionError as exc:
                problems.append(str(exc))
            # Promote from elsewhere (another replica, the CLI): filesystem + Redis event.
            time.sleep(0.5)
            asyncio.run(_promote_elsewhere(root, redis_server.url, prefix, 2))
            tl.mark("promoted")
            try:
                wait_until(lambda: _serving(svc) == 2, 5, what="the promotion applied")
                tl.mark("swapped")
                wait_until(lambda: keys("onnx"), 5, what="the new version's bytes cached")
            except AssertionError as exc:
                problems.append(str(exc))
            time.sleep(lengths.redis_settle_s)
            outcomes = load.stop()
            metrics_text = svc.metrics()
        rss_after = svc.rss_mb()
    client.close()
    swap_s = (tl.marks["swapped"] - tl.marks["promoted"]) if "swapped" in tl.marks else None
    forecasts = [o for o in outcomes if o.tag == "forecast"]
    during = [o for o in outcomes if tl.marks["redis_killed"] <= o.sent
              <= tl.marks["redis_restarted"]]
    ready = [s for _, s in probe.samples]
    _problem(problems, len(during) > 0, "no request was sent during the outage")
    _problem(problems, all(consistent(o) for o in forecasts if o.status == 200),
             "an answer does not match its stated version")
    _problem(problems, all(s["http"] == 200 for s in ready) and probe.outcomes
             and all(o.error is None for o in probe.outcomes), "/readyz flapped")
    _problem(problems, any(s.get("cache_available") is False for s in ready),
             "/readyz never reported the cache down")
    _problem(problems, swap_s is not None and swap_s < 5.0,
             f"promotion took {swap_s} s to apply (pub/sub should be < 5 s; resync is 10 s)")
    _problem(problems, metric_value(metrics_text, "distilcast_registry_cache_available") == 1,
             "cache gauge not back to 1")
    after = [o.version for o in forecasts if "swapped" in tl.marks
             and o.sent > tl.marks["swapped"]]
    _problem(problems, bool(after) and set(after) == {2}, "answers after the swap not all v2")
    judge = Judge(expected_version)
    # The /readyz probe's answers are outcomes too: counted with the load's.
    return summarise(
        "redis_outage", outcomes + probe.outcomes, problems=problems, judge=judge,
        rss_before=rss_before, rss_after=rss_after,
        rss_peak_mb=round(rss.peak, 1), requests_during_outage=len(during),
        failed_during_outage=counts(during, judge)["failed"],
        outage_s=round(tl.marks["redis_restarted"] - tl.marks["redis_killed"], 2),
        events_back_after_restart_s=_since(tl, "redis_restarted", "events_back"),
        cache_refilled_after_restart_s=_since(tl, "redis_restarted", "cache_refilled"),
        promotion_to_swap_s=None if swap_s is None else round(swap_s, 3),
        readyz_samples=len(ready), readyz_not_200=sum(1 for s in ready if s["http"] != 200),
        versions_seen=dict(Counter(str(o.version) for o in forecasts)),
        timeline_s=tl.relative(),
    )


def _since(tl: Timeline, a: str, b: str) -> float | None:
    if a in tl.marks and b in tl.marks:
        return round(tl.marks[b] - tl.marks[a], 3)
    return None


async def _promote_elsewhere(root: Path, url: str, prefix: str, version: int) -> None:
    registry = Registry(FilesystemStore(root), RedisCache(url, prefix))
    try:
        await registry.promote(NAME, "production", version)
    finally:
        await registry.close()


# -- 2. Promotions under load ----------------------------------------------------------------------


def promotions(workdir: Path, lengths: Lengths) -> dict[str, Any]:
    """Promote production to v2, v3, ... under load. Every answer is 200 and computed by the
    version it names; ordered by completion, the version switches exactly at the promotions."""
    root = workdir / "registry"
    k = lengths.promotions
    family(root, versions=k + 1)
    problems: list[str] = []
    windows: list[tuple[float, float, int]] = []  # (PUT sent, PUT answered, version)
    with ServiceProcess(workdir, root, alias_refresh_s=0) as svc, svc.client() as c:
        rss_before = svc.rss_mb()
        load = Load(svc.url, forecast_request, workers=lengths.load_workers).start()
        time.sleep(lengths.promotion_interval_s)
        for version in range(2, k + 2):
            sent = time.monotonic()
            r = c.put(f"/v1/models/{NAME}/aliases/production", json={"version": version},
                      headers=AUTH)
            answered = time.monotonic()
            windows.append((sent, answered, version))
            ok = r.status_code == 200 and r.json().get("serving") == version
            _problem(problems, ok, f"promotion to {version}: {r.status_code} {r.text[:200]}")
            time.sleep(lengths.promotion_interval_s)
        outcomes = load.stop()
        rss_after = svc.rss_mb()
    check = check_switch_points(outcomes, windows)
    _problem(problems, all(consistent(o) for o in outcomes if o.status == 200),
             "an answer does not match its stated version (mixed model)")
    _problem(problems, check["outside_window"] == 0,
             f"{check['outside_window']} answers carry a version not live during the request")
    _problem(problems, check["regressions"] == 0,
             f"{check['regressions']} version regressions in completion order")
    _problem(problems, check["switches"] == k,
             f"{check['switches']} switch points between promotions, expected {k}")
    return summarise("promotions", outcomes, problems=problems, judge=Judge(consistent),
                     rss_before=rss_before, rss_after=rss_after,
                     promotions=k, promote_put_ms_max=round(max(
                         (b - a) * 1000 for a, b, _ in windows), 1),
                     **check)


def check_switch_points(outcomes: list[Outcome], windows: list[tuple[float, float, int]]
                        ) -> dict[str, Any]:
    """Versions against promotion windows [PUT sent, PUT answered] (the replica switches inside).

    * outside_window: answers whose version was not live at any instant of [sent, done];
    * in completion order, among answers that overlap no promotion window, `regressions`
      counts decreases and `switches` the changes (expected: one per promotion)."""
    first = windows[0][2] - 1 if windows else 1

    def live_range(sent: float, done: float) -> tuple[int, int]:
        lo = max([v for _, answered, v in windows if answered <= sent], default=first)
        hi = max([v for put, _, v in windows if put <= done], default=first)
        return lo, hi

    ok = [o for o in outcomes if o.status == 200 and o.version is not None]
    outside = 0
    for o in ok:
        lo, hi = live_range(o.sent, o.done)
        if not lo <= (o.version or 0) <= hi:
            outside += 1
    clear = sorted((o for o in ok if not any(o.sent <= b and o.done >= a for a, b, _ in windows)),
                   key=lambda o: o.done)
    versions = [o.version for o in clear]
    switches = sum(1 for a, b in zip(versions, versions[1:], strict=False) if a != b)
    regressions = sum(1 for a, b in zip(versions, versions[1:], strict=False)
                      if (a or 0) > (b or 0))
    return {
        "outside_window": outside,
        "switches": switches,
        "regressions": regressions,
        "answers_overlapping_a_promotion": len(ok) - len(clear),
        "versions_seen": dict(Counter(str(o.version) for o in ok)),
    }


# -- 3. A corrupted artifact promoted --------------------------------------------------------------


def corrupt_artifact(workdir: Path, lengths: Lengths) -> dict[str, Any]:
    """v2's bytes rot on disk. (a) Promoting it through the admin API is refused (409, sha256);
    (b) an alias moved past the registry's check (another replica promoted it before the rot) is
    refused by the service's load. Both times v1 keeps serving; metrics and logs say so."""
    root = workdir / "registry"
    store = family(root, versions=2)
    onnx_path = store.onnx_path(NAME, 2)
    data = bytearray(onnx_path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: still the right size, wrong sha256
    onnx_path.write_bytes(bytes(data))
    problems: list[str] = []
    with ServiceProcess(workdir, root, alias_refresh_s=0.5) as svc, svc.client() as c:
        rss_before = svc.rss_mb()
        load = Load(svc.url, forecast_request, workers=2, think_s=0.01).start()
        time.sleep(lengths.redis_settle_s)
        r = c.put(f"/v1/models/{NAME}/aliases/production", json={"version": 2}, headers=AUTH)
        api_refusal = {"status": r.status_code, **r.json().get("error", {})}
        _problem(problems, r.status_code == 409 and "sha256" in r.text,
                 f"API promotion of a corrupt version: {r.status_code} {r.text[:200]}")
        _problem(problems, store.aliases(NAME)["production"] == 1,
                 "the registry moved the alias despite the refusal")
        # (b) the alias file says v2 (written as another replica's promotion would have).
        (root / NAME / "aliases.json").write_text(json.dumps({"production": 2}))
        try:
            wait_until(lambda: metric_value(svc.metrics(), "distilcast_model_loads_total",
                                            model=NAME, outcome="IntegrityError") >= 2, 10,
                       what="the failed load counted")
        except AssertionError as exc:
            problems.append(str(exc))
        time.sleep(lengths.redis_settle_s)
        outcomes = load.stop()
        text = svc.metrics()
        model = c.get(f"/v1/models/{NAME}").json()
        ready = _readyz(svc)
        rss_after = svc.rss_mb()
    log = svc.log()
    failures = metric_value(text, "distilcast_model_loads_total", model=NAME,
                            outcome="IntegrityError")
    _problem(problems, {o.version for o in outcomes if o.status == 200} == {1},
             "something other than v1 served")
    _problem(problems, model["aliases"].get("production") == 2
             and model["serving"]["aliases"].get("production") == 1,
             f"registry/serving view unexpected: {model['aliases']} / {model['serving']}")
    _problem(problems, ready["http"] == 200, "the replica went unready")
    _problem(problems, "refused to promote" in log and "integrity check failed" in log,
             "the refused promotion is not in the log")
    _problem(problems, "previous version keeps serving" in log,
             "the refused load is not in the log")
    return summarise("corrupt_artifact", outcomes, problems=problems,
                     judge=Judge(lambda o: consistent(o) and o.version == 1),
                     rss_before=rss_before, rss_after=rss_after,
                     api_refusal=api_refusal, loads_integrity_error_total=failures,
                     versions_seen=dict(Counter(str(o.version) for o in outcomes)),
                     log_lines=[line for line in log.splitlines()
                                if "integrity" in line or "refused" in line
                                or "keeps serving" in line][:3])


# -- 4. Overload at ~4x capacity -------------------------------------------------------------------

RECOVERY = 0.25  # the load after the overload, as a fraction of the measured capacity
PARSE_SERIES = 500  # series of LOOKBACK x 7 per request: ~0.6 MB of JSON, parsing dominates
PARSE_BODY = json.dumps({"model": NAME, "series": [
    {"id": i, "values": [[float(t % 7) + c for c in range(7)] for t in range(LOOKBACK)]}
    for i in range(PARSE_SERIES)]}).encode()


@dataclass(frozen=True)
class Workload:
    """What saturates first: `inference` (a heavy model behind a small batcher queue) or
    `parse` (big JSON bodies: the event loop, bounded by the in-flight byte budget)."""

    kind: str
    settings: dict[str, Any]
    request: Callable[[int], Request]
    admitted: int  # requests the service holds at once when saturated (queue + batch, or budget)
    rss_growth_mb: float  # the bound on RSS growth during the overload
    parse: Callable[[Outcome, Answer], None] = parse_forecast


def heavy_request(_: int) -> Request:
    return Request("POST", FORECAST, forecast_body(channels=HEAVY_CHANNELS,
                                                   lookback=HEAVY_LOOKBACK), JSON)


def workload(kind: str) -> Workload:
    if kind == "inference":
        settings = {"batch_max_size": 32, "batch_max_queue": 8, "inline_max_ms": 0,
                    "alias_refresh_s": 0}
        batch = settings["batch_max_size"] // HEAVY_CHANNELS  # rows per request
        # Small requests queue in the batcher: memory hardly moves.
        return Workload(kind, settings, heavy_request, settings["batch_max_queue"] + batch, 32.0)
    budget = 4 * 1024 * 1024
    settings = {"max_in_flight_bytes": budget, "alias_refresh_s": 0}
    # Bodies in flight stay under the budget, but parsing one expands it ~8x into Python
    # objects and the allocator keeps its high-water mark: 64 MB + 8 x the budget.
    return Workload(kind, settings, lambda _: Request("POST", FORECAST, PARSE_BODY, JSON),
                    budget // len(PARSE_BODY), 64.0 + 8 * budget / 2**20, parse_length)


@dataclass
class Attempt:
    """One open-loop run at `rate` requests per second (`factor` x the measured capacity)."""

    rate: float
    factor: float
    outcomes: list[Outcome]
    not_sent: int
    started: float
    stopped: float


def refused(o: Outcome) -> bool:
    return o.status == 503 and o.error is None and bool(o.retry_after)


def overload_attempts(send: Callable[[float, float], Attempt], rate: float, factor: float,
                      tries: int = 2) -> list[Attempt]:
    """Offer `rate`; when nothing was refused the capacity was measured low (two shared cores:
    it moves within a minute), so offer twice as much as a new attempt, up to `tries`. Every
    attempt is kept and judged: one that found no overload is reported, never thrown away."""
    attempts: list[Attempt] = []
    for _ in range(tries):
        attempt = send(rate, factor)
        attempts.append(attempt)
        if any(refused(o) for o in attempt.outcomes):
            break
        rate, factor = 2 * rate, 2 * factor
    return attempts


def overload_budget(capacity: float, admitted: int) -> float:
    """3 x (requests admitted at once + 1) at the measured rate + 1 s."""
    return 3.0 * (admitted + 1) / max(capacity, 1e-6) + 1.0


@dataclass
class OverloadRun:
    """What one overload scenario observed; `overload_record` judges it."""

    kind: str
    work: Workload
    capacity_s: float
    overload_s: float
    capacity_outcomes: list[Outcome]
    attempts: list[Attempt]
    recovery_rate: float
    recovery: list[Outcome]
    rss_before: float
    rss_after: float
    rss_peak: float
    rss_during: list[float]
    metrics_text: str


def overload(workdir: Path, lengths: Lengths, kind: str = "inference", factor: float = 4.0
             ) -> dict[str, Any]:
    """Measure capacity (closed loop), offer `factor` x that open loop, then a quarter of it.

    Expected: only 200 and 503 + Retry-After; no client timeout and every answer inside the
    budget the configured bounds imply: 3 x (requests admitted at once + 1) at the measured
    rate + 1 s; RSS growth under the workload's bound; afterwards, at a quarter of the capacity
    (two shared cores: the capacity itself moves by half within a minute), only 200s."""
    work = workload(kind)
    root = workdir / "registry"
    if kind == "inference":
        heavy_family(root)
    else:
        family(root)
    with ServiceProcess(workdir, root, **work.settings) as svc:
        rss_before = svc.rss_mb()
        # Enough clients to keep the service saturated (batching included).
        cap_out = Load(svc.url, work.request, workers=work.admitted, timeout=60,
                       parse=work.parse).run_for(
            lengths.overload_capacity_s)
        capacity = sum(1 for o in cap_out if o.status == 200) / lengths.overload_capacity_s
        budget_s = overload_budget(capacity, work.admitted)
        sampler = RssSampler(svc)

        def send(rate: float, factor: float) -> Attempt:
            generator = Load(svc.url, work.request, rate=rate, timeout=2 * budget_s + 5,
                             max_outstanding=2048, parse=work.parse)
            outcomes = generator.run_for(lengths.overload_s)
            return Attempt(rate, factor, outcomes, generator.not_sent, generator.started,
                           generator.stopped)

        with sampler.running():
            attempts = overload_attempts(send, factor * capacity, factor)
            rss_during = sampler.between(attempts[-1].started, attempts[-1].stopped)
            time.sleep(1.0)  # what was admitted drains
            recover = Load(svc.url, work.request, rate=RECOVERY * capacity,
                           timeout=2 * budget_s + 5, parse=work.parse).run_for(
                               lengths.overload_recovery_s)
        rss_after = svc.rss_mb()
        text = svc.metrics()
    return overload_record(OverloadRun(
        kind, work, lengths.overload_capacity_s, lengths.overload_s, cap_out, attempts,
        RECOVERY * capacity, recover, rss_before, rss_after, sampler.peak, rss_during, text))


# Overload: a 200 (body checked) or a 503 with Retry-After; anything else fails (429 included).
OVERLOAD = Judge(allow_503=True)
RECOVERED = Judge()  # after the overload, at a quarter of the capacity: only 200s


def overload_record(run: OverloadRun) -> dict[str, Any]:
    """Judge every outcome of the scenario (capacity measurement, each attempt, recovery)."""
    work = run.work
    problems: list[str] = []
    ok = [o for o in run.capacity_outcomes if o.status == 200 and o.error is None]
    capacity = len(ok) / run.capacity_s
    base_p99 = percentile([o.ms for o in ok], 99) or 0.0
    budget_s = overload_budget(capacity, work.admitted)
    last = run.attempts[-1]
    every = [o for a in run.attempts for o in a.outcomes]
    over, rate, factor = last.outcomes, last.rate, last.factor
    recover, rss_before = run.recovery, run.rss_before
    codes = Counter(o.status for o in over if o.error is None)
    slow = [o for o in every if o.status is not None and o.error is None
            and o.ms > budget_s * 1000]
    not_sent = sum(a.not_sent for a in run.attempts)
    _problem(problems, capacity > 0, "no capacity measured")
    _problem(problems, not slow, f"{len(slow)} answers slower than the {budget_s:.2f} s budget "
             f"(slowest {max(o.ms for o in slow) if slow else 0:.0f} ms)")
    _problem(problems, any(refused(o) for o in over),
             f"no request was refused at {factor}x capacity: the overload was not reached")
    _problem(problems, codes.get(200, 0) > 0, "nothing served during the overload")
    _problem(problems, run.rss_peak - rss_before <= work.rss_growth_mb,
             f"RSS grew {run.rss_peak - rss_before:.1f} MB (bound {work.rss_growth_mb})")
    _problem(problems, len(recover) > 0, "nothing sent after the overload")
    _problem(problems, not_sent == 0, f"the generator fell behind ({not_sent})")

    recovery_ids = _Identity(recover)

    def judge(o: Outcome) -> str:
        return (RECOVERED if o in recovery_ids else OVERLOAD)(o)

    attempts = [{
        "offered_rps": round(a.rate, 1), "factor": a.factor,
        "reached_overload": any(refused(o) for o in a.outcomes),
        **counts(a.outcomes, OVERLOAD), "not_sent_by_generator": a.not_sent,
    } for a in run.attempts]
    recovered = [o for o in recover if RECOVERED(o) == "answered"]
    _problem(problems, all(o.ms <= budget_s * 1000 for o in recovered),
             "answers after the overload slower than the budget")
    rec = summarise("overload" if run.kind == "inference" else f"overload_{run.kind}",
                    run.capacity_outcomes + every + recover, problems=problems, judge=judge,
                    rss_before=rss_before, rss_after=run.rss_after)
    served_ms = [o.ms for o in over if o.status == 200 and o.error is None]
    refused_ms = [o.ms for o in over if refused(o)]
    rec.update({
        "bottleneck": run.kind, "body_bytes": len(work.request(0).body or b""),
        "capacity": counts(run.capacity_outcomes, OVERLOAD),
        "attempts": attempts,
        "capacity_rps": round(capacity, 1), "capacity_p99_ms": round(base_p99, 1),
        "offered_rps": round(rate, 1), "factor": factor,
        "achieved_send_rps": round(len(over) / run.overload_s, 1),
        "not_sent_by_generator": not_sent,
        "served_rps": round(codes.get(200, 0) / run.overload_s, 1),
        "served_p99_ms": _r(percentile(served_ms, 99)),
        "refused_p99_ms": _r(percentile(refused_ms, 99)),
        "budget_s": round(budget_s, 2), "answers_over_budget": len(slow),
        "timeouts": sum(1 for o in every if o.error == "timeout"),
        "retry_after_values": dict(Counter(o.retry_after for o in every if o.status == 503)),
        "rss_peak_mb": round(run.rss_peak, 1), "rss_during_overload_mb": run.rss_during,
        "rss_bound_mb": round(rss_before + work.rss_growth_mb, 1),
        "recovery": {"offered_rps": round(run.recovery_rate, 1), **counts(recover, RECOVERED),
                     "p99_ms": _r(percentile([o.ms for o in recovered], 99))},
        "rejections_overloaded_total": metric_value(run.metrics_text,
                                                    "distilcast_rejections_total",
                                                    reason="overloaded"),
        "service_settings": work.settings,
    })
    return rec


class _Identity:
    """Membership by identity (outcomes are mutable dataclasses: equal is not the same)."""

    def __init__(self, items: list[Outcome]) -> None:
        self._ids = {id(o) for o in items}

    def __contains__(self, o: object) -> bool:
        return id(o) in self._ids


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


# -- 5. Graceful shutdown under load ---------------------------------------------------------------


RACE_S = 0.05


def shutdown_judge(t_term: float) -> Callable[[Outcome], str]:
    """Before the signal only whole 200s. In flight at the signal (sent more than RACE_S before
    it: the service has read it) only a whole 200. Sent later (or in the last RACE_S) also a
    503 with Retry-After, a connection refused, or one found closed before any byte of the
    request was written on it. A request written and then dropped without an answer is lost:
    it fails wherever it falls."""
    before = Judge()
    after = Judge(allow_503=True, allow_connect=True)

    def judge(o: Outcome) -> str:
        if o.done <= t_term or o.sent < t_term - RACE_S:
            return before(o)
        return after(o)

    return judge


def graceful_shutdown(workdir: Path, lengths: Lengths, workers: int = 1) -> dict[str, Any]:
    """SIGTERM to scripts/launch_service.sh while requests are in flight: each of those completes
    (200, whole body); requests sent after it are served or refused cleanly (503 + Retry-After,
    a connection refused, or a connection closed before any byte of the request was written on
    it) - never lost, cut short or left hanging."""
    root = workdir / "registry"
    # ~30 ms per request on any machine (an idle fast one runs the default depth in ~5 ms: then
    # every request sent more than RACE_S before the signal was already answered).
    heavy_family(root, depth=depth_for(30.0))
    # One request per session call, twelve clients: requests queue for a few hundred ms, so
    # several are in flight whenever the signal comes.
    svc = ServiceProcess(workdir, root, workers=workers, alias_refresh_s=0,
                         batch_max_size=HEAVY_CHANNELS, inline_max_ms=0).start()
    try:
        rss_before = svc.rss_mb()
        load = Load(svc.url, heavy_request, workers=12, timeout=30).start()
        time.sleep(lengths.shutdown_load_s)
        rss_loaded = svc.rss_mb()  # "after": the process is gone once the scenario ends
        t_term = time.monotonic()
        svc.terminate()
        code: int | None
        try:
            code = svc.wait(timeout=30)
        except Exception:  # noqa: BLE001  # reported as a problem below
            code = None
        t_exit = time.monotonic()
        time.sleep(0.5)  # requests against the closed port
        outcomes = load.stop()
    finally:
        svc.stop()
    return shutdown_record(outcomes, t_term=t_term, t_exit=t_exit, code=code, workers=workers,
                           rss_before=rss_before, rss_loaded=rss_loaded)


def shutdown_record(outcomes: list[Outcome], *, t_term: float, t_exit: float, code: int | None,
                    workers: int, rss_before: float, rss_loaded: float) -> dict[str, Any]:
    """Judge every outcome of the shutdown scenario (`shutdown_judge`), before the signal too."""
    problems: list[str] = []
    judge = shutdown_judge(t_term)
    inflight = [o for o in outcomes if o.sent < t_term - RACE_S and o.done > t_term]
    after = [o for o in outcomes if o.sent >= t_term - RACE_S and o.done > t_term]
    # Single-process uvicorn re-raises the SIGTERM it handled once it has drained (143); the
    # launch script reports that requested, completed stop as 0, as with several workers.
    _problem(problems, code == 0, f"launch script exit status {code}")
    _problem(problems, len(inflight) > 0, "no request was in flight at SIGTERM")
    return summarise(
        "graceful_shutdown", outcomes, problems=problems, judge=judge,
        rss_before=rss_before, rss_after=rss_loaded, workers=workers, exit_status=code,
        shutdown_s=round(t_exit - t_term, 3), in_flight_at_sigterm=len(inflight),
        in_flight_completed=sum(1 for o in inflight if judge(o) == "answered"),
        before_sigterm=counts([o for o in outcomes if o.done <= t_term], judge),
        sent_after_sigterm=len(after), race_window_s=RACE_S,
        after_sigterm=counts(after, judge),
        after_sigterm_codes=dict(Counter(str(o.status) if o.status else o.error
                                         for o in after)),
    )


# -- 6. Hostile input ------------------------------------------------------------------------------

HOSTILE_SETTINGS = {"alias_refresh_s": 0, "max_body_bytes": hostile.MAX_BODY,
                    "max_series_per_request": 50}


def hostile_input(workdir: Path, lengths: Lengths, *, derandomize: bool = True
                  ) -> dict[str, Any]:
    """Hand-written hostile requests, then schemathesis over /openapi.json (positive and
    negative cases per operation) and a shape-aware fuzz of the numeric core: no 5xx, no hang,
    refusals in our error format naming the field."""
    root = workdir / "registry"
    family(root)
    problems: list[str] = []
    with ServiceProcess(workdir, root, **HOSTILE_SETTINGS) as svc:
        rss_before = svc.rss_mb()
        cases = hostile.run_cases(svc.url)
        fuzz = hostile.schemathesis_fuzz(svc.url, lengths.fuzz_examples,
                                         derandomize=derandomize)
        core = hostile.core_fuzz(svc.url, lengths.fuzz_examples * 4, derandomize=derandomize)
        alive = httpx.get(f"{svc.url}/readyz", timeout=5).status_code
        rss_after = svc.rss_mb()
        log = svc.log()
    problems += [p for c in cases if (p := c.problem)]
    for report, what in ((fuzz, "schemathesis"), (core, "core fuzz")):
        problems += [f"{what}: server error {e}" for e in report.server_errors[:5]]
        problems += [f"{what}: not our error body {e}" for e in report.not_our_error_shape[:5]]
        problems += [f"{what}: {e}" for e in report.bad_answers]
    _problem(problems, alive == 200, "the service is not ready after the hostile input")
    _problem(problems, "Traceback" not in log, "a traceback in the service log")
    codes: Counter[str] = Counter()
    for c in cases:
        codes[str(c.status) if c.status is not None else (c.error or "none")] += 1
    for report in (fuzz, core):
        codes.update({str(k): v for k, v in report.status_codes.items()})
    n = len(cases) + fuzz.cases + core.cases
    # A case's expected answer is its expected status and error body (a 4xx is the answer);
    # a 5xx, a body not in our error format or a non-finite forecast fails.
    failed = sum(1 for c in cases if c.problem) + sum(
        len(r.server_errors) + len(r.not_our_error_shape) + len(r.bad_answers)
        for r in (fuzz, core))
    lat = [c.ms for c in cases] + fuzz.latencies_ms + core.latencies_ms
    return {
        "scenario": "hostile_input", "requests": n, "answered": n - failed, "refused_503": 0,
        "refused_connect": 0, "failed": failed,
        "status_codes": dict(sorted(codes.items())), "p50_ms": _r(percentile(lat, 50)),
        "p99_ms": _r(percentile(lat, 99)), "max_ms": _r(max(lat) if lat else None),
        "rss_before_mb": round(rss_before, 1), "rss_after_mb": round(rss_after, 1),
        "hand_written_cases": len(cases),
        "schemathesis_cases": fuzz.cases,
        "schemathesis_by_operation": dict(fuzz.by_operation),
        "schemathesis_server_errors": len(fuzz.server_errors),
        "schemathesis_s": round(fuzz.seconds, 1),
        "core_fuzz_cases": core.cases, "core_fuzz_server_errors": len(core.server_errors),
        "examples_per_operation_and_mode": lengths.fuzz_examples,
        "derandomized": derandomize, "problems": problems,
    }


# -- 7. Security -----------------------------------------------------------------------------------


def security_checks(workdir: Path, lengths: Lengths) -> dict[str, Any]:
    """Admin routes refuse missing/wrong tokens (and every token when none is configured);
    traversal in model names and aliases is refused with 4xx and a model directory symlinked
    from outside the root is never served; no pickle/torch in the serving imports or sources;
    the service image's runtime stage is not root."""
    root = workdir / "registry"
    outside = workdir / "outside"
    outside.mkdir()
    family(root)
    linked = security.escaping_symlink(root, outside)
    problems = security.static_problems()
    with ServiceProcess(workdir, root, alias_refresh_s=0) as svc:
        rss_before = svc.rss_mb()
        probes, http_problems = security.http_probes(svc.url, root, outside, linked=linked)
        rss_after = svc.rss_mb()
    problems += http_problems
    with ServiceProcess(workdir, root, alias_refresh_s=0, admin_token="") as svc:
        r = httpx.put(f"{svc.url}/v1/models/{NAME}/aliases/production", json={"version": 1},
                      headers=AUTH, timeout=10)
    probes.append(security.Probe("admin disabled: any token", r.status_code, "403",
                                 r.status_code == 403, r.text[:160]))
    _problem(problems, r.status_code == 403, f"admin disabled answered {r.status_code}")
    stage = security.final_stage(security.REPO / "docker" / "service.Dockerfile")
    return {
        "scenario": "security", **security.summary(probes), "p99_ms": None,
        "rss_before_mb": round(rss_before, 1), "rss_after_mb": round(rss_after, 1),
        "runtime_user": stage.user, "runtime_base": stage.base,
        "forbidden_modules_checked": list(security.FORBIDDEN_MODULES),
        "problems": problems,
    }


# -- 8. A frozen Redis -----------------------------------------------------------------------------


def redis_frozen(workdir: Path, lengths: Lengths, redis_server: Any) -> dict[str, Any]:
    """SIGSTOP the scenario's own redis-server for `redis_frozen_s` under load, then SIGCONT.
    A stopped Redis still accepts connections (the kernel completes the handshakes) and never
    answers: every request is still answered, none waits much longer than the cache's
    per-operation timeout, and a promotion made after the thaw reaches the service as a pub/sub
    event."""
    root = workdir / "registry"
    family(root, versions=2)
    prefix = f"rel-{uuid.uuid4().hex[:8]}:"
    problems: list[str] = []
    tl = Timeline()
    bound_s = RedisCache(redis_server.url, prefix).operation_timeout_s
    pid = redis_server.proc.pid

    def mixed(i: int) -> Request:
        if i % 10 == 9:  # reads the alias map through the cache on every call
            return Request("GET", f"/v1/models/{NAME}", tag="models")
        return forecast_request(i)

    with ServiceProcess(workdir, root, redis_url=redis_server.url, redis_prefix=prefix,
                        alias_refresh_s=0) as svc:
        _problem(problems, _readyz(svc).get("events") is True,
                 "the service is not listening to alias events at start")
        rss_before = svc.rss_mb()
        load = Load(svc.url, mixed, workers=lengths.load_workers, think_s=0.002,
                    parse=parse_mixed)
        with ReadyProbe(svc) as probe:
            load.start()
            time.sleep(lengths.redis_settle_s)
            os.kill(pid, signal.SIGSTOP)
            tl.mark("frozen")
            try:
                try:
                    wait_until(lambda: _readyz(svc).get("cache_available") is False, 5,
                               what="the freeze noticed")
                    tl.mark("freeze_noticed")
                except AssertionError as exc:
                    problems.append(str(exc))
                time.sleep(max(0.0, lengths.redis_frozen_s - (time.monotonic()
                                                             - tl.marks["frozen"])))
            finally:
                os.kill(pid, signal.SIGCONT)
                tl.mark("thawed")
            try:
                wait_until(lambda: _readyz(svc).get("cache_available") is True
                           and _readyz(svc).get("events") is True, 15,
                           what="cache and alias events back")
                tl.mark("events_back")
            except AssertionError as exc:
                problems.append(str(exc))
            time.sleep(0.5)
            asyncio.run(_promote_elsewhere(root, redis_server.url, prefix, 2))
            tl.mark("promoted")
            try:
                wait_until(lambda: _serving(svc) == 2, 5, what="the promotion applied")
                tl.mark("swapped")
            except AssertionError as exc:
                problems.append(str(exc))
            time.sleep(lengths.redis_settle_s)
            outcomes = load.stop()
        rss_after = svc.rss_mb()
    swap_s = _since(tl, "promoted", "swapped")
    during = [o for o in outcomes if tl.marks["frozen"] <= o.sent <= tl.marks["thawed"]]
    answered = [o for o in outcomes if o.status is not None and o.error is None]
    p99 = percentile([o.ms for o in answered], 99) or 0.0
    reads = [o.ms for o in answered if o.tag == "models"]
    forecasts = [o for o in outcomes if o.tag == "forecast"]
    _problem(problems, len(during) > 0, "no request was sent while Redis was frozen")
    _problem(problems, p99 <= bound_s * 1000,
             f"p99 {p99:.0f} ms above the Redis operation timeout {bound_s * 1000:.0f} ms")
    _problem(problems, all(s["http"] == 200 for _, s in probe.samples) and bool(probe.outcomes)
             and all(o.error is None for o in probe.outcomes), "/readyz flapped")
    _problem(problems, swap_s is not None and swap_s < 5.0,
             f"promotion after the thaw took {swap_s} s to apply (pub/sub should be < 5 s)")
    after = [o.version for o in forecasts if "swapped" in tl.marks
             and o.sent > tl.marks["swapped"]]
    _problem(problems, bool(after) and set(after) == {2}, "answers after the swap not all v2")
    judge = Judge(expected_version)
    return summarise(
        "redis_frozen", outcomes + probe.outcomes, problems=problems, judge=judge,
        rss_before=rss_before, rss_after=rss_after, frozen_s=_since(tl, "frozen", "thawed"),
        redis_operation_timeout_ms=round(bound_s * 1000), requests_while_frozen=len(during),
        failed_while_frozen=counts(during, judge)["failed"],
        p99_while_frozen_ms=_r(percentile([o.ms for o in during if o.error is None], 99)),
        max_while_frozen_ms=_r(max((o.ms for o in during if o.error is None), default=None)),
        model_reads_p99_ms=_r(percentile(reads, 99)), model_reads=len(reads),
        events_back_after_thaw_s=_since(tl, "thawed", "events_back"),
        promotion_to_swap_s=None if swap_s is None else round(swap_s, 3),
        versions_seen=dict(Counter(str(o.version) for o in forecasts)),
        timeline_s=tl.relative(),
    )


# -- 9. Slow clients (slowloris) -------------------------------------------------------------------


@dataclass
class SlowConnection:
    opened: float
    closed: float
    # closed_by_server (EOF), reset (the server closed with the head's bytes unread, so the
    # kernel answered the next byte with RST: also the server's close), answered, refused,
    # open_at_stop
    how: str

    @property
    def lifetime_s(self) -> float:
        return self.closed - self.opened


class SlowClients:
    """`n` connections, each sending a request head one byte per `interval` from its own
    asyncio loop thread, reconnecting when the server closes it (a slowloris attack)."""

    def __init__(self, port: int, n: int, interval: float = 1.0) -> None:
        self.port, self.n, self.interval = port, n, interval
        self.connections: list[SlowConnection] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True,
                                        name="slowloris")

    def start(self) -> SlowClients:
        self._thread.start()
        return self

    def stop(self) -> list[SlowConnection]:
        self._stop.set()
        self._thread.join(timeout=10)
        return self.connections

    def open_now(self) -> int:
        return self._open

    _open = 0

    async def _main(self) -> None:
        await asyncio.gather(*(self._slot(i) for i in range(self.n)))

    async def _slot(self, i: int) -> None:
        await asyncio.sleep(i * self.interval / self.n)  # spread over one interval
        head = (f"GET /v1/models/{NAME} HTTP/1.1\r\nhost: 127.0.0.1\r\nx-slow-{i}: ".encode()
                + b"a" * 100_000)
        while not self._stop.is_set():
            opened = time.monotonic()
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                self.connections.append(SlowConnection(opened, time.monotonic(), "refused"))
                await asyncio.sleep(self.interval)
                continue
            self._open += 1
            how = None
            pos = 0
            while how is None and not self._stop.is_set():
                try:
                    writer.write(head[pos:pos + 1])
                    pos += 1
                    data = await asyncio.wait_for(reader.read(1), self.interval)
                    how = "closed_by_server" if data == b"" else "answered"
                except TimeoutError:
                    continue
                except (ConnectionError, OSError):
                    how = "reset"
            self._open -= 1
            self.connections.append(SlowConnection(opened, time.monotonic(),
                                                   how or "open_at_stop"))
            writer.close()


def slowloris(workdir: Path, lengths: Lengths) -> dict[str, Any]:
    """Normal load for `slowloris_s`, then the same load again while `slowloris_connections`
    connections send their request heads one byte a second: the normal requests' p99 stays
    within 2x of the first run, and the server closes every slow connection once its head has
    taken `head_timeout_s` (service/launch.py); it keeps accepting new ones meanwhile."""
    root = workdir / "registry"
    family(root)
    problems: list[str] = []
    head_s = lengths.head_timeout_s
    with ServiceProcess(workdir, root, alias_refresh_s=0, head_timeout_s=head_s) as svc:
        rss_before = svc.rss_mb()
        base = Load(svc.url, forecast_request, workers=lengths.load_workers,
                    think_s=0.002).run_for(lengths.slowloris_s)
        slow = SlowClients(svc.port, lengths.slowloris_connections).start()
        time.sleep(1.5)  # every slot has connected
        open_at_start = slow.open_now()
        under = Load(svc.url, forecast_request, workers=lengths.load_workers,
                     think_s=0.002).run_for(lengths.slowloris_s)
        open_at_end = slow.open_now()
        connections = slow.stop()
        ready = _readyz(svc)["http"]
        rss_after = svc.rss_mb()
    base_p99 = percentile([o.ms for o in base if o.error is None], 99) or 0.0
    under_p99 = percentile([o.ms for o in under if o.error is None], 99) or 0.0
    ratio = under_p99 / base_p99 if base_p99 else None
    closed = [c for c in connections if c.how in ("closed_by_server", "reset")]
    late = [c for c in closed if c.lifetime_s > head_s + 2.0]
    early = [c for c in closed if c.lifetime_s < head_s - 0.5]
    lingering = [c for c in connections if c.how == "open_at_stop" and c.lifetime_s > head_s + 2]
    other = Counter(c.how for c in connections if c.how not in ("closed_by_server", "reset",
                                                                "open_at_stop"))
    _problem(problems, ratio is not None and ratio <= 2.0,
             f"p99 {under_p99:.1f} ms with slow clients vs {base_p99:.1f} ms without "
             f"(ratio {ratio}; bound 2)")
    _problem(problems, open_at_start >= 0.9 * lengths.slowloris_connections,
             f"only {open_at_start} slow connections open when the load started")
    _problem(problems, len(closed) >= lengths.slowloris_connections,
             f"the server closed {len(closed)} slow connections, expected at least one per "
             f"client ({lengths.slowloris_connections})")
    _problem(problems, not late, f"{len(late)} slow connections lived past the head timeout "
             f"{head_s} s + 2 s (longest {max((c.lifetime_s for c in late), default=0):.1f} s)")
    _problem(problems, not early, f"{len(early)} slow connections closed before the timeout")
    _problem(problems, not lingering, f"{len(lingering)} slow connections still open too long")
    _problem(problems, not other, f"slow connections ended otherwise: {dict(other)}")
    _problem(problems, ready == 200, "the service is not ready after the slow clients")
    lifetimes = [c.lifetime_s for c in closed]
    return summarise(
        "slowloris", base + under, problems=problems, judge=Judge(consistent),
        rss_before=rss_before, rss_after=rss_after,
        slow_connections=lengths.slowloris_connections, head_timeout_s=head_s,
        baseline_requests=len(base), baseline_p99_ms=_r(base_p99),
        with_slow_requests=len(under), with_slow_p99_ms=_r(under_p99),
        p99_ratio=None if ratio is None else round(ratio, 2),
        slow_open_at_load_start=open_at_start, slow_open_at_load_end=open_at_end,
        slow_closed_by_server=len(closed),
        slow_lifetime_s={"min": round(min(lifetimes), 2), "max": round(max(lifetimes), 2)}
        if lifetimes else None,
        slow_endings=dict(Counter(c.how for c in connections)),
    )


# -- 10. A full disk while registering and promoting -----------------------------------------------


def disk_full(workdir: Path, lengths: Lengths) -> dict[str, Any]:
    """The registry lives on a 2 MB tmpfs made by the scenario. Under load the disk is filled,
    then (a) registering a version fails with a clear StorageFull and leaves no trace a reader
    could see, (b) promoting v2 through the admin API answers 507 storage_full and leaves the
    alias where it was; v1 keeps serving throughout. With space back, the same promotion
    succeeds."""
    problems: list[str] = []
    tl = Timeline()
    with small_filesystem(workdir / "disk", 2048) as disk:
        root = disk / "registry"
        store = family(root, versions=2)
        with ServiceProcess(workdir, root, alias_refresh_s=0.5) as svc, svc.client() as c:
            rss_before = svc.rss_mb()
            load = Load(svc.url, forecast_request, workers=2, think_s=0.005).start()
            time.sleep(lengths.redis_settle_s)
            filled = fill(disk)
            tl.mark("disk_full")
            register_error = None
            try:
                store.register(manifest(NAME, "student", LOOKBACK, HORIZON,
                                        architecture="3x-last"),
                               linear_bytes(LOOKBACK, HORIZON, w_last=3.0))
                problems.append("a version was registered on a full disk")
            except StorageFull as exc:
                register_error = str(exc)
            except Exception as exc:  # noqa: BLE001  # any other error is not the clear one
                problems.append(f"registering on a full disk: {type(exc).__name__}: {exc}")
            leftovers = [p.name for p in (root / NAME).iterdir() if p.name.startswith(".tmp")]
            model = c.get(f"/v1/models/{NAME}").json()
            listed = [v["version"] for v in model["versions"]]
            _problem(problems, store.list_versions(NAME) == [1, 2] and listed == [1, 2],
                     f"versions after the failed registration: {listed}")
            _problem(problems, not leftovers, f"partial files left: {leftovers}")
            r = c.put(f"/v1/models/{NAME}/aliases/production", json={"version": 2},
                      headers=AUTH)
            api_refusal = {"status": r.status_code, **r.json().get("error", {})}
            _problem(problems, r.status_code == 507
                     and api_refusal.get("code") == "storage_full",
                     f"promotion on a full disk: {r.status_code} {r.text[:200]}")
            _problem(problems, store.aliases(NAME)["production"] == 1,
                     "the alias moved although the promotion failed")
            time.sleep(max(1.5, lengths.redis_settle_s))  # several alias refreshes
            _problem(problems, _serving(svc) == 1, "the service stopped serving v1")
            tl.mark("space_back")
            (disk / "filler").unlink()
            r = c.put(f"/v1/models/{NAME}/aliases/production", json={"version": 2},
                      headers=AUTH)
            _problem(problems, r.status_code == 200,
                     f"promotion with space back: {r.status_code} {r.text[:200]}")
            tl.mark("promoted")
            time.sleep(lengths.redis_settle_s)
            outcomes = load.stop()
            rss_after = svc.rss_mb()
    before = [o.version for o in outcomes if o.done < tl.marks["space_back"]]
    after = [o.version for o in outcomes if o.sent > tl.marks["promoted"]]
    _problem(problems, bool(before) and set(before) == {1}, "not only v1 while the disk was full")
    _problem(problems, bool(after) and set(after) == {2}, "not only v2 after the promotion")
    return summarise(
        "disk_full", outcomes, problems=problems, judge=Judge(consistent),
        rss_before=rss_before, rss_after=rss_after, filesystem="tmpfs 2048 KiB",
        filler_bytes=filled, register_error=register_error, api_refusal=api_refusal,
        versions_seen=dict(Counter(str(o.version) for o in outcomes)),
        timeline_s=tl.relative(),
    )


# -- 11. Two workers: promotions, a Redis outage, SIGTERM ------------------------------------------


def two_workers(workdir: Path, lengths: Lengths, redis_server: Any) -> dict[str, Any]:
    """Two uvicorn workers sharing Redis, under load: promotions through the admin API (one
    worker takes each PUT, the other hears it on pub/sub), Redis killed and restarted, a
    promotion from elsewhere after it, then SIGTERM. Every answer is computed by the version it
    names, every worker follows every promotion within a second, /metrics sums both workers'
    counts, and the drain loses nothing."""
    root = workdir / "registry"
    k = lengths.promotions
    family(root, versions=k + 2)
    prefix = f"rel-{uuid.uuid4().hex[:8]}:"
    problems: list[str] = []
    tl = Timeline()
    windows: list[tuple[float, float, int]] = []
    svc = ServiceProcess(workdir, root, workers=2, redis_url=redis_server.url,
                         redis_prefix=prefix, alias_refresh_s=0).start()
    drain_outcomes: list[Outcome] = []
    t_term = t_exit = 0.0
    code: int | None = None
    try:
        rss_before = svc.rss_mb()
        load = Load(svc.url, forecast_request, workers=lengths.load_workers,
                    think_s=0.002).start()
        time.sleep(lengths.promotion_interval_s)
        with svc.client() as c:
            for version in range(2, k + 2):
                sent = time.monotonic()
                r = c.put(f"/v1/models/{NAME}/aliases/production", json={"version": version},
                          headers=AUTH)
                windows.append((sent, time.monotonic(), version))
                _problem(problems, r.status_code == 200,
                         f"promotion to {version}: {r.status_code} {r.text[:200]}")
                time.sleep(lengths.promotion_interval_s)
        redis_server.stop()
        tl.mark("redis_killed")
        time.sleep(lengths.redis_outage_s)
        redis_server.start()
        tl.mark("redis_restarted")
        time.sleep(lengths.redis_settle_s)
        asyncio.run(_promote_elsewhere(root, redis_server.url, prefix, k + 2))
        tl.mark("promoted_elsewhere")

        def everyone_on(version: int, since: float) -> bool:
            recent = [o for o in list(load.outcomes) if o.sent > since]
            return len(recent) >= 20 and all(o.version == version for o in recent[-20:])

        try:
            wait_until(lambda: everyone_on(k + 2, tl.marks["promoted_elsewhere"]), 15,
                       what="both workers serving the version promoted after the outage")
            tl.mark("all_switched")
        except AssertionError as exc:
            problems.append(str(exc))
        time.sleep(lengths.redis_settle_s)
        outcomes = load.stop()
        answered_forecasts = sum(1 for o in outcomes if o.status == 200 and o.error is None)
        # Each worker counts a request before its answer is sent: equal once the load stopped.
        counted = metric_value(svc.metrics(), "distilcast_request_duration_seconds_count",
                               route=FORECAST, status="200")
        multiproc = Path(svc.env["PROMETHEUS_MULTIPROC_DIR"])
        worker_files = sorted({p.stem.rsplit("_", 1)[-1]
                               for p in multiproc.glob("histogram_*.db")})
        rss_loaded = svc.rss_mb()
        # The drain, with the two workers under load.
        drain = Load(svc.url, forecast_request, workers=lengths.load_workers,
                     think_s=0.002, timeout=30).start()
        time.sleep(lengths.shutdown_load_s)
        t_term = time.monotonic()
        svc.terminate()
        try:
            code = svc.wait(timeout=30)
        except Exception:  # noqa: BLE001  # reported as a problem below
            code = None
        t_exit = time.monotonic()
        time.sleep(0.5)
        drain_outcomes = drain.stop()
    finally:
        svc.stop()
    lag = promotion_lag(outcomes, windows + [(tl.marks["promoted_elsewhere"],
                                              tl.marks["promoted_elsewhere"], k + 2)])
    _problem(problems, counted == answered_forecasts,
             f"/metrics counts {counted:.0f} forecasts, the clients got {answered_forecasts}")
    _problem(problems, len(worker_files) == 2,
             f"metrics files from {len(worker_files)} workers, expected 2")
    _problem(problems, all(s < 1.0 for s in lag.values()),
             f"a worker answered an older version > 1 s after a promotion: {lag}")
    _problem(problems, code == 0, f"launch script exit status {code}")
    during = [o for o in outcomes if tl.marks["redis_killed"] <= o.sent
              <= tl.marks["redis_restarted"]]
    _problem(problems, len(during) > 0, "no request during the Redis outage")
    before, after = Judge(consistent), Judge(consistent, allow_503=True, allow_connect=True)

    def judge(o: Outcome) -> str:
        if o in drained and not (o.done <= t_term or o.sent < t_term - RACE_S):
            return after(o)
        return before(o)

    drained = _Identity(drain_outcomes)
    inflight = [o for o in drain_outcomes if o.sent < t_term - RACE_S and o.done > t_term]
    return summarise(
        "two_workers", outcomes + drain_outcomes, problems=problems, judge=judge,
        rss_before=rss_before, rss_after=rss_loaded, workers=2, promotions=k + 1,
        promotion_lag_s=lag, requests_during_redis_outage=len(during),
        failed_during_redis_outage=counts(during, judge)["failed"],
        metrics_forecasts_counted=counted, forecasts_answered=answered_forecasts,
        metrics_worker_pids=len(worker_files),
        in_flight_at_sigterm=len(inflight), exit_status=code,
        shutdown_s=round(t_exit - t_term, 3) if t_exit else None,
        after_sigterm=counts([o for o in drain_outcomes if o.sent >= t_term - RACE_S
                              and o.done > t_term], judge),
        versions_seen=dict(Counter(str(o.version) for o in outcomes + drain_outcomes)),
        timeline_s=tl.relative(),
    )


def promotion_lag(outcomes: list[Outcome], windows: list[tuple[float, float, int]]
                  ) -> dict[str, float]:
    """Per promotion: how long after its PUT was answered an answer with an older version was
    still sent (0 when none was): the slowest worker's delay in following the promotion."""
    lag: dict[str, float] = {}
    for i, (_, answered, version) in enumerate(windows):
        end = windows[i + 1][0] if i + 1 < len(windows) else float("inf")
        old = [o.sent - answered for o in outcomes if answered < o.sent < end
               and o.version is not None and o.version < version]
        lag[str(version)] = round(max(old, default=0.0), 3)
    return lag
