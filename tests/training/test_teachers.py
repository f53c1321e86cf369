"""The masked-pretraining teachers: masks, pretext losses, teachers, checkpoints and the CLI.

Everything runs on tiny models and tiny synthetic series; the generic forecaster checks (shapes,
training step, channel independence, scale equivariance) are in ``test_models.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tests.training.test_models import TINY
from training.checkpoints import load_forecaster
from training.cli import main
from training.config import build_run_config
from training.models import build_model, dmae, himtm, make_config, simmtm
from training.models.masking import (
    geometric_mask,
    masked_instance_norm,
    random_token_mask,
    span_lengths,
)
from training.pretrain import (
    METHODS,
    CheckpointError,
    FinetuneRunConfig,
    build_pretrain_config,
    pretrain_matches,
    run_finetune,
    run_pretrain,
)

L, H = 48, 12
QUICK = {"epochs": 1, "batch_size": 16, "max_train_batches": 3, "progress": False, "threads": 1}


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    # One thread: these tiny models gain nothing from more and the CI box is shared.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def tiny_config(method: str, **extra: object) -> object:
    return make_config(method, lookback=L, horizon=H, **{**TINY[method], **extra})


def sines(n: int = 16, c: int = 3, length: int = L) -> torch.Tensor:
    """Noisy sines with random phase, period, scale and offset: ``[n, length, c]``."""
    t = torch.arange(length, dtype=torch.float32)[None, :, None]
    phase = torch.rand(n, 1, c) * 6.28
    period = 8 + 16 * torch.rand(n, 1, c)
    wave = torch.sin(2 * torch.pi * t / period + phase)
    return 3 * wave * torch.rand(n, 1, c) + torch.randn(n, 1, c) + 0.1 * torch.randn(n, length, c)


def write_csv(path: Path, channels: int = 3, rows: int = 400) -> Path:
    t = np.arange(rows)
    cols = {
        f"c{i}": np.sin(2 * np.pi * t / (12 + 5 * i)) * (i + 1) + 0.05 * i * t / rows
        for i in range(channels)
    }
    dates = pd.date_range("2024-01-01", periods=rows, freq="h").strftime("%Y-%m-%d %H:%M:%S")
    pd.DataFrame({"date": dates, **cols}).to_csv(path, index=False)
    return path


# --- masks ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("ratio", "span"), [(0.5, 3.0), (0.15, 3.0)])
def test_geometric_mask_ratio_and_mean_span(ratio: float, span: float) -> None:
    g = torch.Generator().manual_seed(1)
    mask = geometric_mask(1000, 336, ratio, span, generator=g)
    assert mask.dtype == torch.bool and mask.shape == (1000, 336)
    assert float(mask.float().mean()) == pytest.approx(ratio, abs=0.015)
    # Runs cut by the window's end are a little shorter; the tolerance covers it.
    assert float(span_lengths(mask).float().mean()) == pytest.approx(span, abs=0.2)


def test_random_token_mask_hides_an_exact_share() -> None:
    visible, hidden = random_token_mask(50, 11, 0.5)
    assert visible.shape == (50, 5) and hidden.shape == (50, 6)  # round(5.5) = 6
    both = torch.cat([visible, hidden], dim=1).sort(dim=1).values
    assert torch.equal(both, torch.arange(11).expand(50, -1))
    assert torch.equal(visible, visible.sort(dim=1).values)


def test_masked_instance_norm_uses_visible_points_only() -> None:
    x = torch.randn(4, 40) * 5 + 3
    visible = torch.rand(4, 40) > 0.3
    z, mean, std = masked_instance_norm(x, visible)
    assert torch.all(z[~visible] == 0)
    for i in range(4):
        v = z[i][visible[i]]
        assert float(v.mean()) == pytest.approx(0.0, abs=1e-5)
        assert float(v.std(unbiased=False)) == pytest.approx(1.0, abs=1e-3)


# --- SimMTM --------------------------------------------------------------------------------------


def test_simmtm_aggregation_excludes_self_and_rows_sum_to_one() -> None:
    s = torch.nn.functional.normalize(torch.randn(12, 5), dim=1)
    sim = s[:4] @ s.T  # [N, R]: the first 4 rows against all 12
    w = simmtm.aggregation_weights(sim, temperature=0.2)
    assert w.shape == (4, 12)
    assert torch.all(w[torch.arange(4), torch.arange(4)] == 0)
    torch.testing.assert_close(w.sum(dim=1), torch.ones(4))
    assert torch.all(w >= 0)


def test_simmtm_batch_is_originals_then_masked_copies() -> None:
    pre = simmtm.build_pretrainer(tiny_config("simmtm", n_copies=3))
    series = torch.randn(20, L) * 4 + 2
    z, visible = pre.masked_batch(series)
    assert z.shape == visible.shape == (80, L)
    assert visible[:20].all()
    assert float((~visible[20:]).float().mean()) == pytest.approx(0.5, abs=0.08)
    assert torch.all(z[~visible] == 0)


# --- HiMTM ---------------------------------------------------------------------------------------


def test_himtm_halves_the_tokens_at_every_level() -> None:
    cfg = make_config(
        "himtm", lookback=336, horizon=96, patch_len=8, n_levels=3, d_model=8, n_heads=2, d_ff=16
    )
    enc = himtm.HierarchicalEncoder(cfg)
    geo = enc.geo
    assert (geo.n_base, geo.unit, geo.n_units, geo.pad) == (44, 4, 11, 16)
    patches = torch.randn(5, geo.n_base, 8)
    visible, _ = random_token_mask(5, geo.n_units, 0.5)
    feats, idx = enc(patches, visible)
    assert [f.shape[1] for f in feats] == [20, 10, 5]
    full, _ = enc(patches, torch.arange(geo.n_units).expand(5, -1))
    assert [f.shape[1] for f in full] == [44, 22, 11]
    # A merged token sits where its two children were, one level up.
    assert torch.equal(idx[1], idx[0][:, ::2] // 2) and torch.equal(idx[2], idx[1][:, ::2] // 2)


@pytest.mark.parametrize("teacher", ["shared", "ema"])
def test_himtm_teacher_gives_targets_without_gradient(teacher: str) -> None:
    pre = himtm.build_pretrainer(tiny_config("himtm", teacher=teacher))
    patches = torch.randn(4, pre.geo.n_base, 6)
    targets, _ = pre.teacher_features(patches, torch.tensor([[0]] * 4))
    assert all(not t.requires_grad for t in targets)
    assert pre.training  # the teacher's eval mode for clean targets is restored
    loss, _ = pre(sines(8))
    loss.backward()
    if teacher == "ema":
        assert pre.ema_teacher is not None
        assert all(p.grad is None and not p.requires_grad for p in pre.ema_teacher.parameters())
        before = [p.clone() for p in pre.ema_teacher.parameters()]
        with torch.no_grad():
            for p in pre.backbone.parameters():
                p.add_(1.0)
        pre.after_step()
        moved = [
            not torch.equal(a, b) for a, b in zip(before, pre.ema_teacher.parameters(), strict=True)
        ]
        assert any(moved)
    else:
        assert pre.ema_teacher is None
        assert any(p.grad is not None for p in pre.backbone.parameters())


@pytest.mark.parametrize("teacher", ["shared", "ema"])
def test_himtm_per_level_distillation_loss_uses_the_configured_target(teacher: str) -> None:
    """L_D,i compares the regressor's prediction with the configured teacher's features: the
    shared encoder itself (stop-gradient, eval mode) or its momentum copy, never the other."""
    import torch.nn.functional as F

    pre = himtm.build_pretrainer(tiny_config("himtm", teacher=teacher, dropout=0.3))
    with torch.no_grad():  # the student moves away from the EMA copy made at construction
        for p in pre.backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))
    calls: list[tuple[str, bool, list[torch.Tensor]]] = []
    for label, module in (("backbone", pre.backbone), ("ema", pre.ema_teacher)):
        if module is not None:
            module.register_forward_hook(
                lambda m, _a, out, label=label: calls.append((label, m.training, out[0]))
            )
    preds: dict[int, torch.Tensor] = {}
    for i, reg in enumerate(pre.regressors):
        reg.register_forward_hook(lambda _m, _a, out, i=i: preds.__setitem__(i, out))
    _, parts = pre(sines(8))
    # First call: the student (training mode); second: the target encoder, in eval mode.
    assert [c[0] for c in calls] == ["backbone", "backbone" if teacher == "shared" else "ema"]
    assert calls[0][1] and not calls[1][1]
    targets = calls[1][2]
    assert all(not t.requires_grad for t in targets)
    for i in range(pre.cfg.n_levels):
        expected = F.mse_loss(preds[i], F.layer_norm(targets[i], targets[i].shape[-1:]))
        torch.testing.assert_close(parts[f"distill_{i}"], expected.detach())


# --- DMAE ----------------------------------------------------------------------------------------


def test_dmae_student_and_teacher_masks_are_exact_complements() -> None:
    pre = dmae.build_pretrainer(tiny_config("dmae"))
    seen: dict[str, tuple[torch.Tensor, ...]] = {}
    pre.backbone.register_forward_pre_hook(lambda _m, a: seen.__setitem__("student", a))
    pre.teacher.register_forward_pre_hook(lambda _m, a: seen.__setitem__("teacher", a))
    x = sines(70)  # [70, L, 3]: 210 rows
    torch.manual_seed(0)
    pre(x)
    # What the two encoders were really given: complementary masks, hidden values zeroed.
    (z_s, obs_s), (z_t, obs_t) = seen["student"], seen["teacher"]
    assert torch.equal(obs_s, ~obs_t)
    assert torch.all(z_s[~obs_s] == 0) and torch.all(z_t[~obs_t] == 0)
    # Together they rebuild the whole normalised series: nothing lost, nothing seen twice.
    torch.manual_seed(0)  # the same mask: drawing it is forward's first random step
    z, hidden, _ = pre.complementary_inputs(x.transpose(1, 2).reshape(-1, L))
    assert torch.equal(obs_t, hidden)
    torch.testing.assert_close(z_s + z_t, z)
    assert float(hidden.float().mean()) == pytest.approx(0.15, abs=0.03)


def test_dmae_teacher_gets_no_gradient_and_follows_the_student() -> None:
    pre = dmae.build_pretrainer(tiny_config("dmae"))
    loss, _ = pre(sines(8))
    loss.backward()
    assert all(not p.requires_grad and p.grad is None for p in pre.teacher.parameters())
    assert any(p.grad is not None for p in pre.backbone.parameters())
    before = [p.clone() for p in pre.teacher.parameters()]
    with torch.no_grad():
        for p in pre.backbone.parameters():
            p.add_(1.0)
    pre.after_step()
    teacher, student = pre.teacher.parameters(), pre.backbone.parameters()
    for old, new, stu in zip(before, teacher, student, strict=True):
        torch.testing.assert_close(new, 0.99 * old + 0.01 * stu)


def test_dmae_decode_path_shapes_and_losses_cover_the_hidden_values_only() -> None:
    cfg = tiny_config("dmae")
    pre = dmae.build_pretrainer(cfg)
    out: dict[str, torch.Tensor] = {}
    pre.recon_head.register_forward_hook(lambda _m, _a, o: out.__setitem__("recon", o))
    pre.query.register_forward_hook(lambda _m, _a, o: out.__setitem__("query", o))
    pre.teacher.register_forward_hook(lambda _m, _a, o: out.__setitem__("teacher", o))
    x = sines(6)  # [6, L, 3]: 18 series
    torch.manual_seed(1)
    _, parts = pre(x)
    n, tokens = 18, pre.backbone.n_patches
    assert out["recon"].shape == (n, tokens, cfg.patch_len)  # a patch of values per token
    assert out["query"].shape == out["teacher"].shape == (n, tokens, cfg.d_model)
    torch.manual_seed(1)  # the same mask
    z, hidden, _ = pre.complementary_inputs(x.transpose(1, 2).reshape(n, L))
    recon = out["recon"].reshape(n, -1)[:, pre.backbone.pad :]  # [N, L]
    # Reconstruction: MSE over the hidden values, and only them.
    expected = ((recon - z)[hidden] ** 2).mean()
    torch.testing.assert_close(parts["reconstruction"], expected.detach())


# --- every method --------------------------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(METHODS))
def test_pretraining_loss_is_finite_and_falls(method: str) -> None:
    pre = METHODS[method].build_pretrainer(tiny_config(method))
    x = sines(16)
    optim = torch.optim.Adam([p for p in pre.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(12):
        torch.manual_seed(7)  # the same masks every step: the fall is the model's doing
        loss, parts = pre(x)
        assert torch.isfinite(loss) and all(torch.isfinite(v) for v in parts.values())
        optim.zero_grad()
        loss.backward()
        optim.step()
        pre.after_step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_forecaster_shares_the_pretrainer_backbone(method: str) -> None:
    cfg = tiny_config(method)
    pre = METHODS[method].build_pretrainer(cfg)
    model = build_model(method, **{**TINY[method], "lookback": L, "horizon": H})
    model.backbone.load_state_dict(pre.backbone.state_dict())  # same keys and shapes
    y, h = model.eval().forward_features(sines(4, c=5))
    assert y.shape == (4, H, 5) and h.shape == (4, 5, model.feature_dim)


# --- pretrain -> finetune on a user's CSV, checkpoints, CLI ---------------------------------------


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 3-channel CSV and a finished 2-epoch DMAE pretraining on it."""
    root = tmp_path_factory.mktemp("teachers")
    csv = write_csv(root / "mine.csv", channels=3)
    cfg = build_pretrain_config(
        "dmae",
        data={"dataset": str(csv), "lookback": L},
        pretrain={**QUICK, "epochs": 2},
        model_settings=TINY["dmae"],
        out_dir=str(root / "pre"),
    )
    result = run_pretrain(cfg)
    assert result.loop.epochs_run == 2 and result.loop.finished and pretrain_matches(cfg)
    return csv, root / "pre"


def test_pretraining_writes_encoder_and_metadata(pretrained: tuple[Path, Path]) -> None:
    _, pre = pretrained
    meta = json.loads((pre / "pretrain.json").read_text())
    assert meta["finished"] and meta["method"] == "dmae"
    assert meta["lookback"] == L and meta["channels"] == 3
    assert meta["model_config"]["d_model"] == 8 and len(meta["history"]) == 2
    assert (pre / "encoder.safetensors").exists() and (pre / "last.pt").exists()


def test_pretraining_resumes_from_its_last_epoch(pretrained: tuple[Path, Path], tmp_path) -> None:
    csv, _ = pretrained
    kwargs = {
        "data": {"dataset": str(csv), "lookback": L},
        "model_settings": TINY["himtm"],
        "out_dir": str(tmp_path / "pre"),
    }
    budget = {**QUICK, "epochs": 2}
    first = run_pretrain(
        build_pretrain_config("himtm", pretrain={**budget, "stop_after_epochs": 1}, **kwargs)
    )
    assert not first.loop.finished and first.loop.epochs_run == 1
    result = run_pretrain(build_pretrain_config("himtm", pretrain=budget, resume=True, **kwargs))
    assert [row["epoch"] for row in result.loop.history] == [1, 2] and result.loop.finished


def test_finetune_from_pretrained_on_a_users_csv(pretrained: tuple[Path, Path], tmp_path) -> None:
    csv, pre = pretrained
    run = build_run_config(
        "dmae",
        data={"dataset": str(csv), "lookback": L, "horizon": H},
        train=QUICK,
        model_settings={"head_dropout": 0.1},
        out_dir=str(tmp_path / "ft"),
    )
    result = run_finetune(FinetuneRunConfig(run, init_from=str(pre)))
    model, info = load_forecaster(result.out_dir)
    assert info["model"] == "dmae" and info["pretrained_from"] == str(pre)
    assert info["model_config"]["d_model"] == 8 and info["model_config"]["head_dropout"] == 0.1
    assert model(torch.randn(2, L, 3)).shape == (2, H, 3)


def test_incompatible_checkpoints_are_refused_by_name(
    pretrained: tuple[Path, Path], tmp_path: Path
) -> None:
    csv, pre = pretrained

    def attempt(method: str, dataset: Path, lookback: int, **kw: bool) -> None:
        run = build_run_config(
            method,
            data={"dataset": str(dataset), "lookback": lookback, "horizon": H},
            train=QUICK,
            model_settings=TINY[method],
            out_dir=str(tmp_path / "ft"),
        )
        run_finetune(FinetuneRunConfig(run, init_from=str(pre / "encoder.safetensors"), **kw))

    with pytest.raises(CheckpointError, match="method mismatch.*'dmae'"):
        attempt("simmtm", csv, L)
    with pytest.raises(CheckpointError, match="lookback mismatch.*48.*40"):
        attempt("dmae", csv, 40)
    two = write_csv(tmp_path / "two.csv", channels=2)
    with pytest.raises(CheckpointError, match="channels mismatch.*3 channels.*has 2"):
        attempt("dmae", two, L)
    attempt("dmae", two, L, allow_channel_change=True)  # channel-independent: allowed on request
    with pytest.raises(FileNotFoundError, match="not a pretraining folder"):
        run_finetune(FinetuneRunConfig(build_run_config("dmae"), init_from=str(tmp_path)))


def test_cli_pretrain_then_finetune(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv = write_csv(tmp_path / "cli.csv", channels=2)
    common = [
        *("--dataset", str(csv), "--lookback", str(L), "--epochs", "1", "--batch-size", "16"),
        *("--max-train-batches", "2", "--threads", "1", "--no-progress"),
    ]
    config = tmp_path / "simmtm.toml"
    config.write_text("[model]\n" + "".join(f"{k} = {v}\n" for k, v in TINY["simmtm"].items()))
    pre = tmp_path / "pre"
    argv = ["pretrain", "--method", "simmtm", *common, "--config", str(config), "--out", str(pre)]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["method"] == "simmtm" and out["epochs"] == 1
    ft = ["finetune", "--method", "simmtm", "--from", str(pre), "--horizon", str(H), *common]
    ft += ["--config", str(config), "--out", str(tmp_path / "ft")]
    assert main(ft) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["model"] == "simmtm" and out["pretrained_from"] == str(pre) and out["mse"] > 0
    wrong = ["finetune", "--method", "himtm", "--from", str(pre), *common]
    assert main(wrong) == 2
    assert "method mismatch" in capsys.readouterr().err
