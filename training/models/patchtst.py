"""Supervised patch Transformer teacher (PatchTST)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from training.models.base import TokenForecaster
from training.models.layers import Encoder, Patcher, n_patches


@dataclass(frozen=True)
class PatchTSTConfig:
    lookback: int = 336
    horizon: int = 96
    patch_len: int = 16
    stride: int = 8
    d_model: int = 16
    n_heads: int = 4
    d_ff: int = 128
    n_layers: int = 3
    dropout: float = 0.3
    head_dropout: float = 0.0


class PatchTST(TokenForecaster):
    """PatchTST/42 (Nie et al., ICLR 2023, "A Time Series is Worth 64 Words").

    Channel-independent: every channel's window is cut into patches (length 16, stride 8, end
    padded by repetition), linearly embedded with a learned positional embedding, encoded by a
    BatchNorm Transformer, flattened and projected to the horizon. RevIN around the whole model.

    Simplified: no self-supervised variant here (the masked-pretraining teachers live in their
    own files); the defaults are the paper's small ETT configuration (d_model 16, 4 heads,
    d_ff 128, 3 layers), which keeps an epoch affordable on CPU.
    The distillation feature ``H_t`` is the flattened last encoder output, ``[B, C, P*d_model]``.
    """

    def __init__(self, cfg: PatchTSTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.lookback, self.horizon = cfg.lookback, cfg.horizon
        self.n_patches = n_patches(cfg.lookback, cfg.patch_len, cfg.stride)
        self.patcher = Patcher(cfg.patch_len, cfg.stride)
        self.embed = nn.Linear(cfg.patch_len, cfg.d_model)
        self.pos = nn.Parameter(torch.empty(self.n_patches, cfg.d_model).uniform_(-0.02, 0.02))
        self.drop = nn.Dropout(cfg.dropout)
        self.encoder = Encoder(
            cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.n_layers, cfg.dropout, norm="batch"
        )
        self.init_head(self.n_patches * cfg.d_model, cfg.horizon, cfg.head_dropout)

    def encode(self, z: Tensor) -> Tensor:
        # z: [B*C, L] (RevIN-normalised)
        patches = self.patcher(z)  # [B*C, P, patch_len]
        tokens = self.drop(self.embed(patches) + self.pos)  # [B*C, P, D]
        out: Tensor = self.encoder(tokens)  # [B*C, P, D]
        return out


def build(cfg: PatchTSTConfig) -> PatchTST:
    return PatchTST(cfg)
