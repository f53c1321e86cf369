"""TimeDistill's student: a decomposed two-branch MLP ("DMLP"), channel-independent or not."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, cast

import torch
from torch import Tensor, nn

from training.models.base import Forecaster
from training.models.layers import SeriesDecomposition, make_norm


@dataclass(frozen=True)
class MLPConfig:
    lookback: int = 336
    horizon: int = 96
    hidden: int = 512
    kernel_size: int = 25
    norm: str = "revin"
    dropout: float = 0.0
    # "hidden": statistics per hidden unit over every (window, channel) row (any channel count);
    # "channel": the authors' DMLP, BatchNorm1d(C) on [B, C, D], statistics per channel over the
    # windows and hidden units (the model is then tied to ``channels``).
    batch_norm: Literal["hidden", "channel"] = "hidden"
    channels: int = 0  # needed by batch_norm = "channel" (build_model fills it from the data)


class Branch(nn.Module):
    """``Linear(L -> D) -> BatchNorm -> ReLU -> Linear(D -> H)`` along time, per channel."""

    def __init__(self, cfg: MLPConfig) -> None:
        super().__init__()
        self.per_channel = cfg.batch_norm == "channel"
        self.inp = nn.Linear(cfg.lookback, cfg.hidden)
        # Both forms run on CPU, unlike the authors' CUDA-only layer.
        self.norm = nn.BatchNorm1d(cfg.channels if self.per_channel else cfg.hidden)
        self.out = nn.Sequential(
            nn.ReLU(), nn.Dropout(cfg.dropout), nn.Linear(cfg.hidden, cfg.horizon)
        )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        # x: [B, C, L]
        b, c, _ = x.shape
        h = self.inp(x)  # [B, C, D]
        if self.per_channel:
            z = self.norm(h)  # [B, C, D], statistics per channel
        else:
            z = self.norm(h.reshape(b * c, -1)).reshape(b, c, -1)  # [B, C, D], per hidden unit
        y = self.out(z)  # [B, C, H]
        return y, h


class MLP(Forecaster):
    """TimeDistill student MLP (Ni et al., 2025, "TimeDistill", the authors' DMLP).

    Series decomposition (moving average, kernel 25) into seasonal and trend; each goes through
    its own ``Linear(L->D) -> BatchNorm -> ReLU -> Linear(D->H)`` along time and the two
    forecasts are summed. D = 512. The distillation feature ``H_s`` is the *sum* of the two
    branches' first hidden layers before BatchNorm, as in the authors' code.

    The class's defaults are our form (``training/configs/distill-ours.toml``); the default
    student config, ``training/configs/distill.toml``, sets the authors' (``batch_norm =
    "channel"``, ``norm = "mean"``), which validation preferred. Where ours differs from the
    authors' DMLP:
    * BatchNorm: ours over each hidden unit, its statistics taken over every (window,
      channel) row, so all weights are shared across channels and the exported graph takes any
      channel count. The authors' layer is ``BatchNorm1d(C)`` on ``[B, C, D]``: statistics per
      *channel* over the windows and hidden units, which ties the model to the channel count of
      its training data; ``batch_norm="channel"`` gives that form.
    * Normalisation: ours is RevIN (shared affine) rather than the authors' per-window mean
      subtraction for ETT, because it makes the exported graph scale-free (raw values in, raw
      values out); ``norm="mean"`` gives the authors' ETT setting.
    """

    def __init__(self, cfg: MLPConfig) -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.batch_norm not in ("hidden", "channel"):
            raise ValueError(f"batch_norm must be 'hidden' or 'channel', got {cfg.batch_norm!r}")
        if cfg.batch_norm == "channel" and cfg.channels < 1:
            raise ValueError("batch_norm = 'channel' needs the channel count (channels >= 1)")
        self.lookback, self.horizon, self.feature_dim = cfg.lookback, cfg.horizon, cfg.hidden
        self.channel_independent = cfg.batch_norm == "hidden"
        self.scale_equivariant = cfg.norm.startswith("revin")
        self.norm = make_norm(cfg.norm)
        self.decomp = SeriesDecomposition(cfg.kernel_size)
        self.seasonal = Branch(cfg)
        self.trend = Branch(cfg)

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        # x: [B, L, C]
        mean, std = self.norm.stats(x)  # [B, 1, C] each
        z = self.norm.normalize(x, mean, std)  # [B, L, C]
        seasonal, trend = self.decomp(z)  # [B, L, C] each
        ys, hs = self.seasonal(seasonal.transpose(1, 2))  # [B, C, H], [B, C, D]
        yt, ht = self.trend(trend.transpose(1, 2))  # [B, C, H], [B, C, D]
        y = (ys + yt).transpose(1, 2)  # [B, H, C]
        return self.norm.denormalize(y, mean, std), hs + ht

    def inference_module(self) -> FoldedMLP:
        """The same function with fewer operators, for the exported graph (see FoldedMLP)."""
        return FoldedMLP(self)


class FoldedMLP(nn.Module):
    """A trained :class:`MLP` in eval mode, folded for serving: same forecasts, fewer operators.

    Everything between the normalisation and the ReLU is linear along time: the moving-average
    decomposition (``seasonal = A_s z``, ``trend = A_t z``, with ``A`` the decomposition applied
    to the unit windows), each branch's ``Linear(L->D)`` and its BatchNorm with fixed statistics.
    So both branches become one ``Linear(L -> 2D)`` (rows ``scale * W A``), and the two output
    layers one ``Linear(2D -> H)``. The exported graph then runs two GEMMs instead of a pooling,
    two pairs of matrix products and two BatchNorms: about a quarter less CPU time per window at
    batch 1 (``bench/speed.py``). Weights are folded in float64; the export's parity check
    compares the graph with the unfolded model. Not for training: ``H_s`` is not exposed.

    With the authors' per-channel BatchNorm the statistics depend on the channel, so they cannot
    go into weights shared across channels: the first GEMM is then followed by a per-channel
    scale and shift (``[C, 2D]`` each).
    """

    def __init__(self, model: MLP) -> None:
        super().__init__()
        model.eval()
        self.lookback, self.horizon = model.lookback, model.horizon
        self.channel_independent = model.channel_independent
        self.scale_equivariant = model.scale_equivariant
        self.norm = model.norm
        lookback, hidden = model.lookback, model.cfg.hidden
        with torch.no_grad():
            eye = torch.eye(lookback, dtype=torch.float64).unsqueeze(-1)  # [L, L, 1] unit windows
            seasonal, trend = model.decomp(eye)  # row j: the response to unit window j
            weights, biases, scales, shifts = [], [], [], []
            for branch, a in ((model.seasonal, seasonal[..., 0].T), (model.trend, trend[..., 0].T)):
                bn = branch.norm
                assert bn.running_mean is not None and bn.running_var is not None
                scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
                shift = bn.bias.double() - scale * bn.running_mean.double()
                w, b = branch.inp.weight.double() @ a, branch.inp.bias.double()  # [D, L], [D]
                if branch.per_channel:  # [C] statistics: applied after the GEMM, per channel
                    weights.append(w)
                    biases.append(b)
                    scales.append(scale[:, None].expand(-1, hidden))  # [C, D]
                    shifts.append(shift[:, None].expand(-1, hidden))  # [C, D]
                else:  # [D] statistics: folded into the weights
                    weights.append(scale[:, None] * w)  # [D, L]
                    biases.append(scale * b + shift)  # [D]
            self.inp = nn.Linear(lookback, 2 * hidden)
            self.inp.weight.copy_(torch.cat(weights).float())
            self.inp.bias.copy_(torch.cat(biases).float())
            # [C, 2D] each for the per-channel BatchNorm, else None (registered either way)
            self.register_buffer("channel_scale", torch.cat(scales, 1).float() if scales else None)
            self.register_buffer("channel_shift", torch.cat(shifts, 1).float() if shifts else None)
            outs = [model.seasonal.out[-1], model.trend.out[-1]]
            assert all(isinstance(o, nn.Linear) for o in outs)
            linears = cast(list[nn.Linear], outs)
            self.out = nn.Linear(2 * hidden, model.horizon)
            self.out.weight.copy_(torch.cat([o.weight for o in linears], dim=1))
            self.out.bias.copy_(linears[0].bias + linears[1].bias)

    def forward(self, x: Tensor) -> Tensor:
        # x: [B, L, C]
        mean, std = self.norm.stats(x)  # [B, 1, C] each
        z = self.norm.normalize(x, mean, std).transpose(1, 2)  # [B, C, L]
        h = self.inp(z)  # [B, C, 2D]
        scale, shift = self.channel_scale, self.channel_shift
        if isinstance(scale, Tensor) and isinstance(shift, Tensor):
            h = h * scale + shift  # per-channel BatchNorm
        y = self.out(torch.relu(h)).transpose(1, 2)  # [B, H, C]
        return self.norm.denormalize(y, mean, std)


def build(cfg: MLPConfig) -> MLP:
    return MLP(cfg)


__all__ = ["MLP", "FoldedMLP", "MLPConfig", "build"]
