"""Publish what training made: export a run folder and register it, register an ensemble group.

The registry side (versions, groups, aliases, the Redis cache) is ``models_registry.publish``;
this module adds what needs training: exporting a run folder with its parity check
(``training.manifests.export_run``) and scoring an ensemble on the data (``ensemble_fields``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from models_registry.defaults import registry_root
from models_registry.manifest import Manifest, ModelRef
from models_registry.publish import promote, register_group, register_version
from models_registry.store import FilesystemStore
from training.data import PreparedData
from training.export import PARITY_WINDOWS
from training.manifests import (
    ExportedModel,
    SplitForecast,
    build_lineage,
    code_version,
    ensemble_fields,
    export_run,
)


def register_exported(
    exported: ExportedModel,
    store: FilesystemStore,
    *,
    alias: str | None = None,
    redis_url: str | None = None,
) -> Manifest:
    """Register a checked export; ``alias`` is then pointed at the new version."""
    return register_version(
        store, exported.manifest, exported.onnx_bytes, alias=alias, redis_url=redis_url
    )


def register_run(
    run_dir: str | os.PathLike[str],
    store: FilesystemStore,
    name: str,
    *,
    alias: str | None = None,
    teachers: Sequence[ModelRef | str] = (),
    data: PreparedData | None = None,
    redis_url: str | None = None,
    parity_windows: int | None = PARITY_WINDOWS,
    tolerance: float | None = None,
) -> Manifest:
    """Export a run folder, refuse it unless it passes the parity check, register it."""
    exported = export_run(
        run_dir,
        name,
        data=data,
        teachers=teachers,
        parity_windows=parity_windows,
        tolerance=tolerance,
    )
    return register_exported(exported, store, alias=alias, redis_url=redis_url)


def publish_run(
    run_dir: Path,
    name: str,
    *,
    registry: str | None = None,
    alias: str | None = None,
    teachers: Sequence[str] = (),
    parity_windows: int | None = PARITY_WINDOWS,
) -> Manifest:
    """``python -m training export``: a run folder into the registry at ``registry``."""
    store = FilesystemStore(registry_root(registry))
    return register_run(
        run_dir, store, name, alias=alias, teachers=teachers, parity_windows=parity_windows
    )


def register_ensemble(
    store: FilesystemStore,
    name: str,
    members: Sequence[ModelRef | str],
    *,
    modules: Sequence[nn.Module] | None = None,
    data: PreparedData | None = None,
    val_forecasts: Sequence[SplitForecast] | None = None,
    alias: str | None = None,
    redis_url: str | None = None,
    **fields: Any,
) -> Manifest:
    """Register ``members`` as an ensemble group (no model.onnx; the service averages them).

    With the members' serving ``modules`` (raw in, raw out) and ``data``, the group's manifest
    also carries the ensemble's metrics and its own calibration for intervals. With ``data``,
    its lineage names the checkout and the data file (the members' manifests hold their seeds).
    """
    extra: dict[str, Any] = {"config": {"combine": "mean"}, "code_version": code_version()}
    if data is not None:
        extra["lineage"] = build_lineage(data)
    if modules is not None and data is not None:
        extra.update(ensemble_fields(modules, data, val_forecasts))
    return register_group(
        store, name, members, alias=alias, redis_url=redis_url, **{**extra, **fields}
    )


__all__ = ["promote", "publish_run", "register_ensemble", "register_exported", "register_run"]
