"""Registry facade with the embedded cache, and with a Redis that is not there at all."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from models_registry.cache import InProcessCache, RedisCache
from models_registry.errors import IntegrityError
from models_registry.manifest import AliasEvent
from models_registry.registry import Registry
from models_registry.store import FilesystemStore
from tests.models_registry.conftest import ManifestFactory, free_port

ONNX = b"\x08\x07fake-onnx-bytes"


def test_inprocess_cache_miss_then_hit(
    store: FilesystemStore, make_manifest: ManifestFactory
) -> None:
    m = store.register(make_manifest(), ONNX)

    async def main() -> None:
        reg = Registry(store)
        assert await reg.manifest(m.name, 1) == m
        assert (reg.stats.hits, reg.stats.misses) == (0, 1)
        assert await reg.manifest(m.name, 1) == m
        assert (reg.stats.hits, reg.stats.misses) == (1, 1)
        assert await reg.onnx_bytes(m.name, 1) == ONNX
        assert await reg.onnx_bytes(m.name, 1) == ONNX
        assert (reg.stats.hits, reg.stats.misses) == (2, 2)
        assert await reg.resolve(m.name) == (m.name, 1)
        await reg.close()

    asyncio.run(main())


def test_tampered_cache_entry_is_refused_then_healed(
    store: FilesystemStore, make_manifest: ManifestFactory
) -> None:
    m = store.register(make_manifest(), ONNX)

    async def main() -> None:
        cache = InProcessCache()
        reg = Registry(store, cache)
        await reg.onnx_bytes(m.name, 1)
        key = await reg._key("onnx", m.name, 1)
        await cache.set(key, ONNX[:-1] + b"X")
        with pytest.raises(IntegrityError) as info:
            await reg.onnx_bytes(m.name, 1)
        assert key in str(info.value) and m.sha256 is not None and m.sha256 in str(info.value)
        assert await reg.onnx_bytes(m.name, 1) == ONNX  # evicted, reloaded from the filesystem
        assert reg.stats.errors == 1

    asyncio.run(main())


def test_promote_notifies_subscribers(
    store: FilesystemStore, make_manifest: ManifestFactory
) -> None:
    store.register(make_manifest(), ONNX)
    store.register(make_manifest(), ONNX + b"2")

    async def main() -> None:
        seen: list[AliasEvent] = []
        seen_async: list[AliasEvent] = []

        async def async_cb(event: AliasEvent) -> None:
            seen_async.append(event)

        def broken_cb(event: AliasEvent) -> None:
            raise RuntimeError("a broken subscriber must not stop the others")

        reg = Registry(store)
        reg.subscribe(broken_cb)
        reg.subscribe(seen.append)
        unsubscribe = reg.subscribe(async_cb)
        # not started: delivered before promote returns
        event = await reg.promote("student-etth1", "production", 1)
        assert (event.version, event.previous, event.source) == (1, None, "local")
        assert seen == seen_async == [event]
        assert await reg.resolve("student-etth1") == ("student-etth1", 1)

        await reg.start()
        unsubscribe()
        await reg.promote("student-etth1", "production", 2)
        for _ in range(100):
            if len(seen) == 2:
                break
            await asyncio.sleep(0.01)
        assert [(e.version, e.previous) for e in seen] == [(1, None), (2, 1)]
        assert len(seen_async) == 1
        assert await reg.resolve("student-etth1") == ("student-etth1", 2)
        await reg.close()

    asyncio.run(main())


def test_embedded_registry_notices_promotions_from_other_processes(
    store: FilesystemStore, make_manifest: ManifestFactory
) -> None:
    store.register(make_manifest(), ONNX)

    async def main() -> None:
        reg = Registry(store, resync_interval=0.1)
        events: asyncio.Queue[AliasEvent] = asyncio.Queue()
        reg.subscribe(events.put_nowait)
        await reg.start()
        # what `python -m models_registry promote` does in another process without Redis
        FilesystemStore(store.root).set_alias("student-etth1", "canary", 1)
        event = await asyncio.wait_for(events.get(), timeout=2)
        assert (event.alias, event.version, event.source) == ("canary", 1, "resync")
        await reg.close()

    asyncio.run(main())


def test_unreachable_redis_falls_back_to_filesystem(
    store: FilesystemStore, make_manifest: ManifestFactory, caplog: pytest.LogCaptureFixture
) -> None:
    m = store.register(make_manifest(), ONNX)
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there

    async def main() -> None:
        reg = Registry(store, RedisCache(url, retry_after=0.05))
        events: list[AliasEvent] = []
        reg.subscribe(events.append)
        t0 = time.monotonic()
        await reg.start()  # must not hang on a missing Redis
        assert not reg.listening
        for _ in range(5):
            assert await reg.manifest(m.name, 1) == m
            assert await reg.onnx_bytes(m.name, 1) == ONNX
            assert await reg.resolve(m.name) == (m.name, 1)
            await asyncio.sleep(0.06)  # let the short back-off expire so Redis is retried
        await reg.promote(m.name, "production", 1)
        await asyncio.sleep(0.05)
        assert time.monotonic() - t0 < 3
        assert [e.version for e in events] == [1]
        assert reg.stats.errors >= 5 and reg.stats.fallbacks >= 5 and reg.stats.hits == 0
        assert not reg.cache.available
        await reg.close()

    with caplog.at_level(logging.WARNING, logger="models_registry"):
        asyncio.run(main())
    warnings = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(warnings) == 1  # rate-limited, not one per read
    assert store.aliases(m.name) == {"production": 1, "staging": 1}
