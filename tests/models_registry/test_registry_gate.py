"""The promotion gate and the alias history: store, async Registry (with the real Redis cache)
and the `python -m models_registry` CLI in real subprocesses."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest

from models_registry.errors import PromotionRefused
from models_registry.registry import Registry
from models_registry.store import FilesystemStore
from tests.models_registry.conftest import ManifestFactory
from tests.models_registry.test_registry_cli import cli

NAME = "student-etth1"


def _versions(store: FilesystemStore, make_manifest: ManifestFactory, *val_mse: float) -> None:
    for i, mse in enumerate(val_mse):
        store.register(make_manifest(metrics={"val_mse": mse, "test_mse": mse}), bytes([i]) * 8)


def test_register_puts_the_new_version_on_staging(
    store: FilesystemStore, make_manifest: ManifestFactory
) -> None:
    _versions(store, make_manifest, 0.40, 0.41)
    assert store.aliases(NAME) == {"staging": 2}
    history = store.history(NAME)
    assert [(c.alias, c.previous, c.version, c.actor) for c in history] == [
        ("staging", None, 1, "register"),
        ("staging", 1, 2, "register"),
    ]


def test_worse_version_refused_with_both_figures_then_forced(
    store: FilesystemStore, make_manifest: ManifestFactory
) -> None:
    _versions(store, make_manifest, 0.159, 0.243, 0.160)
    store.set_alias(NAME, "production", 1, actor="test")

    with pytest.raises(PromotionRefused) as refused:
        store.set_alias(NAME, "production", 2, actor="test")
    message = str(refused.value)
    assert "0.243" in message and "0.159" in message and "version 1" in message
    assert (refused.value.candidate, refused.value.current) == (0.243, 0.159)
    assert store.aliases(NAME)["production"] == 1  # nothing moved

    # Within the default 1% tolerance: 0.160 <= 0.159 * 1.01.
    assert store.set_alias(NAME, "production", 3, actor="test") == 1
    # A tighter tolerance refuses what the default allows (3 -> back to 1 is better: allowed).
    store.set_alias(NAME, "production", 1, actor="test")
    with pytest.raises(PromotionRefused):
        store.set_alias(NAME, "production", 3, actor="test", tolerance=0.0)

    change = store.change_alias(NAME, "production", 2, actor="ops", force=True)
    assert change.forced and change.gate is not None
    assert (change.gate.candidate, change.gate.current, change.gate.current_version) == (
        0.243, 0.159, 1,
    )
    last = store.history(NAME)[-1]
    assert (last.alias, last.previous, last.version, last.actor, last.forced) == (
        "production", 1, 2, "ops", True,
    )
    # Only production is gated: staging takes any version.
    assert store.set_alias(NAME, "staging", 2) == 3


def test_candidate_without_the_metric_is_refused(
    store: FilesystemStore, make_manifest: ManifestFactory
) -> None:
    _versions(store, make_manifest, 0.2)
    store.register(make_manifest(metrics={}), b"no-metrics")
    store.set_alias(NAME, "production", 1)
    with pytest.raises(PromotionRefused, match="missing"):
        store.set_alias(NAME, "production", 2)
    # With nothing to compare against, the first promotion passes.
    fresh = FilesystemStore(store.root.parent / "fresh")
    fresh.register(make_manifest(metrics={}), b"x")
    assert fresh.set_alias(NAME, "production", 1) is None


def test_torn_history_line_is_skipped(
    store: FilesystemStore, make_manifest: ManifestFactory
) -> None:
    _versions(store, make_manifest, 0.3)
    with open(store.root / NAME / "history.jsonl", "ab") as f:
        f.write(b'{"time": "2026-')  # a crash in the middle of an append
    assert [c.version for c in store.history(NAME)] == [1]


def test_registry_promote_applies_the_gate_over_redis(
    store: FilesystemStore, make_manifest: ManifestFactory, redis_url: str
) -> None:
    from models_registry.cache import RedisCache

    _versions(store, make_manifest, 0.159, 0.243)

    async def main() -> None:
        reg = Registry(store, RedisCache(redis_url))
        try:
            await reg.promote(NAME, "production", 1, actor="pipeline")
            with pytest.raises(PromotionRefused):
                await reg.promote(NAME, "production", 2, actor="pipeline")
            assert (await reg.aliases(NAME))["production"] == 1
            event = await reg.promote(NAME, "production", 2, force=True, actor="pipeline")
            assert (event.previous, event.version) == (1, 2)
            history = await reg.history(NAME)
            assert [(c.version, c.actor, c.forced) for c in history if c.alias == "production"] \
                == [(1, "pipeline", False), (2, "pipeline", True)]
        finally:
            await reg.close()

    asyncio.run(main())


def test_cli_gate_force_and_history(store: FilesystemStore, make_manifest: ManifestFactory) -> None:
    _versions(store, make_manifest, 0.159, 0.243)
    assert cli(store.root, "promote", NAME, "1").returncode == 0

    out = cli(store.root, "promote", NAME, "2")
    assert out.returncode == 1
    assert "0.243" in out.stderr and "0.159" in out.stderr and "force" in out.stderr

    out = cli(store.root, "promote", NAME, "2", "--force", "--actor", "ops:alice")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == (
        f"{NAME}@production: 1 -> 2 (val_mse 0.243 vs 0.159, forced past the gate)"
    )

    out = cli(store.root, "history", NAME, "--json")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    production = [r for r in rows if r["alias"] == "production"]
    assert [(r["previous"], r["version"], r["forced"]) for r in production] == [
        (None, 1, False), (1, 2, True),
    ]
    assert production[0]["actor"].startswith("cli:") and production[1]["actor"] == "ops:alice"
    assert production[1]["gate"] == {
        "metric": "val_mse", "candidate": 0.243, "current": 0.159, "current_version": 1,
        "tolerance": 0.01, "passed": False,
    }
    text = cli(store.root, "history", NAME).stdout.splitlines()
    assert text[-1].endswith("production: 1 -> 2\tops:alice\tval_mse 0.243 vs 0.159\tFORCED")

    # The tolerance comes from the environment too (a 60% slack lets 0.243 past 0.159).
    env = {**os.environ, "DISTILCAST_REGISTRY_ROOT": str(store.root),
           "DISTILCAST_PROMOTION_TOLERANCE": "0.6"}
    env.pop("DISTILCAST_REDIS_URL", None)
    assert cli(store.root, "promote", NAME, "1").returncode == 0
    out = subprocess.run([sys.executable, "-m", "models_registry", "promote", NAME, "2"],
                         capture_output=True, text=True, env=env, timeout=30)
    assert out.returncode == 0, out.stderr


def test_cli_output_into_a_closed_pipe_is_quiet(
    store: FilesystemStore, make_manifest: ManifestFactory
) -> None:
    # Larger than a pipe buffer, so the writer is still writing when head exits.
    store.register(make_manifest(config={f"k{i}": i for i in range(20_000)}), b"big")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILCAST_")}
    env["DISTILCAST_REGISTRY_ROOT"] = str(store.root)
    # `show ... | head -1`: head exits after one line; the manifest is many more.
    out = subprocess.run(
        f"{sys.executable} -m models_registry show {NAME} | head -1; exit ${{PIPESTATUS[0]}}",
        shell=True, executable="/bin/bash", capture_output=True, text=True, env=env, timeout=30,
    )
    assert out.stdout == "{\n"
    assert "Traceback" not in out.stderr and "BrokenPipe" not in out.stderr, out.stderr
    assert out.returncode == 0
