"""Fitting a forecaster (``fit``) on the one training loop, and scoring it on a split.

``fit`` selects on validation MSE and scores the test split once, after training, with the
best-validation weights: nothing here reads the test split before that.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from training.data import PreparedData, Scaler, WindowSet
from training.loop import LoopResult, ParamGroup, Step, TrainConfig, resolve_device, run_loop

BEST_FILE = "best.safetensors"

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    out_dir: Path
    best_epoch: int
    epochs_run: int
    train_seconds: float
    val: dict[str, float]  # empty when the run stopped on purpose before its schedule ended
    test: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)
    finished: bool = True

    def summary(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "finished": self.finished,
            "best_epoch": self.best_epoch,
            "epochs": self.epochs_run,
            "train_seconds": round(self.train_seconds, 2),
        }
        if not self.finished:
            return {**doc, "resume": f"rerun with --resume --out {self.out_dir}"}
        return {
            **doc,
            "val_mse": self.val["mse"],
            "mse": self.test["mse"],
            "mae": self.test["mae"],
            "mse_raw": self.test["mse_raw"],
            "mae_raw": self.test["mae_raw"],
        }

    def test_record(self, digits: int = 5) -> dict[str, float]:
        """Test MSE/MAE (normalised and raw scale), rounded for a benchmark record."""
        return {k: round(self.test[k], digits) for k in ("mse", "mae", "mse_raw", "mae_raw")}


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def predict(model: nn.Module, windows: WindowSet, batch_size: int = 512) -> tuple[Tensor, Tensor]:
    """Forecasts and targets for every window of a split, in order: ``[N, H, C]`` each."""
    model.eval()
    device = next(model.parameters()).device  # a model on a GPU (a Ray worker's) forecasts there
    preds, trues = [], []
    for index in windows.batches(batch_size):
        x, y = windows.batch(index)
        preds.append(model(x.to(device)).cpu())
        trues.append(y)
    return torch.cat(preds), torch.cat(trues)


@torch.no_grad()
def evaluate(
    model: nn.Module, windows: WindowSet, scaler: Scaler, batch_size: int = 512
) -> dict[str, float]:
    """MSE/MAE over all windows, steps and channels: on the z-scored scale and on the raw scale."""
    pred, true = predict(model, windows, batch_size)
    return metrics(pred, true, scaler)


def metrics(pred: Tensor, true: Tensor, scaler: Scaler) -> dict[str, float]:
    err = (pred - true).double()
    raw_err = err * torch.from_numpy(scaler.std).double()
    return {
        "mse": float((err**2).mean()),
        "mae": float(err.abs().mean()),
        "mse_raw": float((raw_err**2).mean()),
        "mae_raw": float(raw_err.abs().mean()),
        "windows": int(pred.shape[0]),
    }


def default_groups(trainable: nn.Module, encoder: nn.Module | None = None) -> list[ParamGroup]:
    """One group of ``trainable``'s parameters, or ``encoder``'s apart from the rest."""
    params = [p for p in trainable.parameters() if p.requires_grad]
    if encoder is None:
        return [ParamGroup("all", params)]
    enc = {id(p) for p in encoder.parameters()}
    return [
        ParamGroup("head", [p for p in params if id(p) not in enc]),
        ParamGroup("encoder", [p for p in params if id(p) in enc], encoder=True),
    ]


def fit(
    model: nn.Module,
    data: PreparedData,
    cfg: TrainConfig,
    out_dir: Path,
    *,
    loss_fn: Step | None = None,
    trainable: nn.Module | None = None,
    encoder: nn.Module | None = None,
    run_info: dict[str, Any] | None = None,
    resume: bool = False,
    desc: str = "train",
    after_epoch: Callable[[LoopResult], None] | None = None,
    after_step: Callable[[], None] | None = None,
) -> FitResult:
    """Train ``model`` with early stopping on validation MSE; restore and score the best epoch.

    ``trainable`` is the module whose parameters are optimised and checkpointed (defaults to
    ``model``; distillation passes the student plus its feature regressors). ``encoder`` (a
    submodule of ``model``) is optimised under the fine-tuning protocol of ``cfg``
    (``encoder_lr_scale``, ``head_warmup_epochs``). ``loss_fn(x, y) -> (loss, parts)`` replaces
    the plain MSE. ``out_dir`` receives ``best.safetensors`` (the model's weights at the best
    validation MSE), ``last.pt`` (everything needed to resume) and ``run.json`` (config, history,
    metrics). ``after_epoch(result)`` runs after each epoch's checkpoint and ``run.json``
    (``training.distributed`` reports them to Ray Train there), ``after_step()`` after each
    optimiser step.
    """
    trainable = trainable if trainable is not None else model
    model.to(resolve_device(cfg.device))  # run_loop moves ``trainable``; validation uses ``model``
    mse = nn.MSELoss()
    step: Step = loss_fn or (lambda x, y: (mse(model(x), y), {}))
    val = data.splits["val"]

    def write(res: LoopResult) -> None:
        _write_run(out_dir, run_info, cfg, res, None)
        if after_epoch is not None:
            after_epoch(res)

    res = run_loop(
        module=trainable,
        groups=default_groups(trainable, encoder),
        train=data.splits["train"],
        cfg=cfg,
        out_dir=out_dir,
        step=step,
        validate=lambda: evaluate(model, val, data.scaler, cfg.eval_batch_size)["mse"],
        best_weights=model.state_dict,
        best_file=BEST_FILE,
        after_step=after_step,
        after_epoch=write,
        resume=resume,
        desc=desc,
        val_name="val_mse",
    )
    if not res.finished:
        result = FitResult(
            out_dir,
            res.best_epoch,
            res.epochs_run,
            res.seconds,
            {},
            {},
            res.history,
            finished=False,
        )
        log.info("%s: stopped after epoch %d; resume with --resume", desc, res.epochs_run)
        return result
    model.load_state_dict(load_file(out_dir / BEST_FILE))
    val_m = evaluate(model, val, data.scaler, cfg.eval_batch_size)
    test_m = evaluate(model, data.splits["test"], data.scaler, cfg.eval_batch_size)
    result = FitResult(
        out_dir, res.best_epoch, res.epochs_run, res.seconds, val_m, test_m, res.history
    )
    _write_run(out_dir, run_info, cfg, res, result)
    return result


def _write_run(
    out_dir: Path,
    run_info: dict[str, Any] | None,
    cfg: TrainConfig,
    loop: LoopResult,
    result: FitResult | None,
) -> None:
    doc: dict[str, Any] = {
        **(run_info or {}),
        "train": asdict(cfg),
        "history": loop.history,
        "best_epoch": loop.best_epoch,
        "finished": loop.finished and result is not None,
    }
    if result is not None:
        doc["val"] = result.val
        doc["test"] = result.test
        doc["summary"] = result.summary()
    tmp = out_dir / "run.json.tmp"
    tmp.write_text(json.dumps(doc, indent=2, default=str))
    tmp.replace(out_dir / "run.json")
