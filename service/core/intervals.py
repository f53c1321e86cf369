"""Split-conformal intervals from the manifest's calibration (docs/contracts.md).

The stored scores are |y - yhat| / s with s the per-channel window std, so one set of quantiles
serves any series: the interval at level p is yhat[t] -/+ q_p[t] * s for the series' own s.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from service.core.errors import InvalidInput

EPS = 1e-5


def window_scale(x: np.ndarray) -> np.ndarray:
    """x: [B, L, C] -> s: [B, C], the RevIN statistic sqrt(var + eps) over the window."""
    s: np.ndarray = np.sqrt(x.var(axis=1, dtype=np.float64) + EPS).astype(np.float32)
    return s


class Calibration:
    """Quantiles of normalised residuals: `quantiles[k, t]` for `levels[k]`, horizon step t."""

    def __init__(self, levels: Sequence[float], quantiles: np.ndarray) -> None:
        self.quantiles = np.asarray(quantiles, dtype=np.float32)
        if self.quantiles.ndim != 2 or self.quantiles.shape[0] != len(levels):
            raise ValueError("calibration quantiles must be [n_levels, horizon]")
        self.index = {float(level): k for k, level in enumerate(levels)}

    @classmethod
    def from_manifest(cls, calibration: Mapping[str, Any] | None) -> Calibration | None:
        if not calibration or "quantiles" not in calibration or "levels" not in calibration:
            return None
        return cls(calibration["levels"], np.asarray(calibration["quantiles"]))

    def check_levels(self, levels: Sequence[float], horizon: int) -> list[int]:
        """Row index per requested level; 422 naming `level[i]` for one the manifest lacks."""
        rows = []
        for i, level in enumerate(levels):
            k = self.index.get(float(level))
            if k is None:
                lo, hi = min(self.index), max(self.index)
                raise InvalidInput(
                    f"level {level} is not calibrated (integers {lo:g}..{hi:g})",
                    field=f"level[{i}]",
                )
            rows.append(k)
        if self.quantiles.shape[1] < horizon:
            raise InvalidInput("calibration is shorter than the horizon", field="horizon")
        return rows

    def bands(
        self, yhat: np.ndarray, scale: np.ndarray, rows: Sequence[int]
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """yhat: [B, H, C], scale: [B, C] -> per level (lower, upper), each [B, H, C]."""
        h = yhat.shape[1]
        out = []
        for k in rows:
            half = self.quantiles[k, :h][None, :, None] * scale[:, None, :]  # [B, H, C]
            out.append((yhat - half, yhat + half))
        return out
