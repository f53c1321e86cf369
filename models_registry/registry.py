"""Async registry facade for the service: filesystem store + cache + alias events.

The filesystem is the source of truth; the cache only ever saves work:

* manifests and ONNX bytes are cached under `<store id>:<kind>:<name>:<version>`. Versions are
  immutable, so these entries never go stale; the store id changes if the registry root is
  recreated, so a reused version number cannot hit an old entry.
* ONNX bytes are checked against the sha256 in the manifest *read from the filesystem* before
  use, so neither a tampered nor a stale cache entry is ever served.
* the alias map is cached briefly (`alias_ttl`), written on every promotion and refreshed on
  resynchronisation.

Alias events: `promote()` writes the filesystem, then the cache, then publishes. Every process
running `start()` listens; an event is a hint to re-read that alias from the filesystem, and
callbacks receive what the filesystem says. Because of that, duplicated, reordered or echoed
events are harmless, and after a reconnect (or every `resync_interval`) the whole alias state is
re-read and differences are delivered as `source="resync"` events: nothing missed is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from types import TracebackType

from pydantic import ValidationError

from models_registry.cache import Cache, CacheStats, EventSubscription, InProcessCache, RedisCache
from models_registry.errors import (
    AliasNotFound,
    CacheUnavailable,
    IntegrityError,
    ModelNotFound,
    RegistryError,
)
from models_registry.manifest import (
    DEFAULT_ALIAS,
    AliasChange,
    AliasEvent,
    Manifest,
    check_name,
    check_version,
)
from models_registry.store import FilesystemStore, parse_ref, sha256_hex

log = logging.getLogger(__name__)

AliasCallback = Callable[[AliasEvent], Awaitable[None] | None]
_AliasState = dict[tuple[str, str], int]

_DAY = 24 * 3600.0


class Registry:
    """Async access to a `FilesystemStore` through a cache (docs/contracts.md, Registry API).

    Use as `async with Registry(store, cache) as reg:` or call `await reg.start()` /
    `await reg.close()`; reads work without `start()`, which only runs the event listener.
    """

    def __init__(
        self,
        store: FilesystemStore,
        cache: Cache | None = None,
        *,
        alias_ttl: float = 5.0,
        artifact_ttl: float | None = 7 * _DAY,
        resync_interval: float = 10.0,
        max_reconnect_delay: float = 2.0,
    ) -> None:
        self.store = store
        self.cache: Cache = cache if cache is not None else InProcessCache()
        self.alias_ttl = alias_ttl
        self.artifact_ttl = artifact_ttl
        self.resync_interval = resync_interval
        self.max_reconnect_delay = max_reconnect_delay
        self._callbacks: list[AliasCallback] = []
        self._known: _AliasState = {}
        self._state_lock = asyncio.Lock()
        self._queue: asyncio.Queue[AliasEvent] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._first_attempt = asyncio.Event()
        self._subscribed = False
        self._store_id: str | None = None
        self._last_resync = 0.0

    @property
    def stats(self) -> CacheStats:
        return self.cache.stats

    @property
    def listening(self) -> bool:
        """True while the pub/sub subscription is live (False when embedded or Redis is down)."""
        return self._subscribed

    async def __aenter__(self) -> Registry:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- keys ------------------------------------------------------------------------------------

    async def _key(self, kind: str, name: str, version: int | None = None) -> str:
        if self._store_id is None:
            self._store_id = await asyncio.to_thread(lambda: self.store.store_id)
        suffix = "" if version is None else f":{version}"
        return f"{self._store_id}:{kind}:{name}{suffix}"

    # -- reads -----------------------------------------------------------------------------------

    async def list_models(self) -> list[str]:
        return await asyncio.to_thread(self.store.list_models)

    async def list_versions(self, name: str) -> list[int]:
        return await asyncio.to_thread(self.store.list_versions, name)

    async def manifest(self, name: str, version: int) -> Manifest:
        check_name(name)
        check_version(version)
        key = await self._key("manifest", name, version)
        raw = await self.cache.get(key)
        if raw is not None:
            try:
                cached = Manifest.model_validate_json(raw)
            except ValidationError:
                cached = None
            if cached is not None and cached.name == name and cached.version == version:
                return cached
            self.stats.errors += 1
            log.warning("dropping unreadable cache entry %s", self.cache.describe(key))
            await self.cache.delete(key)
        manifest = await asyncio.to_thread(self.store.manifest, name, version)
        await self.cache.set(key, manifest.model_dump_json().encode(), self.artifact_ttl)
        return manifest

    async def onnx_bytes(self, name: str, version: int) -> bytes:
        """ONNX bytes, sha256-verified whether they come from the cache or the filesystem."""
        # The expected hash comes from the filesystem manifest (a few hundred bytes), never from
        # the cache: a cache holding a consistent but forged manifest+bytes pair must not pass.
        manifest = await asyncio.to_thread(self.store.manifest, name, version)
        if manifest.kind == "ensemble":
            raise RegistryError(f"{name}@{version} is an ensemble group: it has no model.onnx")
        key = await self._key("onnx", name, version)
        raw = await self.cache.get(key)
        if raw is not None:
            actual = await asyncio.to_thread(sha256_hex, raw)
            if actual == manifest.sha256:
                return raw
            self.stats.errors += 1
            # Evict, so the next load heals from the filesystem; but refuse this one loudly: a
            # tampered cache is an incident, not something to paper over.
            await self.cache.delete(key)
            path = self.store.onnx_path(name, version)
            source = f"{self.cache.describe(key)} (cached copy of {path})"
            log.error("corrupt cache entry: %s", source)
            raise IntegrityError(source, manifest.sha256, actual)
        data = await asyncio.to_thread(self.store.onnx_bytes, name, version)
        await self.cache.set(key, data, self.artifact_ttl)
        return data

    async def aliases(self, name: str) -> dict[str, int]:
        check_name(name)
        key = await self._key("aliases", name)
        raw = await self.cache.get(key)
        if raw is not None:
            try:
                data = json.loads(raw)
                return {str(k): check_version(v) for k, v in data.items()}
            except (ValueError, AttributeError, RegistryError):
                self.stats.errors += 1
                log.warning("dropping unreadable cache entry %s", self.cache.describe(key))
                await self.cache.delete(key)
        return await self._refresh_aliases(name)

    async def _refresh_aliases(self, name: str) -> dict[str, int]:
        aliases = await asyncio.to_thread(self.store.aliases, name)
        key = await self._key("aliases", name)
        await self.cache.set(key, json.dumps(aliases).encode(), self.alias_ttl)
        return aliases

    async def resolve(self, ref: str) -> tuple[str, int]:
        """`"name"` (production alias, else latest), `"name@alias"` or `"name@3"` -> (name, v)."""
        name, selector = parse_ref(ref)
        if isinstance(selector, int):
            # Existence is checked on the filesystem (a stat), not via a cached manifest, which
            # may outlive a version deleted by gc.
            return await asyncio.to_thread(self.store.resolve, ref)
        aliases = await self.aliases(name)
        if selector is None:
            if DEFAULT_ALIAS in aliases:
                return name, aliases[DEFAULT_ALIAS]
            return name, await asyncio.to_thread(self.store.latest_version, name)
        if selector not in aliases:
            raise AliasNotFound(name, selector)
        return name, aliases[selector]

    # -- promotion and events --------------------------------------------------------------------

    def subscribe(self, callback: AliasCallback) -> Callable[[], None]:
        """Call `callback(event)` (sync or async) on every alias change; returns an unsubscribe.

        Callbacks run one at a time, in order, on the listener's task once `start()` ran; an
        exception in one is logged and does not stop the others.
        """
        self._callbacks.append(callback)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._callbacks.remove(callback)

        return unsubscribe

    async def promote(
        self,
        name: str,
        alias: str,
        version: int,
        *,
        force: bool = False,
        actor: str = "registry",
        tolerance: float | None = None,
    ) -> AliasEvent:
        """Point `alias` at `version`: filesystem first (through the promotion gate, recorded in
        the history: `FilesystemStore.change_alias`), then cache and pub/sub event. Raises
        `PromotionRefused` for a worse version on `production` unless `force`."""
        event, _ = await self.change_alias(
            name, alias, version, force=force, actor=actor, tolerance=tolerance
        )
        return event

    async def change_alias(
        self,
        name: str,
        alias: str,
        version: int,
        *,
        force: bool = False,
        actor: str = "registry",
        tolerance: float | None = None,
    ) -> tuple[AliasEvent, AliasChange]:
        """`promote`, also returning the history line written (with the gate's figures)."""
        async with self._state_lock:
            change = await asyncio.to_thread(
                self.store.change_alias, name, alias, version,
                actor=actor, force=force, tolerance=tolerance,
            )
            self._known[(name, alias)] = version
            event = AliasEvent(
                name=name, alias=alias, version=version, previous=change.previous,
                source="local",
            )
            # The promotion is durable at this point; a cache failure below is logged and counted
            # and other replicas still catch up on their next resync.
            await self._refresh_aliases(name)
            await self.cache.publish(event)
            self._queue.put_nowait(event)
        if not self._tasks:
            await self._drain()
        return event, change

    async def history(self, name: str) -> list[AliasChange]:
        """Every alias change of `name`, oldest first (from the filesystem)."""
        check_name(name)
        return await asyncio.to_thread(self.store.history, name)

    async def start(self) -> None:
        """Start the event listener; returns once the first subscription attempt has finished."""
        if self._tasks:
            return
        self._known, _ = await asyncio.to_thread(self._snapshot)
        self._last_resync = time.monotonic()
        self._first_attempt.clear()
        listener = asyncio.create_task(self._listen_loop(), name="registry-listen")
        self._tasks = [
            asyncio.create_task(self._dispatch_loop(), name="registry-dispatch"),
            listener,
        ]
        waiter = asyncio.create_task(self._first_attempt.wait())
        await asyncio.wait({waiter, listener}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()

    async def close(self) -> None:
        """Stop the listener and close the cache."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._subscribed = False
        await self.cache.close()

    async def resync(self) -> list[AliasEvent]:
        """Re-read every alias from the filesystem and deliver what changed since last seen."""
        return await self._resync(refresh_all=False)

    def _snapshot(self) -> tuple[_AliasState, set[str]]:
        """Every alias on the filesystem, and the names whose alias map could not be read."""
        state: _AliasState = {}
        unreadable: set[str] = set()
        for name in self.store.list_models():
            try:
                aliases = self.store.aliases(name)
            except ModelNotFound:
                continue  # deleted between listing and reading
            except RegistryError as exc:
                log.warning("skipping %s during alias resync: %s", name, exc)
                unreadable.add(name)
                continue
            for alias, version in aliases.items():
                state[(name, alias)] = version
        return state, unreadable

    async def _resync(self, *, refresh_all: bool) -> list[AliasEvent]:
        async with self._state_lock:
            self._last_resync = time.monotonic()
            current, unreadable = await asyncio.to_thread(self._snapshot)
            # What we cannot read now we keep believing, rather than forgetting it and announcing
            # every alias of that model as new once the file is readable again.
            current.update({k: v for k, v in self._known.items() if k[0] in unreadable})
            events = [
                AliasEvent(
                    name=name,
                    alias=alias,
                    version=version,
                    previous=self._known.get((name, alias)),
                    source="resync",
                )
                for (name, alias), version in sorted(current.items())
                if self._known.get((name, alias)) != version
            ]
            changed = {e.name for e in events}
            # Removed aliases have no event type; forgetting them is enough.
            self._known = current
            names = {name for name, _ in current} if refresh_all else changed
            for name in sorted(names):
                with contextlib.suppress(RegistryError):
                    await self._refresh_aliases(name)
            for event in events:
                log.info(
                    "alias %s@%s changed to %d (resync)", event.name, event.alias, event.version
                )
                self._queue.put_nowait(event)
        if not self._tasks:
            await self._drain()
        return events

    async def _apply_remote(self, hint: AliasEvent) -> None:
        async with self._state_lock:
            try:
                aliases = await asyncio.to_thread(self.store.aliases, hint.name)
            except RegistryError as exc:
                log.warning("ignoring alias event for %s: %s", hint.name, exc)
                return
            key = (hint.name, hint.alias)
            version = aliases.get(hint.alias)
            # Equal to what we know: our own echo, a duplicate, or a stale event overtaken by a
            # newer promotion that we have already applied.
            if version is None or version == self._known.get(key):
                return
            event = AliasEvent(
                name=hint.name,
                alias=hint.alias,
                version=version,
                previous=self._known.get(key),
                source="remote",
            )
            self._known[key] = version
            self._queue.put_nowait(event)

    async def _deliver(self, event: AliasEvent) -> None:
        for callback in list(self._callbacks):
            try:
                result = callback(event)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("alias event callback %r failed for %s", callback, event)

    async def _drain(self) -> None:
        while not self._queue.empty():
            await self._deliver(self._queue.get_nowait())

    async def _dispatch_loop(self) -> None:
        while True:
            event = await self._queue.get()
            await self._deliver(event)

    async def _listen_loop(self) -> None:
        delay = 0.1
        while True:
            try:
                delay = await self._listen_once(delay)
            except asyncio.CancelledError:
                raise
            except Exception:
                # The listener must outlive anything unexpected (a flaky filesystem, a bug in a
                # corner case): without it this replica would stop hearing about promotions.
                log.exception("alias event listener failed; restarting it")
                self._first_attempt.set()
                await asyncio.sleep(self.max_reconnect_delay)

    async def _listen_once(self, delay: float) -> float:
        """One subscription attempt (or one poll when the cache has no pub/sub); returns the
        delay before the next attempt."""
        if not self.cache.supports_events:
            self._first_attempt.set()
            await asyncio.sleep(self.resync_interval)
            await self._resync(refresh_all=False)
            return delay
        try:
            subscription = await self.cache.open_subscription()
        except CacheUnavailable as exc:
            self._first_attempt.set()
            log.debug("alias event subscription unavailable: %s", exc)
            # Redis is down: keep noticing promotions made directly on the filesystem.
            if time.monotonic() - self._last_resync >= self.resync_interval:
                await self._resync(refresh_all=False)
            await asyncio.sleep(delay)
            return min(delay * 2, self.max_reconnect_delay)
        try:
            await self._listen(subscription)
        except CacheUnavailable as exc:
            log.warning("alias event subscription lost (%s); will resync on reconnect", exc)
        finally:
            self._subscribed = False
            await subscription.close()
        return 0.1

    async def _listen(self, subscription: EventSubscription) -> None:
        self._subscribed = True
        # Subscribed first, then re-read: anything promoted before this point is in the
        # filesystem, anything after arrives as a message.
        await self._resync(refresh_all=True)
        self._first_attempt.set()
        while True:
            hint = await subscription.get(timeout=1.0)
            if hint is not None:
                await self._apply_remote(hint)
            if time.monotonic() - self._last_resync >= self.resync_interval:
                await self._resync(refresh_all=False)


def open_registry(
    root: str | os.PathLike[str], redis_url: str | None = None, prefix: str = "distilcast:"
) -> Registry:
    """A Registry on `root`, cached in Redis when `redis_url` is given, else in process."""
    cache: Cache = RedisCache(redis_url, prefix) if redis_url else InProcessCache()
    return Registry(FilesystemStore(root), cache)
