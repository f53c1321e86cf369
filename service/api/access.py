"""Forecast access: optional API keys and per-client rate limits (docs/operations.md).

Keys are never stored: the settings (or the Redis set `<prefix>api-keys`) hold their sha256 hex
digests, and a request's `X-API-Key` is hashed and looked up. No key: 401; an unknown one: 403.

Rate limits use the `limits` library's moving window, in Redis when the service has a
`redis_url` (every replica counts against the same window) and in process memory otherwise.
Over the limit: 429 with `Retry-After`. If Redis cannot be reached the request is served (the
limiter fails open, logged and counted): refusing all traffic because the counter store is down
would turn a Redis outage into a full outage.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time

import redis.asyncio as aioredis
from limits import RateLimitItem, parse
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import MovingWindowRateLimiter
from starlette.types import Scope

from service import metrics
from service.config import Settings
from service.core.errors import Forbidden, RateLimited, Unauthorized

log = logging.getLogger(__name__)

KEY_HEADER = b"x-api-key"


def key_digest(key: str) -> str:
    """What goes into `DISTILCAST_API_KEYS` (or the Redis set) for `key`."""
    return hashlib.sha256(key.encode()).hexdigest()


def _limits_uri(redis_url: str) -> str:
    # limits names its async storages async+redis://, async+rediss://, async+redis+unix://.
    scheme, _, rest = redis_url.partition("://")
    return f"async+{ {'unix': 'redis+unix'}.get(scheme, scheme)}://{rest}"


class AccessControl:
    """`await check(scope)` before a forecast request is admitted; raises 401/403/429 errors."""

    def __init__(self, settings: Settings) -> None:
        self.digests = frozenset(settings.api_keys)
        self.keys_required = bool(self.digests) or settings.api_keys_redis
        self.keys_set = f"{settings.redis_prefix}api-keys"
        self._redis: aioredis.Redis | None = None
        if settings.api_keys_redis:
            if settings.redis_url is None:
                raise ValueError("api_keys_redis needs redis_url")
            self._redis = aioredis.Redis.from_url(settings.redis_url, socket_timeout=1.0,
                                                  socket_connect_timeout=1.0)
        self.item: RateLimitItem | None = None
        self.storage: Storage | None = None
        self.limiter: MovingWindowRateLimiter | None = None
        if settings.rate_limit:
            self.item = parse(settings.rate_limit)
            if settings.redis_url is not None:
                self.storage = RedisStorage(
                    _limits_uri(settings.redis_url), implementation="redispy",
                    key_prefix=f"{settings.redis_prefix}limits", socket_timeout=1.0,
                    socket_connect_timeout=1.0,
                )
            else:
                self.storage = MemoryStorage()
            self.limiter = MovingWindowRateLimiter(self.storage)

    @property
    def active(self) -> bool:
        return self.keys_required or self.limiter is not None

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()

    async def check(self, scope: Scope) -> None:
        client = await self._authenticate(scope)
        if self.limiter is not None:
            await self._limit(client)

    async def _authenticate(self, scope: Scope) -> str:
        """The client identity for the limiter: `key:<digest prefix>`, else `ip:<address>`."""
        if not self.keys_required:
            peer = scope.get("client")
            return f"ip:{peer[0] if peer else 'unknown'}"
        raw = next((v for k, v in scope["headers"] if k == KEY_HEADER), None)
        if not raw:
            raise Unauthorized("forecast routes need an API key: send X-API-Key",
                               field="X-API-Key")
        digest = hashlib.sha256(raw.strip()).hexdigest()
        if digest not in self.digests and not await self._in_redis(digest):
            raise Forbidden("unknown API key", field="X-API-Key")
        return f"key:{digest[:16]}"

    async def _in_redis(self, digest: str) -> bool:
        if self._redis is None:
            return False
        try:
            return bool(await self._redis.sismember(self.keys_set, digest))
        except (aioredis.RedisError, OSError) as exc:
            # Keys in the settings still work; keys only in Redis cannot be checked now.
            log.warning("API key lookup in Redis failed: %s", exc)
            metrics.REJECTIONS.labels("api_key_lookup_failed").inc()
            return False

    async def _limit(self, client: str) -> None:
        assert self.limiter is not None and self.item is not None
        try:
            allowed = await self.limiter.hit(self.item, client)
            if allowed:
                return
            stats = await self.limiter.get_window_stats(self.item, client)
        except Exception as exc:  # the storage's errors are not one class across backends
            log.warning("rate limiter unavailable, serving without a limit: %s", exc)
            metrics.REJECTIONS.labels("rate_limiter_down").inc()
            return
        wait = max(1, math.ceil(stats.reset_time - time.time()))
        raise RateLimited(f"rate limit {self.item} exceeded for this client",
                          retry_after_s=wait)
