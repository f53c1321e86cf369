"""The launch script (workers + Prometheus multiprocess mode) and the settings."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from service.config import Settings, get_settings
from tests.service.conftest import NAME, window

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def launched(env: dict[str, str]) -> Iterator[str]:
    """Run scripts/launch_service.sh until it is ready; yield its URL; on exit send SIGTERM and
    require exit status 0 (the script forwards the signal to uvicorn)."""
    inherited = {k: v for k, v in os.environ.items()
                 if k not in ("DISTILCAST_REDIS_URL", "PROMETHEUS_MULTIPROC_DIR")}
    env = {**inherited, "HOST": "127.0.0.1", "PYTHON": sys.executable,
           "DISTILCAST_SHADOW_FRACTION": "0", **env}
    proc = subprocess.Popen(["bash", str(ROOT / "scripts" / "launch_service.sh")], env=env,
                            cwd=ROOT, start_new_session=True)
    url = f"http://127.0.0.1:{env['PORT']}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "service did not start"
            time.sleep(0.2)
        yield url
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.slow
def test_launch_script_workers_aggregate_metrics(registry_root: Path, tmp_path: Path) -> None:
    metrics_dir = tmp_path / "prom"
    metrics_dir.mkdir()
    (metrics_dir / "counter_999999.db").write_bytes(b"stale")  # must be cleaned at start
    env = {"PORT": str(free_port()), "WORKERS": "2", "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
           "DISTILCAST_REGISTRY_ROOT": str(registry_root)}
    with launched(env) as url:
        n = 30
        for _ in range(n):  # a new connection each: the kernel spreads them over the workers
            r = httpx.post(f"{url}/v1/forecast", json={"model": NAME, "series": [
                {"id": "a", "values": window()}]}, timeout=10)
            assert r.status_code == 200
        text = httpx.get(f"{url}/metrics", timeout=10).text
        count = sum(float(line.split()[-1]) for line in text.splitlines()
                    if line.startswith("distilcast_request_duration_seconds_count")
                    and 'route="/v1/forecast"' in line)
        assert count == n
        assert not (metrics_dir / "counter_999999.db").exists()
        pids = {p.stem.rsplit("_", 1)[-1] for p in metrics_dir.glob("histogram_*.db")}
        assert len(pids) == 2, pids  # both workers wrote their own files


@pytest.mark.slow
def test_launch_script_one_worker_exits_0_on_sigterm(registry_root: Path) -> None:
    """uvicorn in one process re-raises SIGTERM after shutting down; the script reports 0."""
    env = {"PORT": str(free_port()), "WORKERS": "1",
           "DISTILCAST_REGISTRY_ROOT": str(registry_root)}
    with launched(env) as url:
        r = httpx.post(f"{url}/v1/forecast", json={"model": NAME, "series": [
            {"id": "a", "values": window()}]}, timeout=10)
        assert r.status_code == 200


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTILCAST_BATCH_MAX_SIZE", "64")
    monkeypatch.setenv("DISTILCAST_REDIS_URL", "redis://127.0.0.1:6379/15")
    monkeypatch.setenv("DISTILCAST_PROVIDERS", '["CPUExecutionProvider"]')
    s = Settings()
    assert s.batch_max_size == 64 and s.redis_url == "redis://127.0.0.1:6379/15"
    assert s.providers == ("CPUExecutionProvider",)
    assert Settings(redis_url="").redis_url is None  # empty: the embedded cache


@pytest.mark.parametrize("bad", [
    {"batch_max_size": 0}, {"batch_max_queue": 0}, {"shadow_fraction": 1.5},
    {"redis_url": "http://localhost"}, {"admin_token": "short"}, {"providers": ["Bogus"]},
    {"providers": []}, {"default_deadline_ms": 0}, {"max_body_bytes": 10},
])
def test_bad_settings_fail_fast(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        Settings(**bad)  # type: ignore[arg-type]


def test_settings_are_not_read_at_import() -> None:
    code = ("import service.app, service.config as c; "
            "assert c.get_settings.cache_info().currsize == 0; "
            "c.get_settings()")
    env = {**os.environ, "DISTILCAST_BATCH_MAX_SIZE": "0"}
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode != 0 and "batch_max_size" in r.stderr  # fails at get_settings()
    get_settings.cache_clear()


@pytest.mark.slow
def test_a_request_head_sent_too_slowly_is_closed(registry_root: Path) -> None:
    """Slowloris: a connection that sends nothing, and one that sends its head a byte at a time,
    are closed after DISTILCAST_HEAD_TIMEOUT_S; a prompt request on another connection is
    answered meanwhile, and a kept-alive connection is not cut by the head timer."""
    port = free_port()
    env = {"PORT": str(port), "WORKERS": "1", "DISTILCAST_HEAD_TIMEOUT_S": "1.5",
           "DISTILCAST_REGISTRY_ROOT": str(registry_root)}
    with launched(env):
        silent = socket.create_connection(("127.0.0.1", port), timeout=10)
        trickle = socket.create_connection(("127.0.0.1", port), timeout=10)
        opened = time.monotonic()
        head = b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-slow: " + b"a" * 100
        closed_at: float | None = None
        trickle.setblocking(False)
        for byte in head:
            try:
                trickle.send(bytes([byte]))
                if trickle.recv(1, socket.MSG_PEEK) == b"":
                    closed_at = time.monotonic()
                    break
            except BlockingIOError:
                pass
            except OSError:
                closed_at = time.monotonic()
                break
            time.sleep(0.05)
            if time.monotonic() - opened > 6:
                break
        assert closed_at is not None and 1.3 < closed_at - opened < 4.0
        silent.settimeout(5)
        assert silent.recv(1) == b""  # closed by the server, nothing answered
        assert time.monotonic() - opened < 6.0
        # A kept-alive connection idle for longer than the head timeout between two requests is
        # governed by uvicorn's keep-alive timeout (5 s), not by the head timer.
        with socket.create_connection(("127.0.0.1", port), timeout=5) as kept:
            for pause in (0.0, 2.0):
                time.sleep(pause)
                kept.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
                answer = b""
                while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
                    chunk = kept.recv(4096)
                    assert chunk, f"closed after {pause} s idle: {answer!r}"
                    answer += chunk
                assert answer.startswith(b"HTTP/1.1 200")
        silent.close()
        trickle.close()


def test_connections_of_the_workers_shared_socket_get_nodelay() -> None:
    """With several workers, uvicorn's supervisor binds `socket.socket(AF_INET)` (proto 0, not
    IPPROTO_TCP) and the workers serve it: asyncio then leaves Nagle's algorithm on for its
    connections, and `service.launch.nodelay` turns it off."""
    import asyncio

    from service.launch import nodelay

    async def main() -> tuple[int, int]:
        listener = socket.socket(socket.AF_INET)  # as uvicorn's Config.bind_socket does
        listener.bind(("127.0.0.1", 0))
        listener.setblocking(False)
        seen: list[tuple[int, int]] = []

        class Probe(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                sock = transport.get_extra_info("socket")
                before = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                nodelay(transport)
                seen.append((before, sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)))
                transport.close()

        server = await asyncio.get_running_loop().create_server(Probe, sock=listener)
        _, writer = await asyncio.open_connection(*listener.getsockname())
        while not seen:
            await asyncio.sleep(0.01)
        writer.close()
        server.close()
        return seen[0]

    before, after = asyncio.run(main())
    assert after != 0
    # asyncio's own check: documents why the call is needed (if this fails, asyncio sets it).
    assert before == 0


@pytest.mark.slow
def test_a_worker_that_dies_is_replaced_and_its_live_gauges_leave(registry_root: Path,
                                                                   tmp_path: Path) -> None:
    """SIGKILL one of two workers: the supervisor starts a replacement and marks the dead one
    (prometheus-client's mark_process_dead), so its live gauge file goes and /metrics keeps
    answering from both live workers."""
    metrics_dir = tmp_path / "prom"
    env = {"PORT": str(free_port()), "WORKERS": "2", "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
           "DISTILCAST_REGISTRY_ROOT": str(registry_root)}

    def live_pids() -> set[int]:
        return {int(p.stem.rsplit("_", 1)[-1]) for p in metrics_dir.glob("gauge_livesum_*.db")}

    with launched(env) as url:
        deadline = time.monotonic() + 30
        while len(live_pids()) < 2:
            assert time.monotonic() < deadline, live_pids()
            time.sleep(0.1)
        victim = min(live_pids())
        os.kill(victim, signal.SIGKILL)
        while victim in live_pids() or len(live_pids()) < 2:
            assert time.monotonic() < deadline + 30, (victim, live_pids())
            time.sleep(0.1)
        assert httpx.get(f"{url}/metrics", timeout=10).status_code == 200
