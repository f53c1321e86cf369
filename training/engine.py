"""A reusable fit loop: early stopping, safetensors checkpoints, resume, seeding, progress."""

from __future__ import annotations

import json
import logging
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm import tqdm

from training.data import PreparedData, Scaler, WindowSet

log = logging.getLogger(__name__)

LossFn = Callable[[Tensor, Tensor], Tensor]
"""``loss(x [B, L, C], y [B, H, C]) -> scalar``: the training objective for one batch."""


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 32
    lr: float = 0.01
    lr_schedule: Literal["halve", "cosine", "constant"] = "halve"
    weight_decay: float = 0.0
    patience: int = 3
    seed: int = 2024
    threads: int | None = None
    eval_batch_size: int = 512
    max_train_batches: int | None = None  # cap per epoch, for quick runs and tests
    grad_clip: float | None = None
    progress: bool = True


@dataclass
class FitResult:
    out_dir: Path
    best_epoch: int
    epochs_run: int
    train_seconds: float
    val: dict[str, float]
    test: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "best_epoch": self.best_epoch,
            "epochs": self.epochs_run,
            "train_seconds": round(self.train_seconds, 2),
            "val_mse": self.val["mse"],
            "mse": self.test["mse"],
            "mae": self.test["mae"],
            "mse_raw": self.test["mse_raw"],
            "mae_raw": self.test["mae_raw"],
        }

    def test_record(self, digits: int = 5) -> dict[str, float]:
        """Test MSE/MAE (normalised and raw scale), rounded for a benchmark record."""
        return {k: round(self.test[k], digits) for k in ("mse", "mae", "mse_raw", "mae_raw")}


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def predict(model: nn.Module, windows: WindowSet, batch_size: int = 512) -> tuple[Tensor, Tensor]:
    """Forecasts and targets for every window of a split, in order: ``[N, H, C]`` each."""
    model.eval()
    preds, trues = [], []
    for index in windows.batches(batch_size):
        x, y = windows.batch(index)
        preds.append(model(x))
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


def _lr_at(cfg: TrainConfig, epoch: int) -> float:
    if cfg.lr_schedule == "halve":
        return cfg.lr * 0.5**epoch
    if cfg.lr_schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * epoch / max(cfg.epochs, 1)))
    return cfg.lr


Step = Callable[[Tensor, Tensor], tuple[Tensor, dict[str, Tensor]]]


@dataclass
class EpochStats:
    lr: float
    loss: float  # mean training loss per window
    parts: dict[str, float]  # mean of each named part of the loss per window


def train_epoch(
    train: WindowSet,
    cfg: TrainConfig,
    epoch: int,
    optim: torch.optim.Optimizer,
    params: list[nn.Parameter],
    step: Step,
    generator: torch.Generator,
    desc: str,
    after_step: Callable[[], None] | None = None,
) -> EpochStats:
    """One epoch: set the scheduled lr, shuffle (and cap) the batches, optimise under a bar.

    ``step(x, y) -> (loss, parts)``; the caller sets train mode. Shared by ``fit`` and the masked
    pretraining (``training.pretrain``), whose ``after_step`` moves an EMA teacher.
    """
    lr = _lr_at(cfg, epoch)
    for group in optim.param_groups:
        group["lr"] = lr
    batches = train.batches(cfg.batch_size, shuffle=True, generator=generator)
    if cfg.max_train_batches:
        batches = batches[: cfg.max_train_batches]
    total, seen = 0.0, 0
    parts_sum: dict[str, float] = {}
    bar = tqdm(
        batches,
        desc=f"{desc} epoch {epoch + 1}/{cfg.epochs}",
        disable=not cfg.progress,
        leave=False,
        file=sys.stderr,
        mininterval=1.0,
    )
    for index in bar:
        if len(index) < 2:  # BatchNorm cannot train on a single row
            continue
        x, y = train.batch(index)  # [B, L, C], [B, H, C]
        optim.zero_grad(set_to_none=True)
        loss, parts = step(x, y)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite {desc} loss at epoch {epoch + 1}")
        loss.backward()
        if cfg.grad_clip:
            nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optim.step()
        if after_step is not None:
            after_step()
        total += float(loss.detach()) * len(index)
        seen += len(index)
        for k, v in parts.items():
            parts_sum[k] = parts_sum.get(k, 0.0) + float(v) * len(index)
        bar.set_postfix(loss=f"{total / max(seen, 1):.4f}", refresh=False)
    bar.close()
    n = max(seen, 1)
    return EpochStats(lr, total / n, {k: v / n for k, v in parts_sum.items()})


def fit(
    model: nn.Module,
    data: PreparedData,
    cfg: TrainConfig,
    out_dir: Path,
    *,
    loss_fn: LossFn | None = None,
    trainable: nn.Module | None = None,
    run_info: dict[str, Any] | None = None,
    resume: bool = False,
    desc: str = "train",
) -> FitResult:
    """Train ``model`` with early stopping on validation MSE; restore and evaluate the best epoch.

    ``trainable`` is the module whose parameters are optimised (defaults to ``model``; distillation
    passes the student plus its feature regressors). ``out_dir`` receives ``best.safetensors``
    (model weights at the best validation loss), ``last.pt`` (everything needed to resume) and
    ``run.json`` (config, history, metrics).
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    generator = seed_everything(cfg.seed)
    trainable = trainable if trainable is not None else model
    out_dir.mkdir(parents=True, exist_ok=True)
    best_path, last_path = out_dir / "best.safetensors", out_dir / "last.pt"
    optim = torch.optim.Adam(trainable.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    mse = nn.MSELoss()
    objective: LossFn = loss_fn or (lambda x, y: mse(model(x), y))

    start_epoch, best_val, best_epoch, bad_epochs = 0, math.inf, -1, 0
    history: list[dict[str, float]] = []
    elapsed = 0.0
    if resume and last_path.exists():
        state = torch.load(last_path, weights_only=True)
        trainable.load_state_dict(state["trainable"])
        optim.load_state_dict(state["optim"])
        generator.set_state(state["generator"])
        start_epoch, best_val = int(state["epoch"]) + 1, float(state["best_val"])
        best_epoch, bad_epochs = int(state["best_epoch"]), int(state["bad_epochs"])
        elapsed = float(state["elapsed"])
        history = json.loads((out_dir / "run.json").read_text()).get("history", [])
        log.info("resuming %s at epoch %d (best val %.4f)", out_dir, start_epoch, best_val)

    train, val = data.splits["train"], data.splits["val"]
    for epoch in range(start_epoch, cfg.epochs):
        if bad_epochs >= cfg.patience:
            break
        t0 = time.perf_counter()
        trainable.train()
        model.train()
        stats = train_epoch(
            train,
            cfg,
            epoch,
            optim,
            list(trainable.parameters()),
            lambda x, y: (objective(x, y), {}),
            generator,
            desc,
        )
        val_metrics = evaluate(model, val, data.scaler, cfg.eval_batch_size)
        elapsed += time.perf_counter() - t0
        row = {
            "epoch": epoch + 1,
            "lr": stats.lr,
            "train_loss": stats.loss,
            "val_mse": val_metrics["mse"],
            "seconds": round(elapsed, 2),
        }
        history.append(row)
        improved = val_metrics["mse"] < best_val
        if improved:
            best_val, best_epoch, bad_epochs = val_metrics["mse"], epoch + 1, 0
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, best_path)
        else:
            bad_epochs += 1
        log.info(
            "%s epoch %d: train %.4f val %.4f%s (%.1fs)",
            desc,
            epoch + 1,
            row["train_loss"],
            row["val_mse"],
            " *" if improved else "",
            elapsed,
        )
        torch.save(
            {
                "trainable": trainable.state_dict(),
                "optim": optim.state_dict(),
                "generator": generator.get_state(),
                "epoch": epoch,
                "best_val": best_val,
                "best_epoch": best_epoch,
                "bad_epochs": bad_epochs,
                "elapsed": elapsed,
            },
            last_path,
        )
        _write_run(out_dir, run_info, cfg, history, None)

    if not best_path.exists():
        raise RuntimeError(f"{desc}: no epoch finished, nothing to evaluate (epochs={cfg.epochs})")
    model.load_state_dict(load_file(best_path))
    val_m = evaluate(model, val, data.scaler, cfg.eval_batch_size)
    test_m = evaluate(model, data.splits["test"], data.scaler, cfg.eval_batch_size)
    result = FitResult(out_dir, best_epoch, len(history), elapsed, val_m, test_m, history)
    _write_run(out_dir, run_info, cfg, history, result)
    return result


def _write_run(
    out_dir: Path,
    run_info: dict[str, Any] | None,
    cfg: TrainConfig,
    history: list[dict[str, float]],
    result: FitResult | None,
) -> None:
    doc: dict[str, Any] = {**(run_info or {}), "train": asdict(cfg), "history": history}
    if result is not None:
        doc["val"] = result.val
        doc["test"] = result.test
        doc["summary"] = result.summary()
    tmp = out_dir / "run.json.tmp"
    tmp.write_text(json.dumps(doc, indent=2, default=str))
    tmp.replace(out_dir / "run.json")
