"""`python -m models_registry` through real subprocesses, as an operator would run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import redis

from models_registry.manifest import ModelRef
from models_registry.store import FilesystemStore
from tests.models_registry.conftest import ManifestFactory


def cli(root: Path, *args: str, redis_url: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILCAST_")}
    env["DISTILCAST_REGISTRY_ROOT"] = str(root)
    if redis_url:
        env["DISTILCAST_REDIS_URL"] = redis_url
    return subprocess.run(
        [sys.executable, "-m", "models_registry", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )


def _populate(store: FilesystemStore, make_manifest: ManifestFactory) -> None:
    for i in range(3):
        store.register(make_manifest(), bytes([i]) * 10)
    store.register(make_manifest(name="teacher-a", kind="teacher"), b"t")
    store.register_group("teachers", [ModelRef(name="teacher-a", version=1)])


def test_cli_list_show_verify_gc(store: FilesystemStore, make_manifest: ManifestFactory) -> None:
    _populate(store, make_manifest)
    store.set_alias("student-etth1", "production", 1)

    out = cli(store.root, "list")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split("\t") == [
        "student-etth1",
        "student",
        "versions=1,2,3",
        "aliases: production=1 staging=3",
    ]
    assert lines[2].startswith("teachers\tensemble")

    out = cli(store.root, "show", "student-etth1")  # bare name: production
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["version"] == 1
    out = cli(store.root, "show", "student-etth1@3")
    assert json.loads(out.stdout)["version"] == 3

    out = cli(store.root, "verify")
    assert (out.returncode, out.stdout.strip()) == (0, "ok: 5 version(s) of 3 model(s) verified")

    out = cli(store.root, "gc", "--keep", "1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["deleted student-etth1@2", "deleted 1 version(s)"]
    assert store.list_versions("student-etth1") == [1, 3]

    onnx = store.root / "student-etth1" / "3" / "model.onnx"
    onnx.write_bytes(b"\xff" + onnx.read_bytes()[1:])
    out = cli(store.root, "verify", "student-etth1")
    assert out.returncode == 1
    assert out.stdout.startswith(f"student-etth1@3: integrity check failed for {onnx}")


def test_cli_errors_are_one_line_with_exit_codes(store: FilesystemStore) -> None:
    out = cli(store.root, "show", "nobody")
    assert (out.returncode, out.stderr) == (1, "error: model 'nobody' not found\n")
    out = cli(store.root, "show", "../etc@1")
    assert out.returncode == 2 and out.stderr.startswith("error: invalid model name '../etc'")
    assert len(out.stderr.splitlines()) == 1
    out = cli(store.root, "gc", "--keep", "0")
    assert out.returncode == 2
    out = cli(store.root, "frobnicate")
    assert out.returncode == 2  # argparse usage error
    out = cli(store.root, "list")
    assert (out.returncode, out.stdout.startswith("no models")) == (0, True)


def test_cli_promote_publishes_to_redis(
    redis_url: str, store: FilesystemStore, make_manifest: ManifestFactory
) -> None:
    _populate(store, make_manifest)
    client = redis.Redis.from_url(redis_url)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe("distilcast:events")
    try:
        out = cli(store.root, "promote", "student-etth1", "2", redis_url=redis_url)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "student-etth1@production: unset -> 2"
        deadline = time.monotonic() + 2
        message = None
        while message is None and time.monotonic() < deadline:
            # the subscribe confirmation reads as None too, hence the loop
            message = pubsub.get_message(timeout=0.5)
        assert message is not None
        event = json.loads(message["data"])
        assert (event["name"], event["alias"], event["version"]) == (
            "student-etth1",
            "production",
            2,
        )

        out = cli(store.root, "promote", "teachers", "1", "--alias", "staging")
        assert out.returncode == 0, out.stderr  # no Redis configured: filesystem only
        assert store.aliases("teachers") == {"staging": 1}
        out = cli(store.root, "promote", "student-etth1", "7")
        assert (out.returncode, out.stderr) == (
            1,
            "error: model 'student-etth1' has no version 7\n",
        )
    finally:
        pubsub.close()
        client.close()
