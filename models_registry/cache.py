"""Caches in front of the filesystem store: in-process (embedded default) and Redis.

A cache is an optimisation, never a dependency: every failure is swallowed here, counted in
`stats` and logged (rate-limited), and the caller falls back to the filesystem. The `Registry`
decides what is cached under which key; caches only move bytes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any

from pydantic import ValidationError
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from models_registry.errors import CacheUnavailable
from models_registry.manifest import AliasEvent

log = logging.getLogger(__name__)

# What a broken or unreachable Redis can raise at us. Builtin TimeoutError (also raised by
# asyncio.timeout) is an OSError.
_REDIS_ERRORS = (RedisError, OSError)


@dataclass
class CacheStats:
    """Counters the service exports as metrics (models_registry stays free of prometheus_client).

    hits/misses: cache lookups that found / did not find the key. errors: failed cache operations
    (unreachable, timed out, corrupt entry). fallbacks: reads served from the filesystem because
    the cache was unavailable (including reads skipped while it is known to be down).
    """

    hits: int = 0
    misses: int = 0
    errors: int = 0
    fallbacks: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class Cache:
    """Interface shared by the caches. Subclasses override the byte operations."""

    supports_events = False
    """True when `open_subscription()` delivers events published by other processes."""

    def __init__(self) -> None:
        self.stats = CacheStats()

    @property
    def available(self) -> bool:
        """Whether the backend is believed reachable right now (for a health gauge)."""
        return True

    def describe(self, key: str) -> str:
        """Where `key` lives, for error messages."""
        return f"cache key {key}"

    async def get(self, key: str) -> bytes | None:
        raise NotImplementedError

    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        raise NotImplementedError

    async def delete(self, *keys: str) -> None:
        raise NotImplementedError

    async def publish(self, event: AliasEvent) -> None:
        """Tell other processes about an alias change (no-op without a shared backend)."""

    async def open_subscription(self) -> EventSubscription:
        raise CacheUnavailable(f"{type(self).__name__} has no pub/sub")

    async def close(self) -> None:
        """Release connections."""


class EventSubscription:
    """A live subscription to alias events. `get` raises CacheUnavailable once it is broken."""

    async def get(self, timeout: float) -> AliasEvent | None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


class InProcessCache(Cache):
    """A bounded LRU dict: the embedded default, no Redis needed. Never unavailable."""

    def __init__(self, max_bytes: int = 256 * 1024 * 1024) -> None:
        super().__init__()
        self.max_bytes = max_bytes
        self._data: OrderedDict[str, tuple[bytes, float | None]] = OrderedDict()
        self._size = 0

    async def get(self, key: str) -> bytes | None:
        item = self._data.get(key)
        if item is not None and item[1] is not None and item[1] <= time.monotonic():
            self._drop(key)
            item = None
        if item is None:
            self.stats.misses += 1
            return None
        self._data.move_to_end(key)
        self.stats.hits += 1
        return item[0]

    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        if len(value) > self.max_bytes:
            return
        self._drop(key)
        expires = time.monotonic() + ttl if ttl is not None else None
        self._data[key] = (value, expires)
        self._size += len(value)
        while self._size > self.max_bytes:
            self._drop(next(iter(self._data)))

    async def delete(self, *keys: str) -> None:
        for key in keys:
            self._drop(key)

    def _drop(self, key: str) -> None:
        item = self._data.pop(key, None)
        if item is not None:
            self._size -= len(item[0])


class RedisCache(Cache):
    """Read-through cache in Redis (redis-py asyncio + hiredis) with pub/sub alias events.

    Keys live under `prefix`; events go to the channel `<prefix>events`. Timeouts are short so a
    dead Redis costs a read at most about `connect_timeout`, and after a failure Redis is not
    tried again for `retry_after` seconds (reads go straight to the filesystem meanwhile).
    """

    supports_events = True

    def __init__(
        self,
        url: str,
        prefix: str = "distilcast:",
        *,
        connect_timeout: float = 0.25,
        socket_timeout: float = 0.25,
        retry_after: float = 1.0,
        warn_interval: float = 30.0,
        max_value_bytes: int = 64 * 1024 * 1024,
        ping_interval: float = 5.0,
    ) -> None:
        super().__init__()
        self.url = url
        self.prefix = prefix
        self.channel = f"{prefix}events"
        self.retry_after = retry_after
        self.warn_interval = warn_interval
        self.max_value_bytes = max_value_bytes
        self.ping_interval = ping_interval
        self._client_kwargs: dict[str, Any] = {
            "socket_connect_timeout": connect_timeout,
            "socket_timeout": socket_timeout,
        }
        # One immediate retry: after a Redis restart the first command on a pooled connection
        # fails and the retry reconnects; more retries would only stretch the outage latency.
        self._client: Redis = Redis.from_url(
            url, retry=Retry(NoBackoff(), 1), **self._client_kwargs
        )
        # Upper bound on any single operation, in case a socket timeout does not fire.
        self._op_timeout = connect_timeout + socket_timeout + 0.5
        self._down_until = 0.0
        self._ok = True
        self._last_warning = float("-inf")
        self._suppressed = 0

    def __repr__(self) -> str:
        return f"RedisCache({self._safe_url()!r}, prefix={self.prefix!r})"

    def _safe_url(self) -> str:
        # Never log a password embedded in the URL.
        scheme, sep, rest = self.url.partition("://")
        if sep and "@" in rest:
            rest = rest.rsplit("@", 1)[1]
        return f"{scheme}{sep}{rest}"

    @property
    def available(self) -> bool:
        return self._ok and time.monotonic() >= self._down_until

    @property
    def operation_timeout_s(self) -> float:
        """The longest any one Redis operation may keep a caller waiting (a frozen Redis)."""
        return self._op_timeout

    def describe(self, key: str) -> str:
        return f"{self._safe_url()} key {self.prefix}{key}"

    def _failed(self, what: str, exc: BaseException) -> None:
        self.stats.errors += 1
        self._ok = False
        self._down_until = time.monotonic() + self.retry_after
        now = time.monotonic()
        if now - self._last_warning >= self.warn_interval:
            more = f" ({self._suppressed} similar warnings suppressed)" if self._suppressed else ""
            log.warning(
                "Redis cache %s unavailable during %s: %s: %s; serving from the filesystem%s",
                self._safe_url(),
                what,
                type(exc).__name__,
                exc,
                more,
            )
            self._last_warning = now
            self._suppressed = 0
        else:
            self._suppressed += 1

    def _succeeded(self) -> None:
        if not self._ok:
            log.info("Redis cache %s reachable again", self._safe_url())
            self._ok = True

    def _skip(self) -> bool:
        return time.monotonic() < self._down_until

    async def get(self, key: str) -> bytes | None:
        if self._skip():
            self.stats.fallbacks += 1
            return None
        try:
            async with asyncio.timeout(self._op_timeout):
                value = await self._client.get(self.prefix + key)
        except _REDIS_ERRORS as exc:
            self._failed(f"GET {key}", exc)
            self.stats.fallbacks += 1
            return None
        self._succeeded()
        if value is None:
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        # decode_responses stays off, so this is always bytes; the check narrows the type.
        return value if isinstance(value, bytes) else str(value).encode()

    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        if len(value) > self.max_value_bytes or self._skip():
            return
        px = max(1, int(ttl * 1000)) if ttl is not None else None
        try:
            async with asyncio.timeout(self._op_timeout + len(value) / 50e6):
                await self._client.set(self.prefix + key, value, px=px)
        except _REDIS_ERRORS as exc:
            self._failed(f"SET {key}", exc)
            return
        self._succeeded()

    async def delete(self, *keys: str) -> None:
        if not keys or self._skip():
            return
        try:
            async with asyncio.timeout(self._op_timeout):
                await self._client.delete(*(self.prefix + k for k in keys))
        except _REDIS_ERRORS as exc:
            self._failed("DEL", exc)
            return
        self._succeeded()

    async def publish(self, event: AliasEvent) -> None:
        # Not skipped while Redis looks down: an event is worth one more (short) try.
        try:
            async with asyncio.timeout(self._op_timeout):
                await self._client.publish(self.channel, event.model_dump_json())
        except _REDIS_ERRORS as exc:
            self._failed("PUBLISH", exc)
            return
        self._succeeded()

    async def open_subscription(self) -> EventSubscription:
        # A dedicated client without retries: redis-py would otherwise reconnect and resubscribe
        # silently, and we could not tell that events were missed in between.
        client: Redis = Redis.from_url(self.url, retry=Retry(NoBackoff(), 0), **self._client_kwargs)
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            async with asyncio.timeout(self._op_timeout):
                await pubsub.subscribe(self.channel)
        except _REDIS_ERRORS as exc:
            await _close_quietly(pubsub, client)
            self._failed("SUBSCRIBE", exc)
            raise CacheUnavailable(f"cannot subscribe to {self.channel}: {exc}") from exc
        self._succeeded()
        return _RedisSubscription(self, client, pubsub)

    async def close(self) -> None:
        await self._client.aclose()


class _RedisSubscription(EventSubscription):
    def __init__(self, cache: RedisCache, client: Redis, pubsub: PubSub) -> None:
        self._cache = cache
        self._client = client
        self._pubsub = pubsub
        self._last_rx = time.monotonic()
        self._ping_sent: float | None = None

    async def get(self, timeout: float) -> AliasEvent | None:
        cache = self._cache
        interval = cache.ping_interval
        now = time.monotonic()
        # A half-open TCP connection reads as "no messages" forever. After `interval` of silence
        # we PING; no PONG within another `interval` means the connection is dead.
        if self._ping_sent is not None and now - self._ping_sent > interval:
            cache.stats.errors += 1
            raise CacheUnavailable("no reply to PING on the pub/sub connection")
        try:
            if self._ping_sent is None and now - self._last_rx >= interval:
                self._ping_sent = now
                async with asyncio.timeout(cache._op_timeout):
                    await self._pubsub.ping()
            message = await self._pubsub.get_message(
                ignore_subscribe_messages=True, timeout=min(timeout, interval)
            )
        except _REDIS_ERRORS as exc:
            cache._failed("pub/sub read", exc)
            raise CacheUnavailable(f"pub/sub connection lost: {exc}") from exc
        if message is None:
            return None
        self._last_rx = time.monotonic()
        self._ping_sent = None
        if message.get("type") != "message":
            return None  # a PONG
        try:
            return AliasEvent.model_validate_json(message["data"])
        except ValidationError as exc:
            log.warning("ignoring malformed alias event on %s: %s", cache.channel, exc)
            return None

    async def close(self) -> None:
        await _close_quietly(self._pubsub, self._client)


async def _close_quietly(pubsub: PubSub, client: Redis) -> None:
    # Closing a connection to a dead server may itself fail; there is nothing left to clean up.
    try:
        async with asyncio.timeout(1.0):
            await pubsub.aclose()
            await client.aclose()
    except (*_REDIS_ERRORS, RuntimeError) as exc:
        log.debug("ignoring error while closing a pub/sub connection: %s", exc)
