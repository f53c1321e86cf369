"""Supervised training of any model in the dict: ``run_train(cfg) -> FitResult``."""

from __future__ import annotations

import logging
from dataclasses import asdict

from training.config import RunConfig
from training.data import prepare
from training.engine import FitResult, count_params, fit
from training.loop import seed_everything
from training.models import MODELS, build_model

log = logging.getLogger(__name__)


def run_train(cfg: RunConfig, resume: bool = False) -> FitResult:
    """Train ``cfg.model`` on ``cfg.data``; ``resume`` continues the run in its out folder."""
    data = prepare(cfg.data)
    seed_everything(cfg.train.seed)  # the initial weights depend on it too
    model = build_model(
        cfg.model,
        lookback=cfg.data.lookback,
        horizon=cfg.data.horizon,
        channels=data.channels,
        **cfg.model_settings,
    )
    out_dir = cfg.resolved_out_dir()
    info = {
        "model": cfg.model,
        "kind": MODELS[cfg.model].kind,
        "model_config": asdict(model.cfg),
        "params": count_params(model),
        "data": asdict(cfg.data),
        "dataset": data.describe(),
    }
    log.info("training %s (%d parameters) -> %s", cfg.model, info["params"], out_dir)
    return fit(model, data, cfg.train, out_dir, run_info=info, resume=resume, desc=cfg.model)
