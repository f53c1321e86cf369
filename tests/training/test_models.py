"""One generic check, run over every model in the dict."""

from __future__ import annotations

import pytest
import torch

from training.data import DataConfig, prepare
from training.models import MODELS, build_model, make_config

L, H, C, B = 48, 12, 3, 8
TINY: dict[str, dict[str, object]] = {
    "mlp": {"hidden": 32},
    "patchtst": {"d_model": 8, "n_heads": 2, "d_ff": 16, "n_layers": 1},
    "simmtm": {"d_model": 8, "n_heads": 2, "d_ff": 16, "n_layers": 1, "proj_dim": 16},
    "himtm": {"patch_len": 6, "d_model": 8, "n_heads": 2, "d_ff": 16},
    "dmae": {"d_model": 8, "n_heads": 2, "d_ff": 16, "n_layers": 1},
}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def tiny(name: str, lookback: int = L, horizon: int = H) -> torch.nn.Module:
    return build_model(name, lookback=lookback, horizon=horizon, **TINY.get(name, {}))


def test_every_model_has_tiny_settings() -> None:
    assert set(TINY) == set(MODELS)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_shapes_and_features(name: str) -> None:
    model = tiny(name).eval()
    y, h = model.forward_features(torch.randn(B, L, C))
    assert y.shape == (B, H, C)
    assert h.shape == (B, C, model.feature_dim)
    assert torch.isfinite(y).all() and torch.isfinite(h).all()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_channel_independent_and_scale_equivariant(name: str) -> None:
    model = tiny(name).eval()
    x = torch.randn(B, L, C)
    with torch.no_grad():
        y = model(x)
        # One channel alone gives the same forecast as inside the batch of channels.
        torch.testing.assert_close(model(x[:, :, 1:2]), y[:, :, 1:2], rtol=1e-4, atol=1e-5)
        if model.scale_equivariant:
            scale, shift = torch.tensor([2.0, 0.5, 10.0]), torch.tensor([5.0, -1.0, 100.0])
            torch.testing.assert_close(
                model(x * scale + shift), y * scale + shift, rtol=1e-3, atol=1e-3
            )


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_training_step_lowers_the_loss_on_real_windows(name: str) -> None:
    data = prepare(DataConfig("ETTh1", lookback=L, horizon=H))
    x, y = data.splits["train"].batch(torch.arange(0, 2048, 32))
    model = tiny(name)
    model.train()
    optim = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(5):
        optim.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        assert torch.isfinite(loss)
        loss.backward()
        optim.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


def test_unknown_setting_is_refused() -> None:
    with pytest.raises(ValueError, match="has no setting"):
        make_config("mlp", lookback=L, horizon=H, hiddden=3)


def test_student_feature_is_the_documented_hidden_width() -> None:
    model = build_model("mlp", lookback=336, horizon=96)
    _, h = model.forward_features(torch.randn(2, 336, 7))
    assert h.shape == (2, 7, 512)


@pytest.mark.parametrize(("norm", "batch_norm"), [("revin", "hidden"), ("mean", "hidden"),
                                                  ("revin", "channel")])  # fmt: skip
def test_folded_mlp_is_the_same_function(norm: str, batch_norm: str) -> None:
    """The serving graph's folded MLP (decomposition + Linear + BatchNorm as one Linear, plus a
    per-channel scale and shift for the authors' BatchNorm) gives the trained model's forecasts,
    with BatchNorm statistics that are not the identity."""
    model = build_model(
        "mlp", lookback=L, horizon=H, hidden=32, norm=norm, batch_norm=batch_norm, channels=C
    )
    model.train()
    with torch.no_grad():
        for _ in range(3):  # move the running statistics away from (0, 1)
            model(3 * torch.randn(B, L, C) + 1)
    model.eval()
    folded = model.inference_module()
    x = 5 * torch.randn(B, L, C) + 2
    with torch.no_grad():
        want, got = model(x), folded(x)
    assert got.shape == want.shape == (B, H, C)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()
    assert len(list(folded.modules())) < len(list(model.modules()))


def test_the_authors_batch_norm_is_per_channel_and_ties_the_model_to_the_channel_count() -> None:
    model = build_model("mlp", lookback=L, horizon=H, hidden=32, batch_norm="channel", channels=C)
    assert not model.channel_independent
    bn = model.seasonal.norm  # type: ignore[union-attr]
    assert bn.num_features == C
    model.train()
    x = torch.randn(B, L, C) * torch.arange(1, C + 1)  # channels of different spread
    model(x)
    h = model.seasonal.inp(
        model.decomp(model.norm.normalize(x, *model.norm.stats(x)))[0].transpose(1, 2)
    )  # [B, C, D]
    # One running mean per channel, moved towards that channel's mean over windows and units.
    torch.testing.assert_close(bn.running_mean, 0.1 * h.mean(dim=(0, 2)).detach())
    with pytest.raises(ValueError, match="channels"):
        build_model("mlp", lookback=L, horizon=H, batch_norm="channel")
    # build_model hands the data's channel count to configs that have the field, only those.
    assert build_model("mlp", lookback=L, horizon=H, channels=C).cfg.channels == C
    assert not hasattr(build_model("patchtst", lookback=L, horizon=H, channels=C).cfg, "channels")
