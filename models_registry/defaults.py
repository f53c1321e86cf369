"""Where the registry lives unless told otherwise: one constant for every entry point."""

from __future__ import annotations

import os
from pathlib import Path

ROOT_ENV = "DISTILCAST_REGISTRY_ROOT"
REDIS_ENV = "DISTILCAST_REDIS_URL"
DEFAULT_ROOT = "./var/registry"


def registry_root(path: str | os.PathLike[str] | None = None) -> Path:
    """``path``, else ``$DISTILCAST_REGISTRY_ROOT``, else ``./var/registry``."""
    return Path(path or os.environ.get(ROOT_ENV) or DEFAULT_ROOT)


__all__ = ["DEFAULT_ROOT", "REDIS_ENV", "ROOT_ENV", "registry_root"]
