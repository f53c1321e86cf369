"""TimeDistill's student: a decomposed, channel-independent two-branch MLP ("DMLP")."""

from __future__ import annotations

from dataclasses import dataclass

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


class Branch(nn.Module):
    """``Linear(L -> D) -> BatchNorm -> ReLU -> Linear(D -> H)`` along time, per channel."""

    def __init__(self, lookback: int, hidden: int, horizon: int, dropout: float) -> None:
        super().__init__()
        self.inp = nn.Linear(lookback, hidden)
        # BatchNorm over D on [B*C, D] rows keeps weights channel-shared (any channel count) and
        # runs on CPU, unlike the authors' CUDA-only layer.
        self.norm = nn.BatchNorm1d(hidden)
        self.out = nn.Sequential(nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, horizon))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        # x: [B, C, L]
        b, c, _ = x.shape
        h = self.inp(x)  # [B, C, D]
        z = self.norm(h.reshape(b * c, -1))  # [B*C, D]
        y = self.out(z).reshape(b, c, -1)  # [B, C, H]
        return y, h


class MLP(Forecaster):
    """TimeDistill student MLP (Ni et al., 2025, "TimeDistill", the authors' DMLP).

    Series decomposition (moving average, kernel 25) into seasonal and trend; each goes through
    its own ``Linear(L->D) -> BatchNorm -> ReLU -> Linear(D->H)`` along time and the two
    forecasts are summed. Channel-independent, D = 512.

    Choices where the paper is silent: the distillation feature ``H_s`` is the *sum* of the two
    branches' first hidden layers before BatchNorm (one ``[B, C, D]`` tensor, as the loss needs);
    normalisation defaults to RevIN (shared affine) rather than mean-subtraction, because it makes
    the exported graph scale-free (raw values in, raw values out, any channel count) and trains
    as well on ETT here; ``norm="mean"`` gives the paper's ETT setting.
    """

    def __init__(self, cfg: MLPConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.lookback, self.horizon, self.feature_dim = cfg.lookback, cfg.horizon, cfg.hidden
        self.scale_equivariant = cfg.norm.startswith("revin")
        self.norm = make_norm(cfg.norm)
        self.decomp = SeriesDecomposition(cfg.kernel_size)
        self.seasonal = Branch(cfg.lookback, cfg.hidden, cfg.horizon, cfg.dropout)
        self.trend = Branch(cfg.lookback, cfg.hidden, cfg.horizon, cfg.dropout)

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
            weights, biases = [], []
            for branch, a in ((model.seasonal, seasonal[..., 0].T), (model.trend, trend[..., 0].T)):
                bn = branch.norm
                assert bn.running_mean is not None and bn.running_var is not None
                scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)  # [D]
                weights.append(scale[:, None] * (branch.inp.weight.double() @ a))  # [D, L]
                biases.append(
                    scale * (branch.inp.bias.double() - bn.running_mean.double()) + bn.bias.double()
                )  # [D]
            self.inp = nn.Linear(lookback, 2 * hidden)
            self.inp.weight.copy_(torch.cat(weights).float())
            self.inp.bias.copy_(torch.cat(biases).float())
            outs = [model.seasonal.out[-1], model.trend.out[-1]]
            self.out = nn.Linear(2 * hidden, model.horizon)
            self.out.weight.copy_(torch.cat([o.weight for o in outs], dim=1))  # type: ignore[union-attr]
            self.out.bias.copy_(outs[0].bias + outs[1].bias)  # type: ignore[operator]

    def forward(self, x: Tensor) -> Tensor:
        # x: [B, L, C]
        mean, std = self.norm.stats(x)  # [B, 1, C] each
        z = self.norm.normalize(x, mean, std).transpose(1, 2)  # [B, C, L]
        y = self.out(torch.relu(self.inp(z))).transpose(1, 2)  # [B, H, C]
        return self.norm.denormalize(y, mean, std)


def build(cfg: MLPConfig) -> MLP:
    return MLP(cfg)


__all__ = ["MLP", "FoldedMLP", "MLPConfig", "build"]
