"""MTS-DMAE: dual-masked autoencoder pretraining, fine-tuned to forecast."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.models.base import TokenForecaster
from training.models.layers import Encoder, EncoderLayer, ema_update, front_pad
from training.models.masking import geometric_mask, masked_instance_norm, normalise


@dataclass(frozen=True)
class DMAEConfig:
    lookback: int = 336
    horizon: int = 96
    patch_len: int = 8  # non-overlapping: masked values map back to exactly one token
    d_model: int = 32
    n_heads: int = 4
    d_ff: int = 64
    n_layers: int = 3
    dropout: float = 0.1
    head_dropout: float = 0.0
    # Pretext task (paper: ratio 0.15, mean span 3).
    mask_ratio: float = 0.15
    mean_span: float = 3.0
    query_layers: int = 1
    align_weight: float = 1.0
    ema_decay: float = 0.99


class DMAEEncoder(nn.Module):
    """BatchNorm Transformer over one series' patches: ``(z, observed) [N, L] -> [N, P, D]``.

    Each token embeds a patch's values *and* its observed flags (``Linear(2 * patch_len -> D)``),
    so the encoder can tell a hidden value (0) from an observed 0; forecasting passes all-ones.
    """

    def __init__(self, cfg: DMAEConfig) -> None:
        super().__init__()
        self.patch_len = cfg.patch_len
        self.n_patches = math.ceil(cfg.lookback / cfg.patch_len)
        self.pad = self.n_patches * cfg.patch_len - cfg.lookback
        self.embed = nn.Linear(2 * cfg.patch_len, cfg.d_model)
        self.pos = nn.Parameter(torch.empty(self.n_patches, cfg.d_model).uniform_(-0.02, 0.02))
        self.drop = nn.Dropout(cfg.dropout)
        self.encoder = Encoder(
            cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.n_layers, cfg.dropout, norm="batch"
        )

    def forward(self, z: Tensor, observed: Tensor) -> Tensor:
        # z, observed: [N, L]; the pad repeats the first column: a hidden first value stays hidden
        n = z.shape[0]
        z = front_pad(z, self.pad)  # [N, P * p]
        obs = front_pad(observed.to(z.dtype), self.pad)  # [N, P * p]
        values = z.reshape(n, self.n_patches, self.patch_len)  # [N, P, p]
        flags = obs.reshape(n, self.n_patches, self.patch_len)  # [N, P, p]
        tokens = self.embed(torch.cat([values, flags], dim=-1))  # [N, P, D]
        out: Tensor = self.encoder(self.drop(tokens + self.pos))  # [N, P, D]
        return out


class FeatureQuery(nn.Module):
    """Learned queries (one per token position) cross-attending to the student's features.

    Predicts the teacher's latent of every token from what the student saw: ``[N, P, D]``.
    """

    def __init__(self, cfg: DMAEConfig, n_tokens: int) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.empty(n_tokens, cfg.d_model).normal_(0.0, 0.02))
        self.layers = nn.ModuleList(
            EncoderLayer(cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.dropout, norm="layer")
            for _ in range(cfg.query_layers)
        )
        self.out = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, memory: Tensor) -> Tensor:
        # memory: [N, P, D] student features
        q = self.queries.expand(memory.shape[0], -1, -1)  # [N, P, D]
        for layer in self.layers:
            q = layer(q, memory)  # [N, P, D] cross-attention
        out: Tensor = self.out(q)  # [N, P, D]
        return out


class DMAEPretrainer(nn.Module):
    """DMAE's two pretext tasks on top of :class:`DMAEEncoder` (``self.backbone``).

    One step, for ``N = B*C`` single-channel series:
    1. A geometric span mask ``M`` (hidden = ``True``; ratio 0.15, mean span 3) per series; the
       series is normalised by the statistics of its visible points.
    2. Student (trained) encodes ``X * M_visible``; the teacher (a momentum copy of the student,
       no gradient) encodes the complement ``X * M_hidden``: together they see every value once.
    3. Reconstruction: a linear head maps every student token back to its ``patch_len`` values;
       MSE on the hidden values only.
    4. Alignment: the feature-query module predicts the teacher's (layer-normalised) latents;
       MSE per token, weighted by the fraction of hidden values in the token (the "masked part").
    Loss = reconstruction + ``align_weight`` * alignment; the teacher moves after every step.
    """

    def __init__(self, cfg: DMAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = DMAEEncoder(cfg)
        # Same weights, no dropout (a clean target), gradients off; kept in step by EMA.
        self.teacher = DMAEEncoder(replace(cfg, dropout=0.0))
        self.teacher.load_state_dict(self.backbone.state_dict())
        self.teacher.requires_grad_(False)
        self.recon_head = nn.Linear(cfg.d_model, cfg.patch_len)
        self.query = FeatureQuery(cfg, self.backbone.n_patches)

    def complementary_inputs(self, series: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``[N, L]`` -> (normalised series, hidden mask, student visibility): the student sees
        ``z * ~hidden``, the teacher ``z * hidden``."""
        n, length = series.shape
        hidden = geometric_mask(
            n, length, self.cfg.mask_ratio, self.cfg.mean_span, device=series.device
        )  # [N, L]
        _, mean, std = masked_instance_norm(series, ~hidden)  # stats [N, 1]
        return normalise(series, mean, std), hidden, ~hidden

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        # x: [B, L, C]
        b, length, c = x.shape
        n, p, enc = b * c, self.cfg.patch_len, self.backbone
        z, hidden, visible = self.complementary_inputs(
            x.transpose(1, 2).reshape(n, length)
        )  # [N, L] each
        student = enc(z * visible, visible)  # [N, P, D]
        with torch.no_grad():
            target = self.teacher(z * hidden, hidden)  # [N, P, D]
            target = F.layer_norm(target, target.shape[-1:])  # [N, P, D]

        recon = self.recon_head(student).reshape(n, -1)[:, enc.pad :]  # [N, L]
        w_points = hidden.to(z.dtype)  # [N, L]
        reconstruction = ((recon - z) ** 2 * w_points).sum() / w_points.sum().clamp_min(1.0)

        pred = self.query(student)  # [N, P, D]
        # Share of hidden values per token; the front padding counts as observed.
        share = F.pad(w_points, (enc.pad, 0)).reshape(n, enc.n_patches, p).mean(dim=-1)  # [N, P]
        per_token = ((pred - target) ** 2).mean(dim=-1)  # [N, P]
        alignment = (per_token * share).sum() / share.sum().clamp_min(1e-6)
        loss = reconstruction + self.cfg.align_weight * alignment
        return loss, {"reconstruction": reconstruction.detach(), "alignment": alignment.detach()}

    def after_step(self) -> None:
        ema_update(self.teacher, self.backbone, self.cfg.ema_decay)


class DMAE(TokenForecaster):
    """MTS-DMAE (2025, "MTS-DMAE: Dual-Masked Autoencoder for Unsupervised Multivariate Time
    Series Representation Learning", arXiv 2509.16078), fine-tuned to forecast.

    Forecaster: RevIN -> :class:`DMAEEncoder` (3-layer BatchNorm Transformer, pretrained by
    :class:`DMAEPretrainer`) with every value observed -> flatten -> Linear to the horizon.
    ``H_t`` is the flattened last encoder output ``[B, C, P*d_model]``.

    Choices where the paper is silent or does not fit a 2-core CPU (no public code):
    * channel-independent patch tokens (8 steps, non-overlapping: 42 at L=336) instead of one
      multivariate token per time step; masking stays point-wise (spans of time steps) and the
      embedding also receives the observed flags of its patch;
    * the teacher is a momentum (EMA, decay 0.99) copy of the student, per a third-party summary,
      run without dropout and with BatchNorm on its own batch statistics; its latents are
      layer-normalised before the alignment loss (a target whose scale cannot collapse);
    * the feature-query module has one learned query per token position and predicts every
      token's latent; the alignment loss weights each token by its share of hidden values, so
      tokens without hidden values do not count;
    * fine-tuning uses a flatten head (PatchTST-style) instead of the paper's mean-pooled linear
      head, which is meant for classification;
    * small width (d_model 32) for the CPU budget.
    """

    def __init__(self, cfg: DMAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.lookback, self.horizon = cfg.lookback, cfg.horizon
        self.backbone = DMAEEncoder(cfg)
        self.init_head(self.backbone.n_patches * cfg.d_model, cfg.horizon, cfg.head_dropout)

    def encode(self, z: Tensor) -> Tensor:
        out: Tensor = self.backbone(z, torch.ones_like(z))  # [B*C, P, D]: every value observed
        return out


def build(cfg: DMAEConfig) -> DMAE:
    return DMAE(cfg)


def build_pretrainer(cfg: DMAEConfig) -> DMAEPretrainer:
    return DMAEPretrainer(cfg)


__all__ = [
    "DMAE",
    "DMAEConfig",
    "DMAEEncoder",
    "DMAEPretrainer",
    "FeatureQuery",
    "build",
    "build_pretrainer",
]
