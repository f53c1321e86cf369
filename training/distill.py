"""TimeDistill: distil frozen teachers (one, or the served ensemble) into the MLP student.

Ni et al., 2025, "TimeDistill: Efficient Long-Term Time Series Forecasting with MLP via
Cross-Architecture Distillation". The objective (``../shared/papers/METHODS.md``)::

    MSE(Ys, Y)
    + alpha * [KL_period(Yt, Ys) + mean_m MSE(Pool^m Ys, Pool^m Yt)]
    + beta  * [KL_period(Ht, Hs) + mean_m MSE(Pool^m Hs, Pool^m Ht)]

* ``Pool^m`` is an average pool of kernel 2 applied ``m`` times, ``m = 0..3`` (4 scales): along
  time for forecasts ``[B, H, C]``, along the feature axis for features ``[B, C, D]``.
* ``KL_period``: amplitude of the real FFT along the same axis, DC bin dropped, softmax over the
  frequencies with temperature 0.5 separately for every (window, channel) row, and
  ``KL(Q_teacher || Q_student)`` summed over frequencies and averaged over rows.
* ``Ht`` is the teacher's feature mapped to the student's width ``D`` by a regressor
  ``Linear(D_t -> D) -> ReLU -> Linear(D -> D)``, one per teacher, trained with the student.
* Teachers are frozen: ``requires_grad=False``, eval mode (dropout off, BatchNorm statistics
  fixed), outputs computed under ``no_grad``; they are not part of the optimised module.

Ensemble mode goes one step past the paper: the prediction target ``Yt`` is the ensemble's
forecast (the plain mean the service serves, or validation-weighted with ``weighting =
"val-weighted"``: weights proportional to 1 / val MSE), and the feature terms align the student to
*each* teacher through that teacher's own regressor, averaged over teachers (so ``beta`` means the
same for one teacher or three).

The student may look further back than its teachers (the paper's students use L = 720): data are
prepared at the student's lookback and each teacher sees the last ``L_t`` steps of every window.
Validation and test targets do not depend on the lookback (the split borders reach back ``L``), so
student and teachers are scored on the same forecast windows.

Teacher outputs are cached: being frozen and deterministic, each teacher runs once over the
training windows before the first epoch (one epoch-free pass) and every epoch reads its forecasts
(float32) and features (float16, to halve the memory) by window index. A teacher whose feature
cache would exceed ``cache_max_mb`` has its forecasts cached and its features recomputed per
batch. The passes are also memoised in-process, keyed by teacher run, data config and split, so
a benchmark distilling several students on the same data runs each teacher once.

Choices where the paper is silent, or where its literal form failed here. Both are made on the
validation split (``bench/validation_choices.py``, group ``distill``, in
``bench/results/validation_choices.md``): ETTh1-96, the student at ``distill.toml``'s budget
(L = 720, 10 epochs at most, patience 3), one seed, distilled from one small PatchTST teacher
(21 tokens, two layers; val MSE 0.680, test 0.384). Validation MSE decides; test MSE is given in
brackets as a report only:

* The rFFT is orthonormal (``fft_norm = "ortho"``). Unnormalised amplitudes grow with the length,
  so at temperature 0.5 the softmax is all but one-hot (mean top probability 0.96 on the true
  ETTh1 targets, 0.43 with "ortho") and the KL's gradient per value is about ``H`` times the
  MSE's: it swamps the forecast loss. Validation MSE with "ortho" 0.685 / 0.689 (raw /
  standardised features) against 0.863 / 1.141 with the authors' unscaled FFT ("backward")
  [test 0.388 / 0.382 against 0.478 / 0.558]. Orthonormal amplitudes carry the signal's own
  energy, so one temperature serves H = 96, 336 and D = 512 alike.
* Features are matched as they are (``feature_norm = "none"``). ``"standardize"`` (along D per
  (window, channel) row, applied to ``H_s`` and to the mapped ``H_t``) keeps the terms about the
  feature's shape only: ``H_s`` is taken before BatchNorm, so its scale is free for the forecast.
  With "ortho", validation MSE 0.6854 raw against 0.6890 standardised [test 0.3883 against
  0.3817]: validation prefers raw features, by 0.5% on one seed, where test would have picked
  the other (the setting was first chosen on test).
* KL is summed over frequencies and averaged over rows; the pooled MSE terms average over all
  elements; an odd length drops its last element when pooled; with several teachers the feature
  terms are averaged over teachers.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from training.checkpoints import load_forecaster
from training.config import CONFIG_DIR, RunConfig, _update, build_run_config, load_toml
from training.data import PreparedData, WindowSet, prepare, resolve_dataset
from training.engine import FitResult, count_params, fit, metrics
from training.loop import seed_everything
from training.models import MODELS, Forecaster, build_model

log = logging.getLogger(__name__)

DEFAULT_CONFIG = CONFIG_DIR / "distill.toml"

# (alpha, beta) per dataset from the paper's iTransformer-teacher settings (METHODS.md).
DATASET_DEFAULTS: dict[str, tuple[float, float]] = {
    "etth1": (2.0, 2.0),
    "etth2": (1.0, 0.5),
    "ettm1": (1.0, 1.0),
    "ettm2": (1.0, 0.1),
    "weather": (0.1, 0.1),
}
FALLBACK_ALPHA_BETA = (1.0, 1.0)

Weighting = Literal["mean", "val-weighted"]
WEIGHTINGS: tuple[Weighting, ...] = ("mean", "val-weighted")
M = TypeVar("M", bound=nn.Module)
FFTNorm = Literal["backward", "ortho", "forward"]


# --------------------------------------------------------------------------- loss primitives


def pool_pyramid(x: Tensor, dim: int, scales: int = 4, kernel: int = 2) -> list[Tensor]:
    """``[Pool^0 x, ..., Pool^(scales-1) x]``: average pooling of ``kernel`` along ``dim``."""
    if x.shape[dim] < kernel ** (scales - 1):
        raise ValueError(
            f"axis {dim} has {x.shape[dim]} steps, too few for {scales} scales of kernel {kernel}"
        )
    moved = x.movedim(dim, -1)  # [..., T]
    lead = moved.shape[:-1]
    z = moved.reshape(-1, 1, moved.shape[-1])  # [N, 1, T]
    out = [x]
    for _ in range(1, scales):
        z = F.avg_pool1d(z, kernel)  # [N, 1, T // kernel^m]
        out.append(z.reshape(*lead, -1).movedim(-1, dim))  # x's layout, axis dim shortened
    return out


def multiscale_mse(
    student: Tensor, teacher: Tensor, dim: int, scales: int = 4, kernel: int = 2
) -> Tensor:
    """``mean_m MSE(Pool^m student, Pool^m teacher)`` over ``m = 0..scales-1``."""
    pairs = zip(
        pool_pyramid(student, dim, scales, kernel),
        pool_pyramid(teacher, dim, scales, kernel),
        strict=True,
    )
    return torch.stack([F.mse_loss(s, t) for s, t in pairs]).mean()


def frequency_log_softmax(
    x: Tensor, dim: int, temperature: float = 0.5, norm: FFTNorm = "ortho"
) -> Tensor:
    """Log-softmax over the non-DC |rFFT| bins of ``x`` along ``dim``; frequencies moved last.

    ``[B, H, C]`` along ``dim=1`` gives ``[B, C, H // 2]``: one distribution per window and channel.
    """
    amplitude = torch.fft.rfft(x.movedim(dim, -1), dim=-1, norm=norm).abs()[..., 1:]  # [..., T//2]
    return F.log_softmax(amplitude / temperature, dim=-1)


def period_kl(
    teacher: Tensor, student: Tensor, dim: int, temperature: float = 0.5, norm: FFTNorm = "ortho"
) -> Tensor:
    """``KL(Q_teacher || Q_student)`` of the frequency distributions, mean over rows."""
    log_q_t = frequency_log_softmax(teacher, dim, temperature, norm)  # [..., F]
    log_q_s = frequency_log_softmax(student, dim, temperature, norm)  # [..., F]
    return (log_q_t.exp() * (log_q_t - log_q_s)).sum(-1).mean()


class Regressor(nn.Module):
    """Maps a teacher feature ``[B, C, D_t]`` to the student's width: ``[B, C, D]``."""

    def __init__(self, teacher_dim: int, student_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(teacher_dim, student_dim), nn.ReLU(), nn.Linear(student_dim, student_dim)
        )

    def forward(self, h: Tensor) -> Tensor:
        return self.net(h)  # [B, C, D]


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class DistillConfig:
    """What to distil from and how; ``alpha``/``beta`` of None take the dataset's default."""

    teachers: tuple[str, ...] = ("simmtm", "himtm", "dmae")
    teacher_dir: str = "runs"  # finetune's default output folder
    teacher_lookback: int = 336  # only used to resolve teacher names to run folders
    alpha: float | None = None
    beta: float | None = None
    temperature: float = 0.5
    scales: int = 4
    pool_kernel: int = 2
    feature_terms: bool = True  # the beta terms
    period: bool = True  # the KL_period terms
    scale: bool = True  # the multi-scale MSE terms
    weighting: Weighting = "mean"
    fft_norm: FFTNorm = "ortho"  # torch.fft.rfft's norm; "backward" = unnormalised
    feature_norm: Literal["standardize", "none"] = "none"  # "standardize": per row along D
    cache: bool = True
    cache_max_mb: int = 1024  # per teacher, features; above it features are recomputed per batch
    evaluate_teachers: bool = True  # score each teacher and the ensemble on val and test

    def __post_init__(self) -> None:
        if not self.teachers:
            raise ValueError("distill needs at least one teacher")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be 'mean' or 'val-weighted', got {self.weighting!r}")
        if self.temperature <= 0 or self.scales < 1 or self.pool_kernel < 1:
            raise ValueError("temperature must be > 0, scales and pool_kernel >= 1")
        if self.weighting == "val-weighted" and not self.evaluate_teachers:
            raise ValueError("weighting 'val-weighted' needs evaluate_teachers (val MSE)")

    def alpha_beta(self, dataset: str) -> tuple[float, float]:
        """The weights in effect: explicit values, else the dataset's default; ablations zero."""
        default = DATASET_DEFAULTS.get(dataset.lower(), FALLBACK_ALPHA_BETA)
        alpha = default[0] if self.alpha is None else self.alpha
        beta = default[1] if self.beta is None else self.beta
        return alpha, beta if self.feature_terms else 0.0

    def student_name(self, teacher_names: Sequence[str]) -> str:
        """``student-<teacher>`` or ``student-ensemble``, with ablation suffixes."""
        base = f"student-{teacher_names[0]}" if len(teacher_names) == 1 else "student-ensemble"
        off = [
            n
            for n, on in (
                ("features", self.feature_terms),
                ("period", self.period),
                ("scale", self.scale),
            )
            if not on
        ]
        return base + "".join(f"-no-{n}" for n in off)


@dataclass(frozen=True)
class DistillRunConfig:
    """One distillation run: the student's supervised run config plus the distillation settings."""

    run: RunConfig
    distill: DistillConfig = field(default_factory=DistillConfig)
    resume: bool = False

    def resolved_out_dir(self, student_name: str) -> Path:
        if self.run.out_dir:
            return Path(self.run.out_dir)
        return self.run.default_out_dir(student_name)


def build_distill_config(
    config_file: Path | None = None,
    data: dict[str, Any] | None = None,
    train: dict[str, Any] | None = None,
    distill: dict[str, Any] | None = None,
    model_settings: dict[str, Any] | None = None,
    out_dir: str | None = None,
    resume: bool = False,
) -> DistillRunConfig:
    """Defaults <- ``training/configs/distill.toml`` (or ``config_file``) <- overrides.

    The TOML has the usual ``[data] [model] [train]`` tables (the student's) plus ``[distill]``.
    """
    path = config_file or DEFAULT_CONFIG
    run = build_run_config("mlp", path, data, train, model_settings, out_dir)
    doc = load_toml(path) if path.exists() else {}
    values = {**doc.get("distill", {}), **(distill or {})}
    if "teachers" in values:
        values["teachers"] = tuple(values["teachers"])
    return DistillRunConfig(run, _update(DistillConfig(), values, f"{path} [distill]"), resume)


# --------------------------------------------------------------------------- teachers


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


def resolve_teacher_dir(spec: str, dataset: str, horizon: int, cfg: DistillConfig) -> Path:
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


def load_teachers(data: PreparedData, cfg: DistillConfig) -> list[Teacher]:
    """Load, check against the student's data, and freeze every teacher."""
    dataset, horizon = data.info.name, data.config.horizon
    teachers = []
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
    """A teacher's outputs on every window of a split: ``y [N, H, C]``, ``h [N, C, D_t] | None``."""

    y: Tensor
    h: Tensor | None


_MEMO: OrderedDict[Hashable, TeacherPass] = OrderedDict()
_MEMO_MAX_BYTES = 3 * 2**30  # oldest passes are dropped beyond this (features dominate)


def clear_memo() -> None:
    _MEMO.clear()


@torch.no_grad()
def teacher_pass(
    teacher: Teacher,
    data: PreparedData,
    split: str,
    features: bool,
    max_feature_mb: float = float("inf"),
    batch_size: int = 256,
    progress: bool = True,
) -> TeacherPass:
    """Run a frozen teacher once over a split (memoised); features kept when they fit the budget."""
    windows = data.splits[split]
    n, c = len(windows), data.channels
    feature_mb = n * c * teacher.model.feature_dim * 2 / 2**20  # float16
    keep_h = features and feature_mb <= max_feature_mb
    if features and not keep_h:
        log.info(
            "%s: %s features would take %.0f MB (> %.0f): recomputed per batch",
            teacher.name,
            split,
            feature_mb,
            max_feature_mb,
        )
    weights = teacher.run_dir / "best.safetensors"
    key = (str(weights.resolve()), weights.stat().st_mtime_ns, data.config, split)
    hit = _MEMO.get(key)
    if hit is not None and (hit.h is not None or not keep_h):
        _MEMO.move_to_end(key)
        return TeacherPass(hit.y, hit.h if keep_h else None)

    model, lookback = teacher.model, teacher.lookback
    model.eval()
    ys, hs = [], []
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
        y, h = model.forward_features(x[:, -lookback:])  # [B, H, C], [B, C, D_t]
        ys.append(y)
        if keep_h:
            hs.append(h.half())
    out = TeacherPass(torch.cat(ys), torch.cat(hs) if keep_h else None)
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


# --------------------------------------------------------------------------- the loss


class DistillationLoss(nn.Module):
    """The TimeDistill objective; owns one regressor per teacher (trained with the student)."""

    def __init__(
        self,
        cfg: DistillConfig,
        alpha: float,
        beta: float,
        teacher_dims: Sequence[int],
        student_dim: int,
    ) -> None:
        super().__init__()
        self.cfg, self.alpha, self.beta = cfg, alpha, beta
        self.regressors = nn.ModuleList(
            Regressor(d, student_dim) for d in (teacher_dims if beta > 0 else [])
        )

    def _feature(self, h: Tensor) -> Tensor:
        if self.cfg.feature_norm == "none":
            return h
        # [B, C, D] standardised along D per (window, channel) row
        mean = h.mean(-1, keepdim=True)  # [B, C, 1]
        std = torch.sqrt(h.var(-1, keepdim=True, unbiased=False) + 1e-5)  # [B, C, 1]
        return (h - mean) / std  # [B, C, D]

    def _align(self, student: Tensor, teacher: Tensor, dim: int) -> dict[str, Tensor]:
        cfg = self.cfg
        terms = {}
        if cfg.period:
            terms["period"] = period_kl(teacher, student, dim, cfg.temperature, cfg.fft_norm)
        if cfg.scale:
            terms["scale"] = multiscale_mse(student, teacher, dim, cfg.scales, cfg.pool_kernel)
        return terms

    def forward(
        self,
        y_s: Tensor,
        h_s: Tensor,
        y: Tensor,
        y_t: Tensor,
        h_t: Sequence[Tensor] = (),
    ) -> dict[str, Tensor]:
        """Every term and ``total``.

        ``y_s``, ``y``, ``y_t``: ``[B, H, C]``; ``h_s``: ``[B, C, D]``; ``h_t[k]``: ``[B, C, D_k]``.
        """
        terms = {"mse": F.mse_loss(y_s, y)}
        total = terms["mse"]
        if self.alpha > 0:
            pred = self._align(y_s, y_t, dim=1)
            terms.update({f"pred_{k}": v for k, v in pred.items()})
            total = total + self.alpha * sum(pred.values(), torch.zeros(()))
        if self.beta > 0:
            if len(h_t) != len(self.regressors):
                n_reg = len(self.regressors)
                raise ValueError(f"{len(h_t)} teacher features for {n_reg} regressors")
            feat: dict[str, Tensor] = {}
            student = self._feature(h_s)
            for regressor, h in zip(self.regressors, h_t, strict=True):
                for k, v in self._align(student, self._feature(regressor(h.float())), -1).items():
                    feat[k] = feat.get(k, torch.zeros(())) + v / len(self.regressors)
            terms.update({f"feat_{k}": v for k, v in feat.items()})
            total = total + self.beta * sum(feat.values(), torch.zeros(()))
        terms["total"] = total
        return terms


# --------------------------------------------------------------------------- training


@dataclass
class TeacherBatch:
    y: Tensor  # [B, H, C] the (ensemble) target
    h: list[Tensor]  # [B, C, D_k] per teacher, or empty without feature terms


class TeacherWindows(WindowSet):
    """Training windows that also gather the teachers' cached outputs for each batch.

    ``fit`` hands the objective ``(x, y)`` only; this split records the batch it just served in
    ``current`` so the objective can look up the teachers' outputs by window index. Features that
    were too large to cache are recomputed here from ``x``.
    """

    def __init__(
        self,
        base: WindowSet,
        target: Tensor,
        features: Sequence[Tensor | None],
        teachers: Sequence[Teacher],
    ) -> None:
        super().__init__(base.series.numpy(), base.lookback, base.horizon, base.start_row)
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
                with torch.no_grad():
                    h.append(t.model.forward_features(x[:, -t.lookback :])[1])  # [B, C, D_k]
        self.current = TeacherBatch(self.target[index], h)
        return x, y


@dataclass
class DistillResult:
    name: str
    fit: FitResult
    teachers: list[dict[str, Any]]
    alpha: float
    beta: float
    weighting: Weighting
    scores: dict[str, Any] | None  # score_teachers' output, when the teachers were scored
    params: int
    teacher_seconds: float  # the teachers' passes (scoring + cache), before the first epoch

    @property
    def target(self) -> dict[str, Any] | None:
        """Val/test metrics of the prediction target: the teacher, or the ensemble as weighted."""
        return self.scores["ensemble"][self.weighting] if self.scores else None

    def summary(self) -> dict[str, Any]:
        out = {
            "model": self.name,
            "params": self.params,
            "alpha": self.alpha,
            "beta": self.beta,
            "teachers": [{"name": t["name"], "lookback": t["lookback"]} for t in self.teachers],
            **self.fit.summary(),
        }
        if self.target is not None:
            out["teacher_target_test_mse"] = self.target["test"]["mse"]
        return out


def run_distill(cfg: DistillRunConfig) -> DistillResult:
    """Train the student against the teachers; writes ``best.safetensors`` and ``run.json``."""
    run, dcfg = cfg.run, cfg.distill
    train_cfg = run.train
    if train_cfg.threads:
        torch.set_num_threads(train_cfg.threads)
    data = prepare(run.data)
    teachers = load_teachers(data, dcfg)
    alpha, beta = dcfg.alpha_beta(data.info.name)
    name = dcfg.student_name([t.name for t in teachers])
    progress = train_cfg.progress

    t0 = time.perf_counter()
    scores = score_teachers(teachers, data, progress) if dcfg.evaluate_teachers else None
    val_mse = [scores["teachers"][t.name]["val"]["mse"] for t in teachers] if scores else []
    weights = ensemble_weights(val_mse or [1.0] * len(teachers), dcfg.weighting)
    budget = dcfg.cache_max_mb if dcfg.cache else -1.0
    passes = [
        teacher_pass(t, data, "train", features=beta > 0, max_feature_mb=budget, progress=progress)
        for t in teachers
    ]
    target = combine([p.y for p in passes], weights)  # [N, H, C]
    features = [p.h for p in passes] if beta > 0 else []
    feature_teachers = teachers if beta > 0 else []
    teacher_seconds = time.perf_counter() - t0
    log.info("teacher passes took %.1fs (weights %s)", teacher_seconds, weights.tolist())

    seed_everything(train_cfg.seed)  # initial weights of the student and regressors
    student = build_model(
        "mlp", lookback=run.data.lookback, horizon=run.data.horizon, **run.model_settings
    )
    criterion = DistillationLoss(
        dcfg, alpha, beta, [t.model.feature_dim for t in teachers], student.feature_dim
    )
    trainable = nn.ModuleDict({"student": student, "criterion": criterion})
    windows = TeacherWindows(data.splits["train"], target, features, feature_teachers)
    train_data = replace(data, splits={**data.splits, "train": windows})

    def objective(x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        batch = windows.current
        if batch is None:
            raise RuntimeError("TeacherWindows served no batch before the objective ran")
        y_s, h_s = student.forward_features(x)
        terms = criterion(y_s, h_s, y, batch.y, batch.h)
        return terms["total"], {k: v.detach() for k, v in terms.items() if k != "total"}

    teacher_info = [t.describe() for t in teachers]
    for info, w in zip(teacher_info, weights.tolist(), strict=True):
        info["weight"] = w
        if scores:
            info["val_mse"] = scores["teachers"][info["name"]]["val"]["mse"]
            info["test_mse"] = scores["teachers"][info["name"]]["test"]["mse"]
    out_dir = cfg.resolved_out_dir(name)
    run_info = {
        "model": "mlp",
        "name": name,
        "kind": MODELS["mlp"].kind,
        "model_config": asdict(student.cfg),
        "params": count_params(student),
        "data": asdict(run.data),
        "dataset": data.describe(),
        "distill": {**asdict(dcfg), "alpha_used": alpha, "beta_used": beta},
        "teachers": teacher_info,
        "teacher_scores": scores,
        "teacher_seconds": round(teacher_seconds, 2),
    }
    log.info(
        "distilling %s (%d parameters, alpha %g, beta %g) from %s -> %s",
        name,
        run_info["params"],
        alpha,
        beta,
        [t.name for t in teachers],
        out_dir,
    )
    result = fit(
        student,
        train_data,
        train_cfg,
        out_dir,
        loss_fn=objective,
        trainable=trainable,
        run_info=run_info,
        resume=cfg.resume,
        desc=name,
    )
    return DistillResult(
        name,
        result,
        teacher_info,
        alpha,
        beta,
        dcfg.weighting,
        scores,
        run_info["params"],
        teacher_seconds,
    )


__all__ = [
    "DATASET_DEFAULTS",
    "DistillConfig",
    "DistillRunConfig",
    "DistillationLoss",
    "Regressor",
    "Teacher",
    "build_distill_config",
    "frequency_log_softmax",
    "load_teachers",
    "multiscale_mse",
    "period_kl",
    "pool_pyramid",
    "run_distill",
    "score_teachers",
    "teacher_pass",
]
