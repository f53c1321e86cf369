"""Fixtures for the models_registry tests: a tmp store, manifests and real Redis servers."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.exceptions import RedisError

from models_registry.manifest import Manifest
from models_registry.store import FilesystemStore
from tests.strict import missing

REDIS_URL = os.environ.get("DISTILCAST_REDIS_URL", "redis://127.0.0.1:6379/15")


def _unavailable(reason: str, what: str = "redis") -> None:
    """Fail (a skipped integration test is a silent gap); skip only when a developer opted out."""
    missing(what, reason)


@pytest.fixture
def redis_url() -> Iterator[str]:
    """The shared test Redis (DISTILCAST_REDIS_URL, DB 15 by default), flushed around each test."""
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=0.5, socket_timeout=2)
    try:
        client.ping()
    except RedisError as exc:
        client.close()
        _unavailable(f"Redis at {REDIS_URL} is unreachable: {exc}")
    db = int(client.connection_pool.connection_kwargs.get("db", 0))
    if db == 0:
        client.close()
        pytest.fail(f"refusing to flush DB 0 of {REDIS_URL}: use a dedicated test DB (e.g. /15)")
    client.flushdb()
    try:
        yield REDIS_URL
    finally:
        client.flushdb()
        client.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A private redis-server on its own port, which a test may kill and restart."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
                # DEBUG SLEEP lets a test freeze the server the way a network partition would
                "--enable-debug-command",
                "local",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.2, socket_timeout=0.5)
        deadline = time.monotonic() + 5
        try:
            while True:
                try:
                    client.ping()
                    return
                except RedisError:
                    if time.monotonic() > deadline or self.proc.poll() is not None:
                        raise
                    time.sleep(0.02)
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)
        self.proc = None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A dedicated, started redis-server; killed at the end of the test whatever happens."""
    if shutil.which("redis-server") is None:
        _unavailable("redis-server is not installed", "redis-server")
    workdir = tmp_path / "redis"
    workdir.mkdir()
    server = RedisServer(workdir)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def store(tmp_path: Path) -> FilesystemStore:
    return FilesystemStore(tmp_path / "registry")


ManifestFactory = Callable[..., Manifest]


def build_manifest(name: str = "student-etth1", **overrides: Any) -> Manifest:
    fields: dict[str, Any] = {
        "kind": "student",
        "architecture": "mlp",
        "lookback": 8,
        "horizon": 4,
        "channels": None,
        "dataset": {"name": "ETTh1", "file": "data/ETTh1.csv"},
        "metrics": {"val_mse": 0.4, "test_mse": 0.42},
        "code_version": "test",
    }
    fields.update(overrides)
    return Manifest(name=name, **fields)


@pytest.fixture
def make_manifest() -> ManifestFactory:
    return build_manifest
