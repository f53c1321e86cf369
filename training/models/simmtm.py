"""SimMTM: masked pretraining by series-wise similarity aggregation, fine-tuned to forecast."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.models.base import TokenForecaster
from training.models.layers import Encoder, Patcher, n_patches
from training.models.masking import geometric_mask, masked_instance_norm


@dataclass(frozen=True)
class SimMTMConfig:
    lookback: int = 336
    horizon: int = 96
    # Tokens: overlapping patches (see the class docstring for why not one token per step).
    patch_len: int = 16
    stride: int = 8
    d_model: int = 32
    n_heads: int = 4
    d_ff: int = 64
    n_layers: int = 2
    norm: str = "batch"  # "batch" or "layer" (the authors'): see the class docstring
    dropout: float = 0.1
    head_dropout: float = 0.0
    # Pretext task (paper defaults: ratio 0.5, mean span 3, M = 3 copies, T = 0.2, 128 dims).
    mask_ratio: float = 0.5
    mean_span: float = 3.0
    n_copies: int = 3
    temperature: float = 0.2
    proj_dim: int = 128


class SimMTMEncoder(nn.Module):
    """Channel-independent Transformer over one series: ``z [N, L] -> tokens [N, P, D]``.

    Token embedding is the paper's ``Conv1d`` of kernel 3 (each token also sees its neighbours),
    applied to patch vectors instead of single time steps, plus a learned positional embedding;
    the encoder is a post-norm Transformer with BatchNorm (``norm="layer"``: the authors' LN).
    """

    def __init__(self, cfg: SimMTMConfig) -> None:
        super().__init__()
        if cfg.norm not in ("batch", "layer"):
            raise ValueError(f"norm must be 'batch' or 'layer', got {cfg.norm!r}")
        self.n_patches = n_patches(cfg.lookback, cfg.patch_len, cfg.stride)
        self.patcher = Patcher(cfg.patch_len, cfg.stride)
        # Replicate rather than the authors' circular padding: wrapping the window would mix the
        # most recent patch (the one that matters most for forecasting) with the oldest one.
        self.embed = nn.Conv1d(
            cfg.patch_len, cfg.d_model, kernel_size=3, padding=1, padding_mode="replicate"
        )
        self.pos = nn.Parameter(torch.empty(self.n_patches, cfg.d_model).uniform_(-0.02, 0.02))
        self.drop = nn.Dropout(cfg.dropout)
        self.encoder = Encoder(
            cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.n_layers, cfg.dropout, norm=cfg.norm
        )

    def forward(self, z: Tensor) -> Tensor:
        # z: [N, L] (instance-normalised)
        patches = self.patcher(z)  # [N, P, patch_len]
        tokens = self.embed(patches.transpose(1, 2)).transpose(1, 2)  # [N, P, D]
        out: Tensor = self.encoder(self.drop(tokens + self.pos))  # [N, P, D]
        return out


def aggregation_weights(sim: Tensor, temperature: float) -> Tensor:
    """Row-stochastic weights ``softmax(sim / T)`` over the *other* rows.

    ``sim`` is ``[N, R]``: similarities of the first ``N`` rows of the batch to all ``R`` rows, so
    row ``i`` is itself at column ``i``; that entry gets weight 0 and each row sums to 1.
    """
    n, r = sim.shape
    self_mask = torch.eye(n, r, dtype=torch.bool, device=sim.device)  # [N, R]
    logits = (sim / temperature).masked_fill(self_mask, float("-inf"))  # [N, R]
    return logits.softmax(dim=1)  # [N, R]


class AutomaticWeightedLoss(nn.Module):
    """Learned loss weights, uncertainty style (the SimMTM authors' ``AutomaticWeightedLoss``).

    ``sum_i 0.5 / p_i^2 * L_i + log(1 + p_i^2)``: the log term keeps a weight from growing
    without bound to switch its loss off.
    """

    def __init__(self, n: int) -> None:
        super().__init__()
        self.params = nn.Parameter(torch.ones(n))

    def forward(self, *losses: Tensor) -> Tensor:
        total = torch.zeros((), device=self.params.device)
        for p, loss in zip(self.params, losses, strict=True):
            total = total + 0.5 / p**2 * loss + torch.log1p(p**2)
        return total


class SimMTMPretrainer(nn.Module):
    """SimMTM's pretext task on top of :class:`SimMTMEncoder` (``self.backbone``).

    One step, for a batch of ``N = B*C`` single-channel series (channel independence):
    1. ``M`` masked copies per series with geometric span masks (ratio 0.5, mean span 3); the
       rows are ``[originals; copy 1; ...; copy M]`` (``R = N (M + 1)``). Each row is
       instance-normalised with the statistics of its *visible* points; hidden points are 0.
    2. The encoder gives point-wise (here patch-wise) representations ``[R, P, D]``; the
       series-wise projector (flatten -> Linear -> BatchNorm -> ReLU -> Linear) gives ``[R, 128]``.
    3. Cosine similarities over all rows. Constraint loss: KL between the target that is uniform
       over the *other copies of the same series* and ``softmax(sim / T)`` with self excluded.
    4. Reconstruction of each original as ``sum_j softmax(sim / T)_ij z_j`` over the other rows
       (self excluded), through a flatten head back to ``L`` points; MSE against the original
       (in its normalised scale).
    5. The two losses are combined with learned (uncertainty) weights.
    """

    def __init__(self, cfg: SimMTMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = SimMTMEncoder(cfg)
        flat = self.backbone.n_patches * cfg.d_model
        self.projector = nn.Sequential(
            nn.Linear(flat, cfg.proj_dim),
            nn.BatchNorm1d(cfg.proj_dim),
            nn.ReLU(),
            nn.Linear(cfg.proj_dim, cfg.proj_dim),
        )
        self.decoder = nn.Linear(flat, cfg.lookback)
        self.weighting = AutomaticWeightedLoss(2)

    def masked_batch(
        self, series: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """``[N, L]`` -> normalised rows ``[N (M+1), L]`` and their visibility ``[N (M+1), L]``."""
        n, length = series.shape
        m = self.cfg.n_copies
        hidden = geometric_mask(
            n * m, length, self.cfg.mask_ratio, self.cfg.mean_span, generator, series.device
        )  # [N*M, L]
        visible = torch.cat([torch.ones_like(hidden[:n]), ~hidden])  # [R, L]
        rows = series.repeat(m + 1, 1)  # [R, L]: originals, then copy 1 of every series, ...
        z, _, _ = masked_instance_norm(rows, visible)  # [R, L]
        return z, visible

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        # x: [B, L, C]
        b, length, c = x.shape
        n = b * c
        series = x.transpose(1, 2).reshape(n, length)  # [N, L]
        z, _ = self.masked_batch(series)  # [R, L]
        tokens = self.backbone(z)  # [R, P, D]
        flat = tokens.flatten(1)  # [R, P*D]
        s = F.normalize(self.projector(flat), dim=1)  # [R, proj]
        sim = s @ s.T  # [R, R] cosine similarities

        series_id = torch.arange(n, device=x.device).repeat(self.cfg.n_copies + 1)  # [R]
        same = series_id[:, None] == series_id[None, :]  # [R, R]
        self_mask = torch.eye(len(series_id), dtype=torch.bool, device=x.device)  # [R, R]
        positives = (same & ~self_mask).float()  # [R, R]
        target = positives / positives.sum(dim=1, keepdim=True)  # [R, R]
        logits = (sim / self.cfg.temperature).masked_fill(self_mask, -1e9)  # [R, R]
        log_q = F.log_softmax(logits, dim=1)  # [R, R]
        # KL(target || q) per row; 0 * log 0 terms are dropped by xlogy.
        constraint = (torch.xlogy(target, target) - target * log_q).sum(dim=1).mean()

        weights = aggregation_weights(sim[:n], self.cfg.temperature)  # [N, R]
        rebuilt = weights @ flat  # [N, P*D]
        recon = self.decoder(rebuilt)  # [N, L]
        reconstruction = F.mse_loss(recon, z[:n])
        loss = self.weighting(reconstruction, constraint)
        return loss, {"reconstruction": reconstruction.detach(), "constraint": constraint.detach()}

    def after_step(self) -> None:
        """No teacher to update."""


class SimMTM(TokenForecaster):
    """SimMTM (Dong et al., NeurIPS 2023, "SimMTM: A Simple Pre-Training Framework for Masked
    Time-Series Modeling"), fine-tuned to forecast.

    Forecaster: RevIN -> :class:`SimMTMEncoder` (pretrained by :class:`SimMTMPretrainer`) ->
    flatten -> dropout -> Linear to the horizon, the paper's fine-tuning head; the whole network is
    fine-tuned. ``H_t`` is the flattened last encoder output ``[B, C, P*d_model]``.

    Simplified / chosen where the paper is silent or too costly here:
    * tokens are overlapping patches (16 steps, stride 8: 42 tokens at L=336) instead of one token
      per time step. Point-wise tokens mean 336-token attention over ``B*C*(M+1)`` rows, far
      beyond a 2-core CPU budget; masking stays point-wise (spans of time steps), and the
      "point-wise representations" that are aggregated are these patch tokens;
    * small sizes (d_model 32, 2 layers) for the same budget reason;
    * BatchNorm in the encoder instead of the authors' LayerNorm (``norm="layer"`` restores it).
      LayerNorm normalises every token on its own, removing each patch's level and scale that a
      forecasting head needs. Chosen on the validation split (``bench/validation_choices.py``,
      group ``norm``: ETTh1 H=96, the teacher bench's budget, one seed): validation MSE
      pretrained + fine-tuned 0.708 (LN) -> 0.666 (BN), from scratch 0.694 -> 0.658 [test,
      reported only: 0.395 -> 0.379 and 0.384 -> 0.376];
    * reconstruction loss on the normalised scale of each original (the authors de-normalise
      first; this only reweights series by their variance);
    * the aggregation only rebuilds the originals (the only rows the paper's loss uses).
    """

    def __init__(self, cfg: SimMTMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.lookback, self.horizon = cfg.lookback, cfg.horizon
        self.backbone = SimMTMEncoder(cfg)
        self.init_head(self.backbone.n_patches * cfg.d_model, cfg.horizon, cfg.head_dropout)

    def encode(self, z: Tensor) -> Tensor:
        out: Tensor = self.backbone(z)  # [B*C, P, D]
        return out


def build(cfg: SimMTMConfig) -> SimMTM:
    return SimMTM(cfg)


def build_pretrainer(cfg: SimMTMConfig) -> SimMTMPretrainer:
    return SimMTMPretrainer(cfg)


__all__ = [
    "SimMTM",
    "SimMTMConfig",
    "SimMTMEncoder",
    "SimMTMPretrainer",
    "aggregation_weights",
    "build",
    "build_pretrainer",
]
