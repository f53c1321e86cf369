"""Fixtures: fixture registries, the real Redis, and the app served by uvicorn on loopback."""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import uvicorn

from models_registry.store import FilesystemStore
from service.app import create_app
from service.config import Settings
from tests.service.onnx_models import build_family, linear_bytes, manifest
from tests.strict import missing

LOOKBACK, HORIZON = 32, 8
NAME = "etth1-h96"
FIXED = "fixed7"  # a model with a fixed channel count (7), not channel-independent
TOKEN = "test-admin-token-0123456789"
REDIS_URL = os.environ.get("DISTILCAST_REDIS_URL", "redis://127.0.0.1:6379/15")


def make_registry(root: Path) -> FilesystemStore:
    store = FilesystemStore(root)
    build_family(store, NAME, LOOKBACK, HORIZON)
    m = store.register(
        manifest(FIXED, "student", LOOKBACK, HORIZON, architecture="last-value", channels=7),
        linear_bytes(LOOKBACK, HORIZON, channels=7),
    )
    store.set_alias(FIXED, "production", m.version)
    return store


class Served:
    """An app on a free loopback port, served by uvicorn in a background thread."""

    def __init__(self, settings: Settings) -> None:
        self.app = create_app(settings)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, log_level="warning", access_log=False,
                                timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    @property
    def services(self) -> Any:
        return self.app.state.services

    def start(self) -> Served:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()

    def client(self, **kw: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, **{"timeout": 30, **kw})


@contextmanager
def serving(**overrides: Any) -> Iterator[Served]:
    base: dict[str, Any] = {"admin_token": TOKEN, "alias_refresh_s": 0, "shadow_fraction": 0.0}
    served = Served(Settings(**{**base, **overrides})).start()
    try:
        yield served
    finally:
        served.stop()


def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(interval)


def window(n: int = LOOKBACK, channels: int = 3, start: float = 0.0) -> list[list[float]]:
    return [[start + t + 100.0 * c for c in range(channels)] for t in range(n)]


@pytest.fixture(scope="session")
def registry_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("registry")
    make_registry(root)
    return root


@pytest.fixture
def fresh_registry(tmp_path: Path) -> tuple[Path, FilesystemStore]:
    """A registry a test may change (promotions, new versions)."""
    return tmp_path, make_registry(tmp_path / "registry")


@pytest.fixture(scope="session")
def app_server(registry_root: Path) -> Iterator[Served]:
    """One embedded-cache app for the read-only tests."""
    with serving(registry_root=registry_root, max_body_bytes=256 * 1024,
                 max_series_per_request=50, max_points_per_request=200_000) as served:
        yield served


@pytest.fixture
def client(app_server: Served) -> Iterator[httpx.Client]:
    with app_server.client() as c:
        yield c


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The real Redis. Unreachable: a failure (skipped only with DISTILCAST_TEST_LENIENT=1)."""
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping()
    except redis.RedisError as exc:
        missing("redis", f"Redis at {REDIS_URL} is unreachable: {exc}")
    return REDIS_URL


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A fresh key prefix; DB 15 (the tests' database) is flushed before each test."""
    client = redis.Redis.from_url(redis_url)
    if client.connection_pool.connection_kwargs.get("db") == 15:
        client.flushdb()
    yield f"test-{uuid.uuid4().hex[:8]}:"
    client.close()
