"""The interface every forecaster in ``MODELS`` implements."""

from __future__ import annotations

from torch import Tensor, nn


class Forecaster(nn.Module):
    """Maps ``x [B, L, C]`` to ``y [B, H, C]`` and exposes a per-channel feature ``h [B, C, D]``.

    ``channel_independent`` models share every weight across channels, so their exported graph
    takes any channel count; ``scale_equivariant`` models normalise each window themselves (RevIN),
    so they serve raw values without the training scaler.
    """

    lookback: int
    horizon: int
    feature_dim: int
    channel_independent: bool = True
    scale_equivariant: bool = True

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x)[0]
