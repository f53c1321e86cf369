"""The interface every forecaster in ``MODELS`` implements."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from training.models.layers import RevIN


class Forecaster(nn.Module):
    """Maps ``x [B, L, C]`` to ``y [B, H, C]`` and exposes a per-channel feature ``h [B, C, D]``.

    ``channel_independent`` models share every weight across channels, so their exported graph
    takes any channel count; ``scale_equivariant`` models normalise each window themselves (RevIN),
    so they serve raw values without the training scaler.
    """

    cfg: Any  # the model's config dataclass (training.models.MODELS[name].config)
    lookback: int
    horizon: int
    feature_dim: int
    channel_independent: bool = True
    scale_equivariant: bool = True

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x)[0]


class TokenForecaster(Forecaster):
    """RevIN -> a per-series token encoder -> flatten -> dropout -> Linear to the horizon.

    The shape PatchTST and the masked-pretraining teachers share: every channel's window is
    normalised (RevIN) and encoded on its own by :meth:`encode` (``z [B*C, L] -> [B*C, T, D]``);
    ``H_t`` is the flattened tokens, ``[B, C, T*D]``. Subclasses call ``super().__init__()``,
    build their encoder, then :meth:`init_head` (last, so that the head's random initial weights
    come after the encoder's, as they always did).
    """

    def __init__(self) -> None:
        super().__init__()
        self.revin = RevIN(affine=True)

    def init_head(self, feature_dim: int, horizon: int, head_dropout: float) -> None:
        self.feature_dim = feature_dim
        self.head = nn.Sequential(nn.Dropout(head_dropout), nn.Linear(feature_dim, horizon))

    def encode(self, z: Tensor) -> Tensor:
        raise NotImplementedError

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        # x: [B, L, C]
        b, _, c = x.shape
        mean, std = self.revin.stats(x)  # [B, 1, C]
        z = self.revin.normalize(x, mean, std).transpose(1, 2).reshape(b * c, -1)  # [B*C, L]
        h = self.encode(z).reshape(b, c, -1)  # [B, C, T*D]
        y = self.head(h).transpose(1, 2)  # [B, H, C]
        return self.revin.denormalize(y, mean, std), h
