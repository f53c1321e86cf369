"""Integration tests against real Redis servers (see conftest: they fail, not skip, in CI)."""

from __future__ import annotations

import asyncio
import hashlib
import time

import pytest
import redis

from models_registry.cache import RedisCache
from models_registry.errors import IntegrityError
from models_registry.manifest import AliasEvent
from models_registry.registry import Registry
from models_registry.store import FilesystemStore
from tests.models_registry.conftest import ManifestFactory, RedisServer

ONNX = b"\x08\x07" + bytes(range(256)) * 4


def test_redis_cache_miss_then_hit(
    redis_url: str, store: FilesystemStore, make_manifest: ManifestFactory
) -> None:
    m = store.register(make_manifest(), ONNX)

    async def main() -> None:
        reg = Registry(store, RedisCache(redis_url))
        assert await reg.manifest(m.name, 1) == m
        assert await reg.onnx_bytes(m.name, 1) == ONNX
        assert (reg.stats.hits, reg.stats.misses) == (0, 2)
        assert await reg.manifest(m.name, 1) == m
        assert await reg.onnx_bytes(m.name, 1) == ONNX
        assert (reg.stats.hits, reg.stats.misses, reg.stats.errors) == (2, 2, 0)
        await reg.close()

        # a second replica shares the cache: hits straight away
        other = Registry(FilesystemStore(store.root), RedisCache(redis_url))
        assert await other.onnx_bytes(m.name, 1) == ONNX
        assert (other.stats.hits, other.stats.misses) == (1, 0)
        await other.close()

    asyncio.run(main())
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    keys = sorted(client.keys("*"))
    client.close()
    sid = store.store_id
    assert keys == [
        f"distilcast:{sid}:manifest:student-etth1:1",
        f"distilcast:{sid}:onnx:student-etth1:1",
    ]


def test_tampered_bytes_in_redis_are_refused(
    redis_url: str, store: FilesystemStore, make_manifest: ManifestFactory
) -> None:
    m = store.register(make_manifest(), ONNX)
    key = f"distilcast:{store.store_id}:onnx:{m.name}:1"
    tampered = bytearray(ONNX)
    tampered[10] ^= 0xFF
    client = redis.Redis.from_url(redis_url)

    async def main() -> None:
        reg = Registry(store, RedisCache(redis_url))
        await reg.onnx_bytes(m.name, 1)  # warm the cache
        client.set(key, bytes(tampered))
        with pytest.raises(IntegrityError) as info:
            await reg.onnx_bytes(m.name, 1)
        message = str(info.value)
        assert key in message and "model.onnx" in message
        assert m.sha256 is not None and m.sha256 in message
        assert hashlib.sha256(bytes(tampered)).hexdigest() in message
        assert client.get(key) is None  # evicted
        assert await reg.onnx_bytes(m.name, 1) == ONNX  # healed from the filesystem
        assert client.get(key) == ONNX
        await reg.close()

    try:
        asyncio.run(main())
    finally:
        client.close()


def test_promotion_event_reaches_a_second_registry(
    redis_url: str, store: FilesystemStore, make_manifest: ManifestFactory
) -> None:
    store.register(make_manifest(), ONNX)
    store.register(make_manifest(), ONNX + b"2")
    store.set_alias("student-etth1", "production", 1)

    async def main() -> None:
        admin = Registry(store, RedisCache(redis_url))
        replica = Registry(FilesystemStore(store.root), RedisCache(redis_url))
        received: asyncio.Queue[AliasEvent] = asyncio.Queue()
        replica.subscribe(received.put_nowait)
        await replica.start()
        assert replica.listening
        assert await replica.resolve("student-etth1") == ("student-etth1", 1)  # alias map cached

        t0 = time.monotonic()
        await admin.promote("student-etth1", "production", 2)
        event = await asyncio.wait_for(received.get(), timeout=1.0)
        assert time.monotonic() - t0 < 1.0
        assert (event.name, event.alias, event.version, event.previous, event.source) == (
            "student-etth1",
            "production",
            2,
            1,
            "remote",
        )
        # the promoter refreshed the alias map in Redis: no stale read in the replica
        assert await replica.resolve("student-etth1") == ("student-etth1", 2)
        await asyncio.sleep(0.1)
        assert received.empty()  # exactly one event per promotion
        await admin.close()
        await replica.close()

    asyncio.run(main())


def test_redis_stopped_mid_test(
    redis_server: RedisServer, store: FilesystemStore, make_manifest: ManifestFactory
) -> None:
    m = store.register(make_manifest(), ONNX)
    store.register(make_manifest(), ONNX + b"2")
    store.set_alias(m.name, "production", 1)

    async def main() -> None:
        # resync_interval is long, so only the reconnect can explain the event below
        replica = Registry(
            store,
            RedisCache(redis_server.url, retry_after=0.1),
            resync_interval=60,
            max_reconnect_delay=0.3,
        )
        received: asyncio.Queue[AliasEvent] = asyncio.Queue()
        replica.subscribe(received.put_nowait)
        await replica.start()
        assert replica.listening
        assert await replica.onnx_bytes(m.name, 1) == ONNX  # cached now

        redis_server.stop()
        errors_before = replica.stats.errors
        t0 = time.monotonic()
        assert await replica.manifest(m.name, 1) == m
        assert await replica.onnx_bytes(m.name, 1) == ONNX
        assert await replica.resolve(m.name) == (m.name, 1)
        assert time.monotonic() - t0 < 1.0  # no hanging on the dead server
        assert replica.stats.errors > errors_before
        assert replica.stats.fallbacks > 0

        # another process promotes while Redis is down: its publish is lost
        admin = Registry(FilesystemStore(store.root), RedisCache(redis_server.url))
        await admin.promote(m.name, "production", 2)
        await admin.close()
        assert received.empty()
        for _ in range(50):
            if not replica.listening:
                break
            await asyncio.sleep(0.02)
        assert not replica.listening

        redis_server.start()  # same port, empty
        event = await asyncio.wait_for(received.get(), timeout=5)
        assert (event.alias, event.version, event.previous, event.source) == (
            "production",
            2,
            1,
            "resync",
        )
        assert replica.listening
        assert await replica.resolve(m.name) == (m.name, 2)
        await replica.close()

    asyncio.run(main())


def test_unresponsive_redis_is_detected_by_ping(
    redis_server: RedisServer, store: FilesystemStore, make_manifest: ManifestFactory
) -> None:
    """A server that stops answering (as behind a network partition) is noticed, not waited on."""
    m = store.register(make_manifest(), ONNX)

    async def main() -> None:
        replica = Registry(
            store,
            RedisCache(redis_server.url, ping_interval=0.2, retry_after=0.1),
            resync_interval=60,
            max_reconnect_delay=0.2,
        )
        received: asyncio.Queue[AliasEvent] = asyncio.Queue()
        replica.subscribe(received.put_nowait)
        await replica.start()
        assert replica.listening

        def freeze() -> None:
            client = redis.Redis.from_url(redis_server.url, socket_timeout=5)
            client.execute_command("DEBUG", "SLEEP", "1.5")
            client.close()

        frozen = asyncio.create_task(asyncio.to_thread(freeze))
        await asyncio.sleep(0.1)
        t0 = time.monotonic()
        assert await replica.onnx_bytes(m.name, 1) == ONNX  # served from the filesystem
        assert time.monotonic() - t0 < 1.0  # short socket timeouts, no hanging
        FilesystemStore(store.root).set_alias(m.name, "production", 1)  # no event published
        for _ in range(100):
            if not replica.listening:
                break
            await asyncio.sleep(0.02)
        assert not replica.listening  # the unanswered PING gave it away
        await frozen
        event = await asyncio.wait_for(received.get(), timeout=3)
        assert (event.alias, event.version, event.source) == ("production", 1, "resync")
        await replica.close()

    asyncio.run(main())
