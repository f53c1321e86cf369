"""The TimeDistill objective: loss primitives, the feature regressor, ``DistillationLoss``.

The run that uses them (teachers, cache, training) is ``training/distill.py``; its docstring gives
the objective and the choices made where the paper is silent. Shapes: forecasts ``[B, H, C]``
(aligned along time, ``dim=1``), features ``[B, C, D]`` (aligned along the feature axis).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FFTNorm = Literal["backward", "ortho", "forward"]
KLReduction = Literal["sum", "mean"]
FeatureNorm = Literal["standardize", "none"]


@dataclass(frozen=True)
class LossConfig:
    """The objective's form (``DistillConfig.loss`` builds it from the run's settings)."""

    temperature: float = 0.5
    scales: int = 4
    pool_kernel: int = 2
    period: bool = True  # the KL_period terms
    scale: bool = True  # the multi-scale MSE terms
    fft_norm: FFTNorm = "ortho"
    feature_norm: FeatureNorm = "none"
    kl_reduction: KLReduction = "sum"


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
    teacher: Tensor,
    student: Tensor,
    dim: int,
    temperature: float = 0.5,
    norm: FFTNorm = "ortho",
    reduction: KLReduction = "sum",
) -> Tensor:
    """``KL(Q_teacher || Q_student)`` of the frequency distributions.

    ``reduction="sum"``: summed over frequencies, mean over rows (the KL of each row's
    distribution); ``"mean"``: mean over every (row, frequency) element, as the authors' code
    reduces it (``F.kl_div(..., reduction="mean")``), i.e. the former divided by the number of
    frequencies.
    """
    log_q_t = frequency_log_softmax(teacher, dim, temperature, norm)  # [..., F]
    log_q_s = frequency_log_softmax(student, dim, temperature, norm)  # [..., F]
    pointwise = log_q_t.exp() * (log_q_t - log_q_s)  # [..., F]
    return pointwise.sum(-1).mean() if reduction == "sum" else pointwise.mean()


class Regressor(nn.Module):
    """Maps a teacher feature ``[B, C, D_t]`` to the student's width: ``[B, C, D]``."""

    def __init__(self, teacher_dim: int, student_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(teacher_dim, student_dim), nn.ReLU(), nn.Linear(student_dim, student_dim)
        )

    def forward(self, h: Tensor) -> Tensor:
        out: Tensor = self.net(h)  # [B, C, D]
        return out


class DistillationLoss(nn.Module):
    """The TimeDistill objective; owns one regressor per teacher (trained with the student)."""

    def __init__(
        self,
        cfg: LossConfig,
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
            terms["period"] = period_kl(
                teacher, student, dim, cfg.temperature, cfg.fft_norm, cfg.kl_reduction
            )
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


__all__ = [
    "DistillationLoss",
    "FFTNorm",
    "FeatureNorm",
    "KLReduction",
    "LossConfig",
    "Regressor",
    "frequency_log_softmax",
    "multiscale_mse",
    "period_kl",
    "pool_pyramid",
]
