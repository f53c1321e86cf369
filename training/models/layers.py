"""Layers shared by several architectures (normalisation, decomposition, patching, attention)."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RevIN(nn.Module):
    """Reversible instance normalisation (Kim et al., ICLR 2022), per window and channel.

    Because statistics come from each input window, a model wrapped in RevIN is equivariant to a
    per-channel affine map of its input: the same exported graph serves raw or z-scored values.
    """

    def __init__(self, affine: bool = True, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.affine = affine
        if affine:
            # Shared across channels so the layer stays channel-independent (any channel count).
            self.weight = nn.Parameter(torch.ones(1))
            self.bias = nn.Parameter(torch.zeros(1))

    def stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mean = x.mean(dim=1, keepdim=True)  # [B, 1, C]
        std = torch.sqrt(x.var(dim=1, keepdim=True, unbiased=False) + self.eps)  # [B, 1, C]
        return mean, std

    def normalize(self, x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
        x = (x - mean) / std
        if self.affine:
            x = x * self.weight + self.bias
        return x

    def denormalize(self, y: Tensor, mean: Tensor, std: Tensor) -> Tensor:
        if self.affine:
            y = (y - self.bias) / (self.weight + self.eps * self.eps)
        return y * std + mean


class MeanNorm(nn.Module):
    """Subtract the window mean per channel (TimeDistill's default for ETT); no scaling."""

    def stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mean = x.mean(dim=1, keepdim=True)  # [B, 1, C]
        return mean, torch.ones_like(mean)

    def normalize(self, x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
        return x - mean

    def denormalize(self, y: Tensor, mean: Tensor, std: Tensor) -> Tensor:
        return y + mean


def make_norm(kind: str) -> RevIN | MeanNorm:
    if kind == "revin":
        return RevIN(affine=True)
    if kind == "revin-plain":
        return RevIN(affine=False)
    if kind == "mean":
        return MeanNorm()
    raise ValueError(f"unknown normalisation {kind!r} (revin, revin-plain, mean)")


class SeriesDecomposition(nn.Module):
    """Moving-average trend with replicate padding (Autoformer/DLinear); seasonal = x - trend."""

    def __init__(self, kernel_size: int = 25) -> None:
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError("decomposition kernel must be odd so the trend stays aligned")
        self.kernel_size = kernel_size
        self.pool = nn.AvgPool1d(kernel_size, stride=1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        pad = (self.kernel_size - 1) // 2
        front = x[:, :1].expand(-1, pad, -1)  # [B, pad, C]
        back = x[:, -1:].expand(-1, pad, -1)  # [B, pad, C]
        padded = torch.cat([front, x, back], dim=1)  # [B, L + 2 pad, C]
        trend = self.pool(padded.transpose(1, 2)).transpose(1, 2)  # [B, L, C]
        return x - trend, trend


def n_patches(lookback: int, patch_len: int, stride: int) -> int:
    """Patches after PatchTST's end padding of ``stride`` values."""
    return (lookback + stride - patch_len) // stride + 1


class Patcher(nn.Module):
    """Split each channel's window into overlapping patches, padding the end by repetition."""

    def __init__(self, patch_len: int, stride: int) -> None:
        super().__init__()
        self.patch_len = patch_len
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        # x: [B*C, L]
        x = torch.cat([x, x[:, -1:].expand(-1, self.stride)], dim=1)  # [B*C, L + S]
        return x.unfold(1, self.patch_len, self.stride)  # [B*C, P, patch_len]


class BatchNormTokens(nn.Module):
    """BatchNorm over the model dimension for token sequences (PatchTST's choice over LayerNorm)."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(d_model)

    def forward(self, x: Tensor) -> Tensor:
        # x: [N, T, D]
        out: Tensor = self.norm(x.transpose(1, 2)).transpose(1, 2)  # [N, T, D]
        return out


def self_attention(attn: nn.MultiheadAttention, x: Tensor) -> Tensor:
    """``attn(x, x, x, need_weights=False)[0]`` for a training step, faster, bit for bit.

    The same operations as ``nn.MultiheadAttention``'s training path (packed projection on the
    ``[T, N, D]`` layout, scaled dot products with ``q`` and ``k`` each scaled by the square root
    of ``1/sqrt(d_head)``, softmax, dropout on the weights, output projection), so the results,
    gradients and dropout draws are identical (tested). Only for attention dropout > 0 (without
    it the module takes a fused kernel, which is faster still). Two things cost less: each head's
    ``q``/``k``/``v`` is made contiguous before the batched products (the module's views have a
    ``N * D`` stride between time steps), and the softmax skips the all-``-inf`` row check of
    ``scaled_dot_product_attention``'s reference path (there is no mask, so no such row). Eval
    mode and export keep the module's own (fused) path.
    """
    n, t, d = x.shape
    heads = attn.num_heads
    hd = d // heads
    proj = F.linear(x.transpose(1, 0), attn.in_proj_weight, attn.in_proj_bias)  # [T, N, 3D]
    proj = (
        proj.view(t, n, 3, d).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
    )  # [3, T, N, D]
    q, k, v = (
        p.view(t, n * heads, hd).transpose(0, 1).contiguous().view(n, heads, t, hd) for p in proj
    )  # [N, h, T, hd] each
    scale = math.sqrt(1.0 / math.sqrt(hd))  # as scaled_dot_product_attention computes it
    weights = torch.matmul(q * scale, k.transpose(-2, -1) * scale).softmax(-1)  # [N, h, T, T]
    weights = F.dropout(weights, attn.dropout, attn.training)  # [N, h, T, T]
    out = torch.matmul(weights, v)  # [N, h, T, hd]
    out = out.permute(2, 0, 1, 3).reshape(t * n, d)  # [T*N, D]
    out = F.linear(out, attn.out_proj.weight, attn.out_proj.bias).view(t, n, d)  # [T, N, D]
    return out.transpose(1, 0)  # [N, T, D]


class EncoderLayer(nn.Module):
    """Post-norm Transformer encoder layer with BatchNorm or LayerNorm."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float, norm: str = "batch"):
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.ff = nn.Sequential(
            nn.Linear(d_model, d_ff), nn.GELU(), nn.Dropout(dropout), nn.Linear(d_ff, d_model)
        )
        self.drop = nn.Dropout(dropout)
        make = BatchNormTokens if norm == "batch" else nn.LayerNorm
        self.norm1 = make(d_model)
        self.norm2 = make(d_model)

    def forward(self, x: Tensor, memory: Tensor | None = None) -> Tensor:
        # x: [N, T, D]; memory (cross-attention keys/values): [N, S, D]
        if memory is None and self.training and self.attn.dropout > 0:
            attn = self_attention(self.attn, x)  # [N, T, D]
        else:
            kv = x if memory is None else memory
            attn, _ = self.attn(x, kv, kv, need_weights=False)  # [N, T, D]
        x = self.norm1(x + self.drop(attn))
        out: Tensor = self.norm2(x + self.drop(self.ff(x)))  # [N, T, D]
        return out


class Encoder(nn.Module):
    def __init__(
        self, d_model: int, n_heads: int, d_ff: int, n_layers: int, dropout: float, norm: str
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            EncoderLayer(d_model, n_heads, d_ff, dropout, norm) for _ in range(n_layers)
        )

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)  # [N, T, D]
        return x


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """Momentum teacher: ``t <- decay * t + (1 - decay) * s`` for parameters; buffers copied.

    Both modules must have the same structure (the teacher is a deep copy of the student).
    """
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
        t.lerp_(s.detach(), 1.0 - decay)
    for tb, sb in zip(teacher.buffers(), student.buffers(), strict=True):
        tb.copy_(sb)


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy with gradients off: the starting point of a momentum (EMA) teacher."""
    teacher = copy.deepcopy(module)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def front_pad(x: Tensor, length: int) -> Tensor:
    """Repeat the first value of each row ``length`` times in front: ``[N, T] -> [N, T + length]``.

    Makes a window a whole number of patches (or hierarchy units) without inventing values.
    """
    if length == 0:
        return x
    return torch.cat([x[:, :1].expand(-1, length), x], dim=1)  # [N, length + T]
