"""Synchronous entry points for publishing: register a version or a group, move an alias.

Training jobs and CLIs are synchronous; the :class:`~models_registry.registry.Registry` is async
(its cache and pub/sub). These wrappers open a registry on the filesystem root (plus the Redis
cache when a URL is configured, so every replica hears the promotion), do one thing, close it.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from typing import Any

from models_registry.defaults import REDIS_ENV
from models_registry.manifest import AliasEvent, Manifest, ModelRef
from models_registry.registry import open_registry
from models_registry.store import FilesystemStore


def redis_url_from_env(redis_url: str | None = None) -> str | None:
    return redis_url if redis_url is not None else os.environ.get(REDIS_ENV) or None


def promote(
    store: FilesystemStore,
    name: str,
    alias: str,
    version: int,
    redis_url: str | None = None,
    **options: Any,
) -> AliasEvent:
    """Point ``alias`` at ``version`` through the Registry (filesystem, then cache + pub/sub);
    ``options`` go to ``Registry.promote``."""
    url = redis_url_from_env(redis_url)

    async def run() -> AliasEvent:
        registry = open_registry(str(store.root), url)
        try:
            return await registry.promote(name, alias, version, **options)
        finally:
            await registry.close()

    return asyncio.run(run())


def register_version(
    store: FilesystemStore,
    manifest: Manifest,
    onnx_bytes: bytes,
    *,
    alias: str | None = None,
    redis_url: str | None = None,
) -> Manifest:
    """Store a new version (the store numbers and hashes it); then point ``alias`` at it."""
    registered = store.register(manifest, onnx_bytes)
    if alias:
        promote(store, registered.name, alias, registered.version, redis_url)
    return registered


def register_group(
    store: FilesystemStore,
    name: str,
    members: Sequence[ModelRef | str],
    *,
    alias: str | None = None,
    redis_url: str | None = None,
    **fields: Any,
) -> Manifest:
    """Register ``members`` as an ensemble group (no model.onnx: the service averages them)."""
    refs = [ModelRef.parse(m) if isinstance(m, str) else m for m in members]
    registered = store.register_group(name, refs, **fields)
    if alias:
        promote(store, name, alias, registered.version, redis_url)
    return registered


__all__ = ["promote", "redis_url_from_env", "register_group", "register_version"]
