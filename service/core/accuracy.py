"""Live accuracy: remember served forecasts, match the actuals that arrive later.

A forecast whose series carry time (timestamps, or start + freq) is remembered per series: model,
version, mode, the forecast times, values and intervals. Its time to live is the forecast's own
span (last minus first forecast time, one step added) plus a margin, so a forecast stays matchable
until its last step has had time to happen. Memory is bounded by the number of stored values
(forecast values and interval bounds): past the bound the forecasts closest to expiring go first.

`InProcessMemory` is the embedded default (one process, nothing shared); `RedisMemory` shares the
forecasts between replicas and workers, so an actual may reach another worker than its forecast.
An actual (unique_id, ds) matches every remembered forecast of that series holding that time,
once: a second report of the same actual for the same forecast counts as a duplicate.

No HTTP and no metrics exporter here: the web layer turns `Pair`s into Prometheus updates.
"""

from __future__ import annotations

import bisect
import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, cast

import msgspec
import numpy as np
from redis.asyncio import Redis

from service.core.errors import InvalidInput
from service.core.timeaxis import Stamp
from service.core.types import ForecastResult, SeriesForecast

log = logging.getLogger(__name__)

# Horizon steps (1-based) are reported in these buckets: the label set stays small for any h.
STEP_BUCKETS = ((1, 1), (2, 4), (5, 12), (13, 24), (25, 48), (49, 96), (97, 192), (193, 336),
                (337, 720))


def step_bucket(step: int) -> str:
    """'1', '2-4', ..., '337-720', '721+' for a 1-based horizon step."""
    for lo, hi in STEP_BUCKETS:
        if step <= hi:
            return str(lo) if lo == hi else f"{lo}-{hi}"
    return f"{STEP_BUCKETS[-1][1] + 1}+"


def time_key(stamp: Stamp, field: str) -> float:
    """A comparable instant: ISO 8601 text as epoch seconds (naive times read as UTC), numbers as
    they are. Rounded to the millisecond so '2024-01-01 00:00' and '2024-01-01T00:00:00Z' agree."""
    if isinstance(stamp, bool):
        raise InvalidInput("ds must be an ISO 8601 time or a number", field=field)
    if isinstance(stamp, int | float):
        if not math.isfinite(stamp):
            raise InvalidInput("ds must be finite", field=field)
        return round(float(stamp), 3)
    try:
        when = datetime.fromisoformat(stamp.replace("Z", "+00:00") if stamp.endswith("Z")
                                      else stamp)
    except ValueError:
        raise InvalidInput(f"ds {stamp!r} is not an ISO 8601 time", field=field) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return round(when.timestamp(), 3)


@dataclass(slots=True)
class ForecastRecord:
    uid: str
    model: str
    version: int
    mode: str
    times: list[float]
    values: np.ndarray
    """[h, C] float32."""
    intervals: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    ttl_s: float = 0.0

    @property
    def fid(self) -> str:
        # The same model forecasting the same series from the same origin again replaces the
        # earlier forecast (a retried request is not remembered twice).
        return f"{self.model}@{self.version}:{self.mode}:{self.times[0]!r}"

    @property
    def size(self) -> int:
        return int(self.values.size) * (1 + 2 * len(self.intervals))

    def to_bytes(self) -> bytes:
        h, c = self.values.shape
        return _ENCODER.encode({
            "uid": self.uid, "model": self.model, "version": self.version, "mode": self.mode,
            "times": self.times, "h": h, "c": c, "ttl": self.ttl_s,
            "values": self.values.astype("<f4").tobytes(),
            "intervals": {k: [lo.astype("<f4").tobytes(), hi.astype("<f4").tobytes()]
                          for k, (lo, hi) in self.intervals.items()},
        })

    @classmethod
    def from_bytes(cls, raw: bytes) -> ForecastRecord:
        d: dict[str, Any] = _DECODER.decode(raw)
        shape = (d["h"], d["c"])

        def arr(b: bytes) -> np.ndarray:
            return np.frombuffer(b, dtype="<f4").reshape(shape)

        return cls(d["uid"], d["model"], d["version"], d["mode"], d["times"], arr(d["values"]),
                   {k: (arr(lo), arr(hi)) for k, (lo, hi) in d["intervals"].items()}, d["ttl"])

    def step_of(self, t: float) -> int | None:
        """0-based index of time `t` in this forecast (its times increase), or None."""
        i = bisect.bisect_left(self.times, t - 1e-3)
        if i < len(self.times) and abs(self.times[i] - t) < 1e-3:
            return i
        return None


def _first_time(fid: str) -> float:
    return float(fid.rsplit(":", 1)[1])


_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder()


def _times(stamps: list[Stamp]) -> list[float]:
    """`time_key` of every forecast stamp. A fixed step (the common case) is checked on the first
    two and the last stamp and filled in, instead of parsing every ISO string; calendar steps
    (months, business days) are parsed one by one."""
    n = len(stamps)
    first = time_key(stamps[0], "timestamps")
    if n < 3:
        return [first] + [time_key(t, "timestamps") for t in stamps[1:]]
    step = time_key(stamps[1], "timestamps") - first
    last = time_key(stamps[-1], "timestamps")
    if abs(first + step * (n - 1) - last) < 1e-3:
        out: list[float] = np.round(first + step * np.arange(n), 3).tolist()
        return out
    return [time_key(t, "timestamps") for t in stamps]


def records(result: ForecastResult, margin_s: float) -> list[ForecastRecord]:
    """The forecasts of `result` worth remembering: those whose series carried time."""
    out = []
    parsed: dict[tuple[Stamp, Stamp, int], list[float]] = {}
    for r in result.results:
        if not isinstance(r, SeriesForecast) or not r.timestamps:
            continue
        # Series of one batch usually share their forecast times: parse them once.
        span = (r.timestamps[0], r.timestamps[-1], len(r.timestamps))
        times = parsed.get(span)
        if times is None:
            times = parsed[span] = _times(r.timestamps)
        values = r.values[:, None] if r.values.ndim == 1 else r.values
        bands = {}
        for level, (lo, hi) in (r.intervals or {}).items():
            bands[level] = (lo[:, None], hi[:, None]) if lo.ndim == 1 else (lo, hi)
        step = times[1] - times[0] if len(times) > 1 else 0.0
        ttl = max(times[-1] - times[0] + step, 0.0) + margin_s
        out.append(ForecastRecord(str(r.id), result.model, result.version, result.mode, times,
                                  np.asarray(values, dtype=np.float32), bands, ttl))
    return out


@dataclass(slots=True)
class Pair:
    """One actual matched with one remembered forecast step."""

    record: ForecastRecord
    step: int
    """0-based horizon step."""

    @property
    def forecast(self) -> np.ndarray:
        row: np.ndarray = self.record.values[self.step]
        return row


@dataclass(slots=True)
class Outcome:
    pairs: list[Pair] = field(default_factory=list)
    duplicates: int = 0


class ForecastMemory(Protocol):
    async def remember(self, items: list[ForecastRecord]) -> None: ...

    async def match(self, actuals: list[tuple[str, float]]) -> list[Outcome]: ...

    async def close(self) -> None: ...


class InProcessMemory:
    """The embedded store: this process only, at most `max_values` stored values."""

    def __init__(self, max_values: int, clock: Any = time.monotonic) -> None:
        self.max_values = max_values
        self.clock = clock
        self.total = 0
        # (uid, fid) -> (expiry, record, matched steps); oldest inserted first.
        self._items: OrderedDict[tuple[str, str], tuple[float, ForecastRecord, set[int]]] = (
            OrderedDict())
        self._by_uid: dict[str, set[str]] = {}

    def _drop(self, key: tuple[str, str]) -> None:
        _, rec, _ = self._items.pop(key)
        self.total -= rec.size
        fids = self._by_uid.get(key[0])
        if fids is not None:
            fids.discard(key[1])
            if not fids:
                del self._by_uid[key[0]]

    async def remember(self, items: list[ForecastRecord]) -> None:
        now = self.clock()
        for rec in items:
            key = (rec.uid, rec.fid)
            if key in self._items:
                self._drop(key)
            self._items[key] = (now + rec.ttl_s, rec, set())
            self._by_uid.setdefault(rec.uid, set()).add(rec.fid)
            self.total += rec.size
        while self.total > self.max_values and self._items:
            self._drop(next(iter(self._items)))

    async def match(self, actuals: list[tuple[str, float]]) -> list[Outcome]:
        now = self.clock()
        out = []
        for uid, t in actuals:
            outcome = Outcome()
            for fid in list(self._by_uid.get(uid, ())):
                expiry, rec, seen = self._items[(uid, fid)]
                if expiry < now:
                    self._drop((uid, fid))
                    continue
                if not rec.times[0] - 1e-3 <= t <= rec.times[-1] + 1e-3:
                    continue
                step = rec.step_of(t)
                if step is None:
                    continue
                if step in seen:
                    outcome.duplicates += 1
                else:
                    seen.add(step)
                    outcome.pairs.append(Pair(rec, step))
            out.append(outcome)
        return out

    async def close(self) -> None:
        self._items.clear()
        self._by_uid.clear()
        self.total = 0


# KEYS are built in the script from the prefix (one Redis, not a cluster). ARGV: prefix, now, then
# per forecast: uid, fid, blob, ttl_ms, last time, size. Returns the stored value count.
_REMEMBER = """
local p, now, added = ARGV[1], tonumber(ARGV[2]), 0
for i = 3, #ARGV, 6 do
  local uid, fid, ttl, size = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 3]), tonumber(ARGV[i + 5])
  local key = p .. 'f:' .. uid .. '|' .. fid
  local idx = p .. 'i:' .. uid
  redis.call('SET', key, ARGV[i + 2], 'PX', ttl)
  redis.call('ZADD', idx, ARGV[i + 4], fid)
  if redis.call('PTTL', idx) < ttl then redis.call('PEXPIRE', idx, ttl) end
  added = added + size * redis.call('ZADD', p .. 'all', now + ttl / 1000, size .. '|' .. key)
end
if added > 0 then return redis.call('INCRBY', p .. 'n', added) end
return tonumber(redis.call('GET', p .. 'n') or '0')
"""


class RedisMemory:
    """Forecasts in Redis, shared by every worker and replica.

    Keys (under `prefix`): `acc:f:<uid>|<fid>` the forecast (msgpack, expires with its TTL);
    `acc:i:<uid>` a sorted set of the series' forecasts scored by their last time (an actual at
    time t reads those ending at or after t); `acc:s:<uid>|<fid>` the steps already matched;
    `acc:all` every stored forecast scored by its expiry (member `<size>|<key>`) and `acc:n` the
    stored value count, which past `max_values` drops the forecasts closest to expiring. Concurrent
    writers may overshoot the bound briefly; the next write trims it.
    """

    def __init__(self, url: str, prefix: str, max_values: int) -> None:
        self.client: Redis = Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        self.prefix = prefix + "acc:"
        self.max_values = max_values
        self._remember = self.client.register_script(_REMEMBER)

    def _blob(self, uid: str, fid: str) -> str:
        return f"{self.prefix}f:{uid}|{fid}"

    async def remember(self, items: list[ForecastRecord]) -> None:
        if not items:
            return
        now = time.time()
        args: list[str | bytes | float | int] = [self.prefix, now]
        for rec in items:
            args += [rec.uid, rec.fid, rec.to_bytes(), max(int(rec.ttl_s * 1000), 1),
                     rec.times[-1], rec.size]
        # One script call, not five commands a series: a 1000-series batch stays a few ms.
        total = int(await self._remember(args=args))
        await self._trim(now, total)

    async def _trim(self, now: float, total: int) -> None:
        p = self.prefix
        expired = cast(list[bytes], await self.client.zrangebyscore(f"{p}all", "-inf", now))
        total -= await self._forget(expired)
        while total > self.max_values:
            oldest = cast(list[bytes], await self.client.zrange(f"{p}all", 0, 255))
            if not oldest:
                break
            members, excess = [], total - self.max_values
            for m in oldest:  # just enough of the forecasts closest to expiring
                members.append(m)
                excess -= int(m.split(b"|", 1)[0])
                if excess <= 0:
                    break
            total -= await self._forget(members)

    async def _forget(self, members: list[bytes]) -> int:
        if not members:
            return 0
        freed = 0
        pipe = self.client.pipeline(transaction=False)
        for m in members:
            size, _, blob = m.decode().partition("|")
            freed += int(size)
            pipe.delete(blob)
        pipe.zrem(f"{self.prefix}all", *members)
        pipe.decrby(f"{self.prefix}n", freed)
        await pipe.execute()
        return freed

    async def match(self, actuals: list[tuple[str, float]]) -> list[Outcome]:
        p = self.prefix
        pipe = self.client.pipeline(transaction=False)
        for uid, t in actuals:
            pipe.zrangebyscore(f"{p}i:{uid}", t - 1e-3, "+inf")
        found: list[list[bytes]] = await pipe.execute()
        # The index holds forecasts ending at or after t; a forecast id ends with its first
        # time, so those starting after t are left out before any forecast is fetched.
        wanted = [(i, uid, name) for i, ((uid, t), fids) in
                  enumerate(zip(actuals, found, strict=True))
                  for name in (fid.decode() for fid in fids) if _first_time(name) <= t + 1e-3]
        if not wanted:
            return [Outcome() for _ in actuals]
        # Actuals of one series share forecasts: fetch and decode each once.
        keys = list(dict.fromkeys(self._blob(uid, fid) for _, uid, fid in wanted))
        fetched = cast(list[bytes | None], await self.client.mget(keys))
        decoded = {k: None if raw is None else ForecastRecord.from_bytes(raw)
                   for k, raw in zip(keys, fetched, strict=True)}
        candidates: list[tuple[int, ForecastRecord, int]] = []
        stale = self.client.pipeline(transaction=False)
        for i, uid, fid in wanted:
            rec = decoded[self._blob(uid, fid)]
            if rec is None:  # expired or trimmed: drop it from the series' index
                stale.zrem(f"{p}i:{uid}", fid)
                continue
            step = rec.step_of(actuals[i][1])
            if step is not None:
                candidates.append((i, rec, step))
        await stale.execute()
        out = [Outcome() for _ in actuals]
        if not candidates:
            return out
        pipe = self.client.pipeline(transaction=False)
        for _, rec, step in candidates:
            key = f"{p}s:{rec.uid}|{rec.fid}"
            pipe.sadd(key, step)
            pipe.pexpire(key, max(int(rec.ttl_s * 1000), 1))
        flags = (await pipe.execute())[0::2]
        for (i, rec, step), new in zip(candidates, flags, strict=True):
            if new:
                out[i].pairs.append(Pair(rec, step))
            else:
                out[i].duplicates += 1
        return out

    async def close(self) -> None:
        await self.client.aclose()


def open_memory(redis_url: str | None, prefix: str, max_values: int) -> ForecastMemory:
    if redis_url:
        return RedisMemory(redis_url, prefix, max_values)
    return InProcessMemory(max_values)


__all__ = ["ForecastMemory", "InProcessMemory", "Outcome", "Pair", "RedisMemory", "open_memory",
           "records", "step_bucket", "time_key"]
