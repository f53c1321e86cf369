"""Load trained forecasters back from their run folders (``run.json`` + ``best.safetensors``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from training.models import Forecaster, build_model


def read_run(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "run.json"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir}: no run.json (not a finished training run)")
    run: dict[str, Any] = json.loads(path.read_text())
    return run


def load_forecaster(run_dir: Path) -> tuple[Forecaster, dict[str, Any]]:
    """Rebuild the model named in ``run.json`` from its recorded config and best weights.

    A run folder written by ``fit`` through ``run_train`` (or any later run function) records
    ``model`` (the key in ``MODELS``) and ``model_config`` (its dataclass fields).
    """
    run = read_run(run_dir)
    weights = run_dir / "best.safetensors"
    if not weights.exists():
        raise FileNotFoundError(f"{run_dir}: no best.safetensors")
    if "model" not in run or "model_config" not in run:
        raise ValueError(f"{run_dir}/run.json lacks 'model' or 'model_config'")
    model = build_model(run["model"], **run["model_config"])
    model.load_state_dict(load_file(weights))
    model.eval()
    return model, run
