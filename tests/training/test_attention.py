"""The training-step self-attention equals ``nn.MultiheadAttention`` bit for bit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from training.models.layers import EncoderLayer, self_attention


def _run(attn: nn.MultiheadAttention, x0: torch.Tensor, fast: bool) -> list[torch.Tensor]:
    attn.zero_grad(set_to_none=True)
    x = x0.clone().requires_grad_(True)
    torch.manual_seed(7)  # the same dropout draws for both
    y = self_attention(attn, x) if fast else attn(x, x, x, need_weights=False)[0]
    (y.square().mean() + y.sum()).backward()
    assert x.grad is not None
    return [y.detach(), x.grad, *(p.grad for p in attn.parameters() if p.grad is not None)]


@pytest.mark.parametrize(
    ("d_model", "heads", "dropout"), [(16, 4, 0.3), (32, 4, 0.1), (32, 8, 0.2)]
)
def test_self_attention_matches_module_bit_for_bit(
    d_model: int, heads: int, dropout: float
) -> None:
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(d_model, heads, dropout=dropout, batch_first=True)
    x0 = torch.randn(24, 11, d_model)
    ref, new = _run(attn, x0, fast=False), _run(attn, x0, fast=True)
    assert len(ref) == len(new) == 6  # output, input gradient, 4 parameter gradients
    for a, b in zip(ref, new, strict=True):
        assert torch.equal(a, b)
    # the dropout draws were consumed identically: the generators are in the same state after
    torch.manual_seed(7)
    attn(x0, x0, x0, need_weights=False)
    after_ref = torch.rand(3)
    torch.manual_seed(7)
    self_attention(attn, x0)
    assert torch.equal(after_ref, torch.rand(3))


def test_encoder_layer_uses_the_module_in_eval_and_for_cross_attention() -> None:
    torch.manual_seed(0)
    layer = EncoderLayer(16, 4, 32, dropout=0.2, norm="layer")
    x, memory = torch.randn(5, 7, 16), torch.randn(5, 3, 16)
    layer.eval()
    with torch.no_grad():
        y = layer(x)
        attn, _ = layer.attn(x, x, x, need_weights=False)
        expected = layer.norm2(layer.norm1(x + attn) + layer.ff(layer.norm1(x + attn)))
    torch.testing.assert_close(y, expected)
    assert layer(x, memory).shape == (5, 7, 16)
