"""HiMTM: hierarchical multi-scale masked modelling with self-distillation, for forecasting."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.models.base import TokenForecaster
from training.models.layers import (
    BatchNormTokens,
    Encoder,
    EncoderLayer,
    ema_update,
    front_pad,
    frozen_copy,
)
from training.models.masking import masked_instance_norm, normalise, random_token_mask


@dataclass(frozen=True)
class HiMTMConfig:
    lookback: int = 336
    horizon: int = 96
    patch_len: int = 12  # non-overlapping base patches; level i tokens cover patch_len * 2**i steps
    n_levels: int = 3
    depth: int = 1  # attention layers per level
    d_model: int = 32
    n_heads: int = 4
    d_ff: int = 64
    norm: str = "batch"  # "batch" or "layer", in the encoder, the merges and the cross-scale head
    dropout: float = 0.1
    head_dropout: float = 0.0
    # Pretext task.
    mask_ratio: float = 0.5
    decoder_depth: int = 1
    distill_weight: float = 1.0
    teacher: Literal["shared", "ema"] = "shared"
    ema_decay: float = 0.996


@dataclass(frozen=True)
class Geometry:
    """How a window is cut: base patches, hierarchy units (the masking unit) and front padding."""

    n_base: int  # level-0 tokens
    unit: int  # base patches per top-level token (2 ** (n_levels - 1))
    n_units: int  # top-level tokens
    pad: int  # values repeated in front so that n_base * patch_len covers the window

    @classmethod
    def of(cls, cfg: HiMTMConfig) -> Geometry:
        if cfg.n_levels < 1:
            raise ValueError(f"n_levels must be >= 1, got {cfg.n_levels}")
        unit = 2 ** (cfg.n_levels - 1)
        n_units = math.ceil(math.ceil(cfg.lookback / cfg.patch_len) / unit)
        if n_units < 2:
            raise ValueError(
                f"lookback {cfg.lookback} is too short for {cfg.n_levels} levels of "
                f"{cfg.patch_len}-step patches: need at least 2 top-level tokens to mask one"
            )
        n_base = n_units * unit
        return cls(n_base, unit, n_units, n_base * cfg.patch_len - cfg.lookback)

    def tokens(self, level: int) -> int:
        return self.n_base >> level  # n_base // 2**level


class PatchMerge(nn.Module):
    """Swin-style merge of two adjacent tokens: ``Norm(2D) -> Linear(2D -> D)``."""

    def __init__(self, d_model: int, norm: str) -> None:
        super().__init__()
        self.norm = BatchNormTokens(2 * d_model) if norm == "batch" else nn.LayerNorm(2 * d_model)
        self.reduce = nn.Linear(2 * d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        # x: [N, T, D] with T even; neighbours 2k and 2k+1 are merged
        n, t, d = x.shape
        pairs = x.reshape(n, t // 2, 2 * d)  # [N, T/2, 2D]
        out: Tensor = self.reduce(self.norm(pairs))  # [N, T/2, D]
        return out


class HierarchicalEncoder(nn.Module):
    """Hierarchical multi-scale Transformer over the tokens of some hierarchy units.

    ``forward(patches [N, n_base, patch_len], units [N, U])`` encodes only the base patches that
    belong to the listed top-level units (the visible ones while pretraining, all of them when
    forecasting). Level 0 embeds the patches and attends among them; level ``i > 0`` merges two
    adjacent tokens of level ``i - 1`` and attends among the merged tokens. Because masking works
    on whole units, the two tokens of every merge are always adjacent in the original series.
    Each level has its own learned positional embedding, indexed by the token's true position.
    """

    def __init__(self, cfg: HiMTMConfig) -> None:
        super().__init__()
        if cfg.norm not in ("batch", "layer"):
            raise ValueError(f"norm must be 'batch' or 'layer', got {cfg.norm!r}")
        self.geo = Geometry.of(cfg)
        self.n_levels = cfg.n_levels
        self.embed = nn.Linear(cfg.patch_len, cfg.d_model)
        self.pos = nn.ParameterList(
            nn.Parameter(torch.empty(self.geo.tokens(i), cfg.d_model).uniform_(-0.02, 0.02))
            for i in range(cfg.n_levels)
        )
        self.merges = nn.ModuleList(
            PatchMerge(cfg.d_model, cfg.norm) for _ in range(cfg.n_levels - 1)
        )
        self.levels = nn.ModuleList(
            Encoder(cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.depth, cfg.dropout, norm=cfg.norm)
            for _ in range(cfg.n_levels)
        )
        self.drop = nn.Dropout(cfg.dropout)

    def positions(self, units: Tensor) -> list[Tensor]:
        """Token positions of the given units at every level: ``[N, U * unit / 2**i]``."""
        unit = self.geo.unit
        base = (units[:, :, None] * unit + torch.arange(unit, device=units.device)).flatten(1)
        return [base[:, :: 2**i] // 2**i for i in range(self.n_levels)]  # [N, U * unit / 2**i]

    def forward(self, patches: Tensor, units: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        # patches: [N, n_base, patch_len]; units: [N, U]
        idx = self.positions(units)
        gather = idx[0][:, :, None].expand(-1, -1, patches.shape[-1])  # [N, T0, patch_len]
        x = self.embed(patches.gather(1, gather))  # [N, T0, D]
        feats = []
        for i in range(self.n_levels):
            if i > 0:
                x = self.merges[i - 1](x)  # [N, T_i, D]
            x = self.levels[i](self.drop(x + self.pos[i][idx[i]]))  # [N, T_i, D]
            feats.append(x)
        return feats, idx


class Regressor(nn.Module):
    """Decoupled decoder of one level: mask-token queries, cross- then self-attention.

    Queries are the level's learned mask token plus the positional embedding of each hidden
    token; they attend to the encoder's features of the visible tokens (cross-attention), then to
    each other (self-attention). The output is the predicted latent of every hidden token.
    Pretraining only (dropped when fine-tuning), so it keeps the usual LayerNorm.
    """

    def __init__(self, cfg: HiMTMConfig) -> None:
        super().__init__()
        self.mask_token = nn.Parameter(torch.zeros(cfg.d_model))
        self.layers = nn.ModuleList()
        for _ in range(cfg.decoder_depth):
            self.layers.append(
                EncoderLayer(cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.dropout, norm="layer")
            )
            self.layers.append(
                EncoderLayer(cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.dropout, norm="layer")
            )

    def forward(self, pos: Tensor, memory: Tensor) -> Tensor:
        # pos: [N, T_h, D] positions of the hidden tokens; memory: [N, T_v, D] visible features
        q = self.mask_token + pos  # [N, T_h, D]
        for k in range(0, len(self.layers), 2):
            q = self.layers[k](q, memory)  # [N, T_h, D] cross-attention to visible features
            q = self.layers[k + 1](q)  # [N, T_h, D] self-attention among hidden tokens
        return q


class HiMTMPretrainer(nn.Module):
    """HiMTM's pretext task on top of :class:`HierarchicalEncoder` (``self.backbone``).

    One step, for ``N = B*C`` single-channel series:
    1. Hide exactly ``mask_ratio`` of the top-level units at random; normalise each series with
       the statistics of its visible points.
    2. Student: the encoder sees only the visible units and gives features at every level.
    3. Teacher (no gradient): the same encoder under stop-gradient (``teacher="shared"``, the
       default: the paper's figure) or a momentum (EMA) copy of it (``teacher="ema"``) encodes
       only the *hidden* units.
    4. Per level ``i``: the regressor predicts the hidden tokens' latents from the visible ones;
       ``L_D,i`` = MSE to the teacher's (layer-normalised) features there; a linear head maps
       the predicted latents to the hidden values (``patch_len * 2**i`` steps per token) and
       ``L_R,i`` = MSE to them. Loss = ``mean_i (L_R,i + distill_weight * L_D,i)``.
    """

    def __init__(self, cfg: HiMTMConfig) -> None:
        super().__init__()
        if cfg.teacher not in ("shared", "ema"):
            raise ValueError(f"teacher must be 'shared' or 'ema', got {cfg.teacher!r}")
        self.cfg = cfg
        self.backbone = HierarchicalEncoder(cfg)
        self.geo = self.backbone.geo
        self.regressors = nn.ModuleList(Regressor(cfg) for _ in range(cfg.n_levels))
        self.heads = nn.ModuleList(
            nn.Linear(cfg.d_model, cfg.patch_len * 2**i) for i in range(cfg.n_levels)
        )
        # Registered so that it moves and checkpoints with the rest; its parameters are frozen.
        self.ema_teacher = frozen_copy(self.backbone) if cfg.teacher == "ema" else None

    def teacher_features(self, patches: Tensor, units: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """The teacher's features of ``units``: no gradient, no dropout (a clean target)."""
        teacher = self.ema_teacher if self.ema_teacher is not None else self.backbone
        was_training = teacher.training
        teacher.eval()
        try:
            with torch.no_grad():
                out: tuple[list[Tensor], list[Tensor]] = teacher(patches, units)
                return out
        finally:
            teacher.train(was_training)

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        # x: [B, L, C]
        b, length, c = x.shape
        n, geo, p = b * c, self.geo, self.cfg.patch_len
        series = front_pad(x.transpose(1, 2).reshape(n, length), geo.pad)  # [N, n_base * p]
        visible_units, hidden_units = (
            u.to(x.device) for u in random_token_mask(n, geo.n_units, self.cfg.mask_ratio)
        )  # [N, U_v], [N, U_h]
        unit_hidden = torch.ones(n, geo.n_units, dtype=torch.bool, device=x.device)  # [N, U]
        unit_hidden[torch.arange(n, device=x.device)[:, None], visible_units] = False
        point_visible = ~unit_hidden.repeat_interleave(geo.unit * p, dim=1)  # [N, n_base * p]
        _, mean, std = masked_instance_norm(series, point_visible)  # stats [N, 1]
        z = normalise(series, mean, std)  # [N, n_base * p]
        patches = z.reshape(n, geo.n_base, p)  # [N, n_base, p]

        feats, _ = self.backbone(patches, visible_units)  # [N, T_v_i, D] per level
        targets, hidden_idx = self.teacher_features(patches, hidden_units)  # [N, T_h_i, D]

        parts: dict[str, Tensor] = {}
        total = torch.zeros((), device=x.device)
        for i in range(self.cfg.n_levels):
            pos = self.backbone.pos[i][hidden_idx[i]]  # [N, T_h_i, D]
            pred = self.regressors[i](pos, feats[i])  # [N, T_h_i, D]
            target = F.layer_norm(targets[i], targets[i].shape[-1:])  # [N, T_h_i, D]
            distill = F.mse_loss(pred, target)
            width = p * 2**i
            values = z.reshape(n, geo.tokens(i), width)  # [N, T_i, width]
            gather = hidden_idx[i][:, :, None].expand(-1, -1, width)  # [N, T_h_i, width]
            recon = F.mse_loss(self.heads[i](pred), values.gather(1, gather))
            total = total + recon + self.cfg.distill_weight * distill
            parts[f"recon_{i}"], parts[f"distill_{i}"] = recon.detach(), distill.detach()
        return total / self.cfg.n_levels, parts

    def after_step(self) -> None:
        if self.ema_teacher is not None:
            ema_update(self.ema_teacher, self.backbone, self.cfg.ema_decay)


class HiMTM(TokenForecaster):
    """HiMTM (Zhao et al., 2024, "HiMTM: Hierarchical Multi-Scale Masked Time Series Modeling
    with Self-Distillation for Long-Term Forecasting", arXiv 2401.05012), fine-tuned to forecast.

    Forecaster (cross-scale attention fine-tuning): RevIN -> front padding -> base patches ->
    :class:`HierarchicalEncoder` over every unit -> the tokens of all levels (plus a learned level
    embedding) are concatenated and one self-attention layer lets every scale attend to every
    other -> flatten -> Linear to the horizon. ``H_t`` is that flattened cross-scale
    representation, ``[B, C, (T_0 + T_1 + ...) * d_model]``.

    Choices where the paper is silent (no public code):
    * masking hides whole top-level units (``2**(n_levels-1)`` base patches) at an exact ratio:
      an encoder that only sees visible tokens needs the same count in every row, and merges
      must join tokens that are adjacent in the series (as in hierarchical MAEs, e.g. Hiera);
    * the decoupled encoder-decoder follows CAE: per level a regressor (cross- then
      self-attention from mask tokens) predicts latents of hidden tokens; self-distillation
      aligns them with the teacher encoder's features of the hidden tokens, which are
      layer-normalised (data2vec) so the shared encoder cannot lower the loss by shrinking its
      output; a linear head on the predicted latents reconstructs the hidden values;
    * the teacher shares the student's weights and runs forward only, under stop-gradient and
      in eval mode (no dropout, BatchNorm on running statistics), as the paper's figure shows;
      ``teacher="ema"`` (an option) uses a no-gradient momentum copy (decay 0.996) instead;
    * BatchNorm (PatchTST's choice) in the levels, the merges and the cross-scale layer; with
      LayerNorm (``norm="layer"``, Swin's choice) every token loses its own level and scale.
      Chosen on the validation split (``bench/validation_choices.py``, group ``norm``: ETTh1
      H=96, the teacher bench's budget, one seed): validation MSE with BatchNorm 0.670 vs 0.702
      pretrained + fine-tuned, 0.665 vs 0.699 from scratch [test, reported only: 0.375 vs
      0.384 and 0.372 vs 0.383];
    * the model width stays constant across levels (Swin doubles it) and is small (d_model 32,
      one layer per level) to fit a 2-core CPU; windows are front-padded by repetition to a whole
      number of units (336 steps: 28 base patches of 12, levels of 28/14/7 tokens, 7 units of 48
      steps of which 4 are hidden). Patches of 8 (44/22/11 tokens, 11 units) mask more finely but
      cost twice as much per step.
    """

    def __init__(self, cfg: HiMTMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.lookback, self.horizon = cfg.lookback, cfg.horizon
        self.backbone = HierarchicalEncoder(cfg)
        self.geo = self.backbone.geo
        n_tokens = sum(self.geo.tokens(i) for i in range(cfg.n_levels))
        self.level_embed = nn.Parameter(torch.zeros(cfg.n_levels, cfg.d_model))
        self.cross_scale = EncoderLayer(
            cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.dropout, norm=cfg.norm
        )
        self.init_head(n_tokens * cfg.d_model, cfg.horizon, cfg.head_dropout)
        self.all_units: Tensor
        self.register_buffer("all_units", torch.arange(self.geo.n_units), persistent=False)

    def encode(self, z: Tensor) -> Tensor:
        # z: [B*C, L] (RevIN-normalised)
        n = z.shape[0]
        z = front_pad(z, self.geo.pad)  # [B*C, n_base * patch_len]
        patches = z.reshape(n, self.geo.n_base, self.cfg.patch_len)  # [B*C, n_base, p]
        feats, _ = self.backbone(patches, self.all_units.expand(n, -1))  # [B*C, T_i, D] per level
        tokens = torch.cat(
            [f + self.level_embed[i] for i, f in enumerate(feats)], dim=1
        )  # [B*C, sum T_i, D]
        out: Tensor = self.cross_scale(tokens)  # [B*C, sum T_i, D]
        return out


def build(cfg: HiMTMConfig) -> HiMTM:
    return HiMTM(cfg)


def build_pretrainer(cfg: HiMTMConfig) -> HiMTMPretrainer:
    return HiMTMPretrainer(cfg)


__all__ = [
    "Geometry",
    "HiMTM",
    "HiMTMConfig",
    "HiMTMPretrainer",
    "HierarchicalEncoder",
    "build",
    "build_pretrainer",
]
