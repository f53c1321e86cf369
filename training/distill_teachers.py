"""The teachers of a distillation: loading and checking them, their cached passes, the ensemble.

A teacher is frozen and deterministic, so each runs once over the training windows before the
first epoch, and every epoch reads its forecasts (float32) and features (float16) by window
index (:class:`TeacherWindows`). Features beyond the in-memory budget go to a memory-mapped file
instead of being recomputed per batch: the teachers run once per run whatever the data's size.
"""

from __future__ import annotations

import logging
import sys
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from training.checkpoints import load_forecaster
from training.data import PreparedData, WindowSet, resolve_dataset
from training.engine import count_params, metrics
from training.models import Forecaster

log = logging.getLogger(__name__)

Weighting = Literal["mean", "val-weighted"]
WEIGHTINGS: tuple[Weighting, ...] = ("mean", "val-weighted")
M = TypeVar("M", bound=nn.Module)


class TeacherSource(Protocol):
    """Where the teachers are (``DistillConfig`` has these fields)."""

    @property
    def teachers(self) -> tuple[str, ...]: ...
    @property
    def teacher_dir(self) -> str: ...
    @property
    def teacher_lookback(self) -> int: ...


@dataclass
class Teacher:
    """A frozen teacher and where it came from."""

    name: str
    run_dir: Path
    model: Forecaster
    run: dict[str, Any]

    @property
    def lookback(self) -> int:
        return self.model.lookback

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "run": str(self.run_dir),
            "architecture": self.run.get("model"),
            "lookback": self.lookback,
            "params": count_params(self.model),
            "feature_dim": self.model.feature_dim,
        }


def resolve_teacher_dir(spec: str, dataset: str, horizon: int, cfg: TeacherSource) -> Path:
    """A run folder as given, or a name: ``<teacher_dir>/<dataset>-<name>-L<Lt>-H<h>``."""
    given = Path(spec)
    if given.is_dir():
        return given
    if "/" in spec or given.suffix:
        raise FileNotFoundError(f"teacher run folder {spec} not found")
    run_dir = Path(cfg.teacher_dir) / f"{dataset}-{spec}-L{cfg.teacher_lookback}-H{horizon}"
    if not run_dir.is_dir():
        others = sorted(p.name for p in Path(cfg.teacher_dir).glob(f"{dataset}-{spec}-L*-H*"))
        hint = f"; found {others}" if others else ""
        raise FileNotFoundError(
            f"teacher {spec!r}: no run folder {run_dir} (train or fine-tune it first, or pass "
            f"a run folder / --teacher-dir{hint})"
        )
    return run_dir


def freeze(model: M) -> M:
    """Eval mode (dropout off, BatchNorm statistics fixed) and no gradients, for good."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_teachers(data: PreparedData, cfg: TeacherSource) -> list[Teacher]:
    """Load, check against the student's data, and freeze every teacher."""
    dataset, horizon = data.info.name, data.config.horizon
    teachers: list[Teacher] = []
    for spec in cfg.teachers:
        run_dir = resolve_teacher_dir(spec, dataset, horizon, cfg)
        model, run = load_forecaster(run_dir)
        # A named teacher keeps its name; a run folder is named by its run (e.g. "patchtst").
        name = spec if not Path(spec).is_dir() else str(run.get("name", run["model"]))
        if name in {t.name for t in teachers}:
            name = f"{name}-{len(teachers)}"
        trained_on = run.get("data", {}).get("dataset")
        if trained_on is not None and resolve_dataset(trained_on)[0].name != dataset:
            raise ValueError(f"teacher {run_dir} was trained on {trained_on}, not {dataset}")
        if model.horizon != horizon:
            raise ValueError(f"teacher {run_dir} forecasts {model.horizon} steps, not {horizon}")
        if model.lookback > data.config.lookback:
            raise ValueError(
                f"teacher {run_dir} looks back {model.lookback} steps, more than the student's "
                f"{data.config.lookback}: give the student a lookback >= {model.lookback}"
            )
        if not model.channel_independent and model_channels(run) not in (None, data.channels):
            raise ValueError(f"teacher {run_dir} was built for other channels than {dataset}")
        teachers.append(Teacher(name, run_dir, freeze(model), run))
    return teachers


def model_channels(run: dict[str, Any]) -> int | None:
    columns = run.get("dataset", {}).get("columns")
    return len(columns) if columns else None


# --------------------------------------------------------------------------- teacher passes


@dataclass
class TeacherPass:
    """A teacher's outputs on every window of a split: ``y [N, H, C]``, ``h [N, C, D_t] | None``.

    ``h`` is float16, in memory or backed by a memory-mapped file (``spilled``).
    """

    y: Tensor
    h: Tensor | None
    spilled: bool = False


_MEMO: OrderedDict[Hashable, TeacherPass] = OrderedDict()
_MEMO_MAX_BYTES = 3 * 2**30  # oldest passes are dropped beyond this (features dominate)


def feature_megabytes(n_windows: int, channels: int, feature_dim: int) -> float:
    """Size of a split's float16 feature cache in MB."""
    return n_windows * channels * feature_dim * 2 / 2**20


def _spill_buffer(path: Path, shape: tuple[int, ...]) -> Tensor:
    """A float16 tensor backed by a new memory-mapped file at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.memmap(path, dtype=np.float16, mode="w+", shape=shape)
    return torch.from_numpy(array)


@torch.no_grad()
def teacher_pass(
    teacher: Teacher,
    data: PreparedData,
    split: str,
    features: bool,
    max_feature_mb: float = float("inf"),
    spill_dir: Path | None = None,
    batch_size: int = 256,
    progress: bool = True,
) -> TeacherPass:
    """Run a frozen teacher once over a split; its features kept in memory, on disk, or not.

    Features (float16) stay in memory when they fit ``max_feature_mb``; beyond it they are
    written to a memory-mapped file in ``spill_dir`` (``<teacher>-<split>-features.f16``), so the
    teacher still runs once whatever the dataset's size; without ``spill_dir`` they are left out
    (``h=None``: the caller recomputes them per batch). In-memory passes are memoised in-process,
    keyed by the teacher's weights, the data config and the split, so a benchmark distilling
    several students on the same data runs each teacher once.
    """
    windows = data.splits[split]
    n, c = len(windows), data.channels
    feature_mb = feature_megabytes(n, c, teacher.model.feature_dim)
    in_memory = features and feature_mb <= max_feature_mb
    spill = features and not in_memory and spill_dir is not None
    if features and not in_memory:
        log.info(
            "%s: %s features would take %.0f MB (> %.0f in memory): %s",
            teacher.name,
            split,
            feature_mb,
            max_feature_mb,
            f"memory-mapped in {spill_dir}" if spill else "recomputed per batch",
        )
    weights = teacher.run_dir / "best.safetensors"
    key = (str(weights.resolve()), weights.stat().st_mtime_ns, data.config, split)
    hit = _MEMO.get(key)
    if hit is not None and (hit.h is not None or not in_memory) and not spill:
        _MEMO.move_to_end(key)
        return TeacherPass(hit.y, hit.h if in_memory else None)

    model, lookback = teacher.model, teacher.lookback
    model.eval()
    device = next(model.parameters()).device  # a teacher on a GPU runs there; outputs come back
    ys: list[Tensor] = []
    hs: list[Tensor] = []
    spilled: Tensor | None = None
    if spill:
        assert spill_dir is not None
        path = spill_dir / f"{teacher.name}-{split}-features.f16"
        spilled = _spill_buffer(path, (n, c, teacher.model.feature_dim))
    bar = tqdm(
        windows.batches(batch_size),
        desc=f"teacher {teacher.name} on {split}",
        disable=not progress,
        leave=False,
        file=sys.stderr,
        mininterval=1.0,
    )
    for index in bar:
        x, _ = windows.batch(index)  # [B, L, C]
        y, h = model.forward_features(x[:, -lookback:].to(device))  # [B, H, C], [B, C, D_t]
        y, h = y.cpu(), h.cpu()
        ys.append(y)
        if spilled is not None:
            spilled[int(index[0]) : int(index[-1]) + 1] = h.half()  # batches are in order
        elif in_memory:
            hs.append(h.half())
    if spilled is not None:
        return TeacherPass(torch.cat(ys), spilled, spilled=True)
    out = TeacherPass(torch.cat(ys), torch.cat(hs) if in_memory else None)
    _MEMO[key] = out
    while len(_MEMO) > 1 and sum(map(_nbytes, _MEMO.values())) > _MEMO_MAX_BYTES:
        _MEMO.popitem(last=False)
    return out


def _nbytes(p: TeacherPass) -> int:
    return sum(t.numel() * t.element_size() for t in (p.y, p.h) if t is not None)


def ensemble_weights(val_mse: Sequence[float], weighting: Weighting) -> Tensor:
    """``[K]`` weights summing to 1: equal, or proportional to 1 / val MSE."""
    if weighting == "mean":
        return torch.full((len(val_mse),), 1.0 / len(val_mse))
    inv = 1.0 / torch.tensor(val_mse, dtype=torch.float64)
    return (inv / inv.sum()).float()


def combine(preds: Sequence[Tensor], weights: Tensor) -> Tensor:
    stacked = torch.stack(list(preds))  # [K, N, H, C]
    return (stacked * weights.view(-1, 1, 1, 1)).sum(0)  # [N, H, C]


def score_teachers(
    teachers: list[Teacher], data: PreparedData, progress: bool = True
) -> dict[str, Any]:
    """Val/test MSE/MAE of each teacher, of the mean ensemble and of the val-weighted one."""
    out: dict[str, Any] = {"teachers": {t.name: {} for t in teachers}, "ensemble": {}}
    for split in ("val", "test"):
        windows = data.splits[split]
        _, true = windows.batch(torch.arange(len(windows)))  # [N, H, C]
        preds = [teacher_pass(t, data, split, False, progress=progress).y for t in teachers]
        for t, pred in zip(teachers, preds, strict=True):
            out["teachers"][t.name][split] = metrics(pred, true, data.scaler)
        val_mse = [out["teachers"][t.name]["val"]["mse"] for t in teachers]
        for weighting in WEIGHTINGS:
            w = ensemble_weights(val_mse, weighting)
            entry = out["ensemble"].setdefault(weighting, {"weights": w.tolist()})
            entry[split] = metrics(combine(preds, w), true, data.scaler)
    return out


@dataclass
class TeacherBatch:
    y: Tensor  # [B, H, C] the (ensemble) target
    h: list[Tensor]  # [B, C, D_k] per teacher, or empty without feature terms


class TeacherWindows(WindowSet):
    """Training windows that also gather the teachers' cached outputs for each batch.

    ``fit`` hands the objective ``(x, y)`` only; this split records the batch it just served in
    ``current`` so the objective can look up the teachers' outputs by window index. Features that
    left out of the cache (``--no-cache``) are recomputed here from ``x``.
    """

    def __init__(
        self,
        base: WindowSet,
        target: Tensor,
        features: Sequence[Tensor | None],
        teachers: Sequence[Teacher],
    ) -> None:
        super().__init__(
            base.series.numpy(), base.lookback, base.horizon, base.start_row, base.segments
        )
        self.target = target  # [N, H, C]
        self.features = list(features)  # [N, C, D_k] float16 | None per teacher
        self.teachers = list(teachers)
        self.current: TeacherBatch | None = None

    def batch(self, index: Tensor) -> tuple[Tensor, Tensor]:
        x, y = super().batch(index)  # [B, L, C], [B, H, C]
        h: list[Tensor] = []
        for cached, t in zip(self.features, self.teachers, strict=True):
            if cached is not None:
                h.append(cached[index])
            else:
                device = next(t.model.parameters()).device
                with torch.no_grad():
                    feats = t.model.forward_features(x[:, -t.lookback :].to(device))[1]
                h.append(feats.cpu())  # [B, C, D_k]
        self.current = TeacherBatch(self.target[index], h)
        return x, y


__all__ = [
    "WEIGHTINGS",
    "Teacher",
    "TeacherBatch",
    "TeacherPass",
    "TeacherSource",
    "TeacherWindows",
    "Weighting",
    "combine",
    "ensemble_weights",
    "feature_megabytes",
    "freeze",
    "load_teachers",
    "resolve_teacher_dir",
    "score_teachers",
    "teacher_pass",
]
