"""Masked pretraining of the teachers and their fine-tuning to forecast.

``run_pretrain(cfg) -> PretrainResult`` trains one method's pretext task on the look-back windows
of a dataset's train split and saves the encoder; ``run_finetune(cfg) -> FitResult`` builds the
forecaster, optionally starts its encoder from a pretraining checkpoint, and trains it through
``training.engine.fit`` (so the run folder has ``best.safetensors`` and a ``run.json`` with
``model`` and ``model_config``, loadable by ``training.checkpoints.load_forecaster``).

A pretraining folder holds ``encoder.safetensors`` (the backbone's weights), ``pretrain.json``
(method, lookback, channels, model config, history, seconds) and ``last.pt`` (resume state).

TOML (``training/configs/<method>.toml``): ``[model]`` architecture and pretext settings,
``[pretrain]`` the pretraining optimisation and ``[train]`` the fine-tuning one (both with
``TrainConfig`` fields; early stopping only applies to fine-tuning).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from training.config import RunConfig, _update, build_run_config, default_config_path, load_toml
from training.data import DataConfig, PreparedData, WindowSet, dataset_stem, prepare
from training.engine import FitResult, count_params, fit
from training.loop import (
    LAST_FILE,
    LoopResult,
    ParamGroup,
    TrainConfig,
    run_loop,
    schedule_of,
    seed_everything,
)
from training.models import MODELS, build_model, dmae, himtm, make_config, simmtm

log = logging.getLogger(__name__)

METHODS: dict[str, ModuleType] = {"simmtm": simmtm, "himtm": himtm, "dmae": dmae}
"""Each module has its forecaster in ``MODELS`` and ``build_pretrainer(cfg)``, an ``nn.Module``
with ``backbone`` (the encoder the forecaster shares, key for key), ``forward(x [B, L, C]) ->
(loss, parts)`` and ``after_step()`` (called after each optimiser step, e.g. an EMA teacher)."""

ENCODER_FILE, META_FILE = "encoder.safetensors", "pretrain.json"
# Settings the fine-tuning run may change without touching the pretrained weights.
FINETUNE_KEYS = frozenset({"lookback", "horizon", "dropout", "head_dropout"})


class CheckpointError(ValueError):
    """A pretraining checkpoint that cannot initialise this run; the message says why."""


@dataclass(frozen=True)
class PretrainRunConfig:
    method: str
    data: DataConfig = field(default_factory=DataConfig)
    model_settings: dict[str, Any] = field(default_factory=dict)
    pretrain: TrainConfig = field(default_factory=TrainConfig)
    out_dir: str | None = None
    resume: bool = False

    def resolved_out_dir(self) -> Path:
        if self.out_dir:
            return Path(self.out_dir)
        name = dataset_stem(self.data.dataset)
        return Path("runs") / f"{name}-{self.method}-L{self.data.lookback}-pretrain"


@dataclass(frozen=True)
class FinetuneRunConfig:
    run: RunConfig  # run.model is the method
    init_from: str | None = None  # pretraining folder or its encoder.safetensors; None = scratch
    allow_channel_change: bool = False
    resume: bool = False

    def resolved_out_dir(self) -> Path:
        if self.run.out_dir:
            return Path(self.run.out_dir)
        return self.run.default_out_dir(self.run.model + ("" if self.init_from else "-scratch"))


@dataclass
class PretrainResult:
    out_dir: Path
    loop: LoopResult

    def summary(self) -> dict[str, Any]:
        res = self.loop
        doc: dict[str, Any] = {
            "finished": res.finished,
            "epochs": res.epochs_run,
            "best_epoch": res.best_epoch,
            "best_val_loss": res.best_val,
            "pretrain_seconds": round(res.seconds, 2),
        }
        if res.finished:
            doc["checkpoint"] = str(self.out_dir / ENCODER_FILE)
        else:
            doc["resume"] = f"rerun with --resume --out {self.out_dir}"
        return doc


def _check_method(method: str) -> ModuleType:
    if method not in METHODS:
        raise ValueError(f"unknown pretraining method {method!r}; choose from {sorted(METHODS)}")
    return METHODS[method]


def build_pretrain_config(
    method: str,
    config_file: Path | None = None,
    data: dict[str, Any] | None = None,
    pretrain: dict[str, Any] | None = None,
    model_settings: dict[str, Any] | None = None,
    out_dir: str | None = None,
    resume: bool = False,
) -> PretrainRunConfig:
    """Defaults <- ``[data]``, ``[model]``, ``[pretrain]`` of the method's TOML <- overrides."""
    _check_method(method)
    base = build_run_config(method, config_file, data, None, model_settings, out_dir)
    path = config_file or default_config_path(method)
    doc = load_toml(path) if path.exists() else {}
    section = {**doc.get("pretrain", {}), **(pretrain or {})}
    cfg = _update(TrainConfig(), section, f"{path} [pretrain]")
    return PretrainRunConfig(method, base.data, base.model_settings, cfg, out_dir, resume)


def _model_config(method: str, data: DataConfig, settings: dict[str, Any]) -> Any:
    return make_config(method, **{**settings, "lookback": data.lookback})


def _meta(cfg: PretrainRunConfig, data: PreparedData, model_cfg: Any) -> dict[str, Any]:
    return {
        "method": cfg.method,
        "lookback": cfg.data.lookback,
        "channels": data.channels,
        "model_config": asdict(model_cfg),
        "data": asdict(cfg.data),
        "dataset": data.describe(),
        "pretrain": asdict(cfg.pretrain),
    }


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str))
    tmp.replace(path)


def pretrain_matches(cfg: PretrainRunConfig) -> bool:
    """Whether ``cfg``'s folder already holds a *finished* pretraining with the same settings."""
    meta_path = cfg.resolved_out_dir() / META_FILE
    if not meta_path.exists() or not (cfg.resolved_out_dir() / ENCODER_FILE).exists():
        return False
    meta = json.loads(meta_path.read_text())
    model_cfg = _model_config(cfg.method, cfg.data, cfg.model_settings)
    return bool(
        meta.get("finished")
        and meta.get("method") == cfg.method
        and meta.get("model_config") == json.loads(json.dumps(asdict(model_cfg)))
        and meta.get("data") == json.loads(json.dumps(asdict(cfg.data)))
        and schedule_of(meta.get("pretrain", {}))
        == schedule_of(json.loads(json.dumps(asdict(cfg.pretrain))))
    )


@torch.no_grad()
def pretext_val_loss(
    pretrainer: nn.Module, windows: WindowSet, cfg: TrainConfig, max_windows: int | None
) -> float:
    """Pretext loss on up to ``max_windows`` evenly spread validation windows, in eval mode.

    The masks come from a generator seeded with ``cfg.seed`` inside a forked RNG, so every epoch
    is scored on the same windows with the same masks (comparable across epochs) and the
    training RNG stream is left untouched (resume stays exact).
    """
    n = len(windows)
    if n <= 1:
        return math.nan
    take = n if max_windows is None else min(n, max_windows)
    index = torch.linspace(0, n - 1, take).round().long().unique()
    pretrainer.eval()
    device = next(pretrainer.parameters()).device
    total, seen = 0.0, 0
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed + 1)
        for batch in index.split(cfg.eval_batch_size):
            if len(batch) < 2:
                continue
            loss, _ = pretrainer(windows.batch(batch)[0].to(device))
            total += float(loss) * len(batch)
            seen += len(batch)
    return total / max(seen, 1)


def _same_settings(old: Any, new: Any) -> bool:
    """Equal, where a setting added since ``old`` was written counts as equal when it is None.

    A checkpoint written before a data option existed (say ``id_column``) resumes under code
    that has it, as long as the run leaves the option at its default.
    """
    if isinstance(old, dict) and isinstance(new, dict):
        return all(_same_settings(old.get(k), new.get(k)) for k in old.keys() | new.keys())
    return bool(old == new)


def run_pretrain(cfg: PretrainRunConfig) -> PretrainResult:
    """Train the pretext task on train-split look-back windows; keep the best-validation encoder.

    The encoder saved (``encoder.safetensors``) is the backbone at the epoch of lowest validation
    pretext loss; pretraining stops when that loss has not improved for ``patience`` epochs
    (never before ``min_epochs``) or at ``epochs``.
    """
    module = _check_method(cfg.method)
    tcfg = cfg.pretrain
    # Only the look-back is needed: windows of L + 1 rows so that no train row goes unused.
    data = prepare(replace(cfg.data, horizon=1))
    seed_everything(tcfg.seed)  # the initial weights
    model_cfg = _model_config(cfg.method, cfg.data, cfg.model_settings)
    pretrainer: nn.Module = module.build_pretrainer(model_cfg)
    out_dir = cfg.resolved_out_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = _meta(cfg, data, model_cfg)
    backbone: nn.Module = pretrainer.backbone  # type: ignore[assignment]  # nn.Module.__getattr__ is typed Tensor | Module
    meta["params"] = count_params(backbone)
    meta_path = out_dir / META_FILE
    if cfg.resume and (out_dir / LAST_FILE).exists() and meta_path.exists():
        old = json.loads(meta_path.read_text())
        for key in ("method", "lookback", "channels", "model_config", "data"):
            if not _same_settings(old.get(key), json.loads(json.dumps(meta[key]))):
                raise CheckpointError(
                    f"{out_dir}: cannot resume, its {key} is {old.get(key)!r} but this run has "
                    f"{meta[key]!r}; use another --out or drop --resume"
                )
        if schedule_of(old.get("pretrain", {})) != schedule_of(
            json.loads(json.dumps(meta["pretrain"]))
        ):
            raise CheckpointError(
                f"{out_dir}: cannot resume, it was pretrained with {schedule_of(old['pretrain'])} "
                f"but this run asks for {schedule_of(meta['pretrain'])}"
            )
    log.info(
        "pretraining %s (%d encoder parameters) on %s -> %s",
        cfg.method,
        meta["params"],
        data.info.name,
        out_dir,
    )
    val = data.splits["val"]

    def write(res: LoopResult) -> None:
        _write_json(meta_path, {**meta, **_loop_fields(res)})

    res = run_loop(
        module=pretrainer,
        groups=[ParamGroup("all", [p for p in pretrainer.parameters() if p.requires_grad])],
        train=data.splits["train"],
        cfg=tcfg,
        out_dir=out_dir,
        step=lambda x, _: pretrainer(x),
        validate=lambda: pretext_val_loss(pretrainer, val, tcfg, tcfg.val_max_windows),
        best_weights=backbone.state_dict,
        best_file=ENCODER_FILE,
        # (mypy ignore on the next line) after_step is a bound method of the pretrainer;
        # nn.Module.__getattr__ types it Tensor | Module
        after_step=pretrainer.after_step,  # type: ignore[arg-type]
        after_epoch=write,
        resume=cfg.resume,
        desc=f"pretrain {cfg.method}",
    )
    write(res)
    return PretrainResult(out_dir, res)


def _loop_fields(res: LoopResult) -> dict[str, Any]:
    return {
        "finished": res.finished,
        "history": res.history,
        "epochs": res.epochs_run,
        "best_epoch": res.best_epoch,
        "best_val_loss": res.best_val,
        "seconds": round(res.seconds, 2),
    }


# --- fine-tuning -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PretrainedEncoder:
    path: Path  # the pretraining folder
    meta: dict[str, Any]
    weights: dict[str, Tensor]


def load_pretrained(where: str | Path) -> PretrainedEncoder:
    """Read a pretraining folder (or its ``encoder.safetensors``) with clear errors."""
    path = Path(where)
    folder = path.parent if path.suffix == ".safetensors" else path
    meta_path, weights_path = folder / META_FILE, folder / ENCODER_FILE
    if not meta_path.exists():
        raise FileNotFoundError(f"{folder}: no {META_FILE} (not a pretraining folder)")
    meta = json.loads(meta_path.read_text())
    if not meta.get("finished") or not weights_path.exists():
        done = len(meta.get("history", []))
        raise CheckpointError(
            f"{folder}: pretraining did not finish (epoch {done} of "
            f"{meta.get('pretrain', {}).get('epochs', '?')}); resume it with "
            f"`python -m training pretrain --method {meta.get('method')} --resume --out {folder}`"
        )
    return PretrainedEncoder(folder, meta, load_file(weights_path))


def check_compatible(ckpt: PretrainedEncoder, method: str, lookback: int) -> None:
    """Refuse a checkpoint of another method or look-back, naming the mismatch."""
    meta = ckpt.meta
    if meta.get("method") != method:
        raise CheckpointError(
            f"{ckpt.path}: method mismatch: pretrained with {meta.get('method')!r}, cannot "
            f"initialise {method!r}; pass --method {meta.get('method')} or another checkpoint"
        )
    if meta.get("lookback") != lookback:
        raise CheckpointError(
            f"{ckpt.path}: lookback mismatch: pretrained with lookback {meta.get('lookback')}, "
            f"this run uses {lookback}; pass --lookback {meta.get('lookback')}"
        )


def check_channels(ckpt: PretrainedEncoder, data: PreparedData, allow_change: bool) -> None:
    """Refuse a checkpoint pretrained on another channel count unless asked to accept it."""
    channels = ckpt.meta.get("channels")
    if channels != data.channels and not allow_change:
        raise CheckpointError(
            f"{ckpt.path}: channels mismatch: pretrained on {channels} channels "
            f"({ckpt.meta.get('dataset', {}).get('name')}), {data.info.name} has {data.channels}; "
            "the encoder is channel-independent, pass --allow-channel-change to use it anyway"
        )


def finetune_settings(
    ckpt: PretrainedEncoder, settings: dict[str, Any], data: DataConfig
) -> dict[str, Any]:
    """The checkpoint's architecture, with the fine-tuning keys taken from this run."""
    merged = dict(ckpt.meta["model_config"])
    for key, value in settings.items():
        if key in FINETUNE_KEYS:
            merged[key] = value
        elif merged.get(key) != value:
            log.warning(
                "%s: ignoring %s=%r, the checkpoint was pretrained with %r",
                ckpt.path,
                key,
                value,
                merged.get(key),
            )
    merged.update(lookback=data.lookback, horizon=data.horizon)
    return merged


def load_backbone(model: nn.Module, ckpt: PretrainedEncoder) -> None:
    """Copy pretrained weights into ``model.backbone``; any key or shape mismatch is an error."""
    # (mypy ignore on the next line) nn.Module.__getattr__ is typed Tensor | Module; backbone is a
    # Module
    backbone: nn.Module = model.backbone  # type: ignore[assignment]
    own = backbone.state_dict()
    missing, extra = sorted(set(own) - set(ckpt.weights)), sorted(set(ckpt.weights) - set(own))
    bad = [k for k in own if k in ckpt.weights and own[k].shape != ckpt.weights[k].shape]
    if missing or extra or bad:
        detail = "; ".join(
            f"{what}: {keys[:5]}"
            for what, keys in (("missing", missing), ("unexpected", extra), ("shape", bad))
            if keys
        )
        raise CheckpointError(f"{ckpt.path}: encoder weights do not fit this model ({detail})")
    backbone.load_state_dict(ckpt.weights)


def run_finetune(cfg: FinetuneRunConfig) -> FitResult:
    """Fine-tune a teacher to forecast, from a pretrained encoder or from scratch."""
    method = cfg.run.model
    _check_method(method)
    ckpt = load_pretrained(cfg.init_from) if cfg.init_from else None
    if ckpt is not None:  # before reading the data: a wrong checkpoint fails fast
        check_compatible(ckpt, method, cfg.run.data.lookback)
    data = prepare(cfg.run.data)
    seed_everything(cfg.run.train.seed)  # the initial head weights depend on it too
    settings = {**cfg.run.model_settings, "horizon": cfg.run.data.horizon}
    if ckpt is not None:
        check_channels(ckpt, data, cfg.allow_channel_change)
        settings = finetune_settings(ckpt, cfg.run.model_settings, cfg.run.data)
    model = build_model(method, **{**settings, "lookback": cfg.run.data.lookback})
    if ckpt is not None:
        load_backbone(model, ckpt)
    out_dir = cfg.resolved_out_dir()
    info = {
        "model": method,
        "kind": MODELS[method].kind,
        "model_config": asdict(model.cfg),
        "params": count_params(model),
        "data": asdict(cfg.run.data),
        "dataset": data.describe(),
        "pretrained_from": str(ckpt.path) if ckpt else None,
        "pretrain_seconds": ckpt.meta.get("seconds") if ckpt else None,
    }
    log.info(
        "fine-tuning %s (%d parameters, %s) -> %s",
        method,
        info["params"],
        f"encoder from {ckpt.path}" if ckpt else "from scratch",
        out_dir,
    )
    desc = f"finetune {method}" + ("" if ckpt else " (scratch)")
    # (mypy ignore on the next line) nn.Module.__getattr__ is typed Tensor | Module; backbone is a
    # Module
    encoder: nn.Module | None = model.backbone if ckpt is not None else None  # type: ignore[assignment]
    return fit(
        model,
        data,
        cfg.run.train,
        out_dir,
        encoder=encoder,
        run_info=info,
        resume=cfg.resume,
        desc=desc,
    )


__all__ = [
    "METHODS",
    "CheckpointError",
    "FinetuneRunConfig",
    "PretrainResult",
    "PretrainRunConfig",
    "build_pretrain_config",
    "check_channels",
    "check_compatible",
    "load_backbone",
    "load_pretrained",
    "pretrain_matches",
    "run_finetune",
    "run_pretrain",
]
