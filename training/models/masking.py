"""Masks and masked statistics shared by the masked-pretraining teachers (SimMTM, HiMTM, DMAE).

Convention everywhere: a boolean mask is ``True`` where a value is *hidden* from the encoder.

* :func:`geometric_mask` draws span masks point by point (SimMTM and DMAE): the Markov chain of
  Zerveas et al. (KDD 2021, "A Transformer-based Framework for Multivariate Time Series
  Representation Learning") that both papers adopt. Masked runs have geometric lengths with mean
  ``mean_span``; visible runs have mean ``mean_span * (1 - ratio) / ratio``, so the expected
  masked fraction is ``ratio``.
* :func:`random_token_mask` hides an exact number of tokens per row (HiMTM), which an encoder
  that only sees visible tokens needs: every row keeps the same number of them.
* :func:`masked_instance_norm` normalises each series with the mean and deviation of its
  visible points only, so the statistics do not leak the hidden values.
"""

from __future__ import annotations

import torch
from torch import Tensor


def geometric_mask(
    n: int,
    length: int,
    ratio: float,
    mean_span: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Span mask ``[n, length]`` (``True`` = hidden) with masked fraction ``ratio`` on average.

    Each row is an independent two-state chain: it leaves the masked state with probability
    ``1 / mean_span`` and the visible state with probability ``ratio / ((1 - ratio) mean_span)``;
    the first state is masked with probability ``ratio`` (the chain's stationary law).
    """
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"mask ratio must be in (0, 1), got {ratio}")
    if mean_span < 1.0:
        raise ValueError(f"mean masked span must be >= 1, got {mean_span}")
    p_leave_masked = 1.0 / mean_span
    p_leave_visible = p_leave_masked * ratio / (1.0 - ratio)
    u = torch.rand(n, length, generator=generator)  # [n, T]
    mask = torch.empty(n, length, dtype=torch.bool)
    state = u[:, 0] < ratio  # [n]
    mask[:, 0] = state
    for t in range(1, length):
        leave = torch.where(state, u[:, t] < p_leave_masked, u[:, t] < p_leave_visible)  # [n]
        state = state ^ leave
        mask[:, t] = state
    return mask.to(device) if device is not None else mask


def random_token_mask(
    n: int, tokens: int, ratio: float, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Hide exactly ``round(ratio * tokens)`` tokens per row (at least one kept, one hidden).

    Returns ``(visible, hidden)`` token indices, each sorted ascending: ``[n, V]`` and
    ``[n, tokens - V]``.
    """
    if tokens < 2:
        raise ValueError(f"need at least 2 tokens to mask some and keep some, got {tokens}")
    n_hidden = min(max(round(ratio * tokens), 1), tokens - 1)
    noise = torch.rand(n, tokens, generator=generator)  # [n, T]
    order = noise.argsort(dim=1)  # [n, T]
    hidden = order[:, :n_hidden].sort(dim=1).values  # [n, T_h]
    visible = order[:, n_hidden:].sort(dim=1).values  # [n, T_v]
    return visible, hidden


SCALE_FLOOR = 0.1
"""Smallest deviation a window is normalised by, in units of its channel's train-split standard
deviation (the data are z-scored by the train scaler before they reach a model). Without it, a
window whose visible points barely move (a constant stretch, an intermittent channel's run of
zeros) is divided by ~``sqrt(eps)`` and its hidden spikes become targets of order 1e3-1e5; with it
a hidden value is at most ``|x - mean| / 0.1`` and every pretext loss stays of the order of its
value on ETT on such data (``tests/training/test_teachers.py`` checks it on a generated CSV).
Measured on the train windows (L=336, span masks of ratio 0.15 and 0.5): no ETTh1 window is
floored; on ETTh2 12.8% are (a channel with long near-constant stretches), where unfloored
normalised values reached ~1000."""

VALUE_BOUND = 10.0
"""Normalised values (inputs and pretext targets) are limited to +-10 window deviations. A hidden
outlier (a 40-sigma spike, a rainfall burst after a dry spell) is unpredictable from the visible
points; unbounded, one such point dominates a batch's squared error (losses of 10-30 on a
generated CSV with such channels). Measured as above: the bound touches 4e-7 of ETTh1's values
and 5e-5 of ETTh2's."""


def masked_instance_norm(
    x: Tensor, visible: Tensor, eps: float = 1e-5, floor: float = SCALE_FLOOR
) -> tuple[Tensor, Tensor, Tensor]:
    """Normalise rows of ``x [N, T]`` by the mean/std of their ``visible [N, T]`` points.

    The deviation is floored at ``floor`` (see :data:`SCALE_FLOOR`). Hidden points are returned
    as zeros (the normalised mean). Returns ``(z, mean, std)`` with the statistics ``[N, 1]``.
    """
    w = visible.to(x.dtype)  # [N, T]
    count = w.sum(dim=1, keepdim=True).clamp_min(1.0)  # [N, 1]
    mean = (x * w).sum(dim=1, keepdim=True) / count  # [N, 1]
    var = (((x - mean) * w) ** 2).sum(dim=1, keepdim=True) / count  # [N, 1]
    std = torch.sqrt(var + eps).clamp_min(floor)  # [N, 1]
    return normalise(x, mean, std) * w, mean, std


def normalise(x: Tensor, mean: Tensor, std: Tensor, bound: float = VALUE_BOUND) -> Tensor:
    """``(x - mean) / std`` limited to ``[-bound, bound]`` (see :data:`VALUE_BOUND`)."""
    return ((x - mean) / std).clamp(-bound, bound)


def span_lengths(mask: Tensor) -> Tensor:
    """Lengths of the runs of ``True`` in every row of a ``[n, T]`` mask (for tests and logs)."""
    m = mask.to(torch.int8)
    padded = torch.nn.functional.pad(m, (1, 1))  # [n, T + 2]
    edges = padded[:, 1:] - padded[:, :-1]  # [n, T + 1]: +1 at a run start, -1 after its end
    starts = (edges == 1).nonzero()[:, 1]
    ends = (edges == -1).nonzero()[:, 1]
    return ends - starts


__all__ = [
    "SCALE_FLOOR",
    "geometric_mask",
    "masked_instance_norm",
    "normalise",
    "random_token_mask",
    "span_lengths",
]
