"""Settings the benchmark command lines hand to every training run they start."""

from __future__ import annotations

import argparse
from typing import Any


def train_overrides(args: argparse.Namespace, *, epochs: bool = True) -> dict[str, Any]:
    """``TrainConfig`` overrides from ``--no-progress``, ``--threads`` and (when ``epochs``)
    ``--epochs``; a flag left unset keeps the TOML's value."""
    out: dict[str, Any] = {"progress": not args.no_progress}
    if epochs and getattr(args, "epochs", None):
        out["epochs"] = args.epochs
    if args.threads:
        out["threads"] = args.threads
    return out
