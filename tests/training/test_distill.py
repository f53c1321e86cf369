"""TimeDistill: the loss terms, frozen teachers, ensemble targets, a real run and the CLI."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from training.checkpoints import load_forecaster
from training.cli import main
from training.data import DataConfig, prepare
from training.distill import DistillConfig, build_distill_config, run_distill
from training.distill_losses import (
    DistillationLoss,
    frequency_log_softmax,
    multiscale_mse,
    period_kl,
    pool_pyramid,
)
from training.distill_teachers import (
    TeacherWindows,
    ensemble_weights,
    load_teachers,
    resolve_teacher_dir,
    teacher_pass,
)
from training.models import build_model

L_S, L_T, H = 96, 48, 24  # student and teacher lookbacks, horizon
TINY_TEACHER = {"d_model": 8, "n_heads": 2, "d_ff": 16, "n_layers": 1}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data():
    return prepare(DataConfig("ETTh1", lookback=L_S, horizon=H))


def make_teacher_run(root: Path, name: str, seed: int, lookback: int = L_T) -> Path:
    """A tiny patchtst run folder (random weights) laid out as fit + run_train write it."""
    torch.manual_seed(seed)
    model = build_model("patchtst", lookback=lookback, horizon=H, **TINY_TEACHER)
    run_dir = root / f"ETTh1-{name}-L{lookback}-H{H}"
    run_dir.mkdir(parents=True)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, run_dir / "best.safetensors"
    )
    run = {
        "model": "patchtst",
        "model_config": asdict(model.cfg),
        "data": {"dataset": "ETTh1", "lookback": lookback, "horizon": H},
    }
    (run_dir / "run.json").write_text(json.dumps(run))
    return run_dir


@pytest.fixture(scope="module")
def teacher_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("teachers")
    make_teacher_run(root, "ta", seed=1)
    make_teacher_run(root, "tb", seed=2)
    return root


def dcfg(root: Path, **values: object) -> DistillConfig:
    return DistillConfig(
        teachers=("ta", "tb"), teacher_dir=str(root), teacher_lookback=L_T, **values
    )


# --------------------------------------------------------------------------- loss primitives


def test_pooling_gives_the_four_documented_scales() -> None:
    y = torch.randn(2, 96, 3)  # [B, H, C]: pooled along time
    assert [p.shape[1] for p in pool_pyramid(y, dim=1)] == [96, 48, 24, 12]
    torch.testing.assert_close(pool_pyramid(y, dim=1)[1], (y[:, 0::2] + y[:, 1::2]) / 2)
    torch.testing.assert_close(pool_pyramid(y, dim=1)[3][:, 0], y[:, :8].mean(1))
    h = torch.randn(2, 3, 512)  # [B, C, D]: pooled along the feature axis
    pyramid = pool_pyramid(h, dim=-1)
    assert [tuple(p.shape) for p in pyramid] == [(2, 3, d) for d in (512, 256, 128, 64)]
    torch.testing.assert_close(pyramid[2][..., 5], h[..., 20:24].mean(-1))


@pytest.mark.parametrize("norm", ["ortho", "backward"])
def test_frequency_softmax_rows_sum_to_one_without_the_dc_bin(norm: str) -> None:
    y = torch.randn(4, 96, 7)  # [B, H, C]
    log_q = frequency_log_softmax(y, dim=1, temperature=0.5, norm=norm)
    assert log_q.shape == (4, 7, 48)  # one distribution per window and channel, DC dropped
    torch.testing.assert_close(log_q.exp().sum(-1), torch.ones(4, 7))
    # A constant offset only moves the DC bin, so it does not change the distribution.
    shifted = frequency_log_softmax(y + 3.0, dim=1, temperature=0.5, norm=norm)
    torch.testing.assert_close(shifted, log_q, atol=1e-4, rtol=0)
    # The logits are the bins' amplitudes over the temperature.
    amplitude = torch.fft.rfft(y, dim=1, norm=norm).abs()[:, 1:].transpose(1, 2)  # [B, C, 48]
    torch.testing.assert_close(log_q, torch.log_softmax(amplitude / 0.5, dim=-1))


def test_orthonormal_spectrum_keeps_the_softmax_soft_on_real_targets() -> None:
    # Unnormalised amplitudes grow with the length, so at temperature 0.5 the distribution over
    # frequencies is almost one-hot on real ETTh1 targets; orthonormal ones keep it informative.
    _, y = (
        prepare(DataConfig("ETTh1", lookback=96, horizon=96))
        .splits["train"]
        .batch(torch.arange(0, 8000, 40))
    )  # [200, 96, 7]

    def mean_top_prob(norm: str) -> float:
        return float(frequency_log_softmax(y, 1, 0.5, norm).exp().max(-1).values.mean())

    assert mean_top_prob("backward") > 0.9
    assert mean_top_prob("ortho") < 0.6


def test_primitives_are_zero_on_equal_inputs_and_positive_otherwise() -> None:
    a, b = torch.randn(4, 96, 3), torch.randn(4, 96, 3)
    assert float(period_kl(a, a, dim=1)) == pytest.approx(0.0, abs=1e-6)
    assert float(multiscale_mse(a, a, dim=1)) == 0.0
    assert float(period_kl(a, b, dim=1)) > 0
    assert float(multiscale_mse(a, b, dim=1)) > 0


def test_period_kl_mean_reduction_is_the_sum_over_the_frequency_count() -> None:
    a, b = torch.randn(4, 96, 3), torch.randn(4, 96, 3)
    summed = period_kl(a, b, dim=1)
    mean = period_kl(a, b, dim=1, reduction="mean")
    assert float(mean) == pytest.approx(float(summed) / 48, rel=1e-5)  # 96 // 2 non-DC bins


def make_criterion(**values: object) -> DistillationLoss:
    return DistillationLoss(
        DistillConfig(**values).loss, 2.0, 2.0, teacher_dims=[24], student_dim=16
    )


def test_each_loss_term_is_zero_when_student_equals_teacher() -> None:
    criterion = make_criterion()
    y = torch.randn(4, H, 3)
    h_t = torch.randn(4, 3, 24)
    with torch.no_grad():
        h_s = criterion.regressors[0](h_t)  # the student's feature equals the mapped teacher's
        terms = criterion(y, h_s, y, y, [h_t])
    assert set(terms) == {"mse", "pred_period", "pred_scale", "feat_period", "feat_scale", "total"}
    for name, value in terms.items():
        assert float(value) == pytest.approx(0.0, abs=1e-6), name


def test_each_loss_term_is_positive_when_student_differs() -> None:
    criterion = make_criterion()
    y, y_s, y_t = torch.randn(3, 4, H, 3)
    h_t, h_s = torch.randn(4, 3, 24), torch.randn(4, 3, 16)
    with torch.no_grad():
        terms = criterion(y_s, h_s, y, y_t, [h_t])
    for name, value in terms.items():
        assert float(value) > 0, name
    expected = (
        terms["mse"]
        + 2 * (terms["pred_period"] + terms["pred_scale"])
        + 2 * (terms["feat_period"] + terms["feat_scale"])
    )
    torch.testing.assert_close(terms["total"], expected)


def test_feature_terms_ignore_the_scale_of_the_features() -> None:
    # H_s is taken before BatchNorm, so its scale does not matter to the forecast; nor, with
    # standardised features (an option; the default matches raw values), to the feature terms.
    criterion = make_criterion(feature_norm="standardize")
    y, h_s, h_t = torch.randn(4, H, 3), torch.randn(4, 3, 16), torch.randn(4, 3, 24)
    with torch.no_grad():
        base = criterion(y, h_s, y, y, [h_t])
        scaled = criterion(y, 7.0 * h_s + 2.0, y, y, [h_t])
    for name in ("feat_period", "feat_scale"):
        torch.testing.assert_close(scaled[name], base[name], rtol=1e-4, atol=1e-5)
    raw = make_criterion(feature_norm="none")
    with torch.no_grad():
        assert float(raw(y, 7.0 * h_s, y, y, [h_t])["feat_scale"]) > float(
            raw(y, h_s, y, y, [h_t])["feat_scale"]
        )


def test_ablations_drop_their_terms() -> None:
    y, h_s, h_t = torch.randn(4, H, 3), torch.randn(4, 3, 16), torch.randn(4, 3, 24)
    no_period = make_criterion(period=False)(y, h_s, y, y, [h_t])
    assert set(no_period) == {"mse", "pred_scale", "feat_scale", "total"}
    no_scale = make_criterion(scale=False)(y, h_s, y, y, [h_t])
    assert set(no_scale) == {"mse", "pred_period", "feat_period", "total"}
    cfg = DistillConfig(feature_terms=False)
    assert cfg.alpha_beta("ETTh1") == (2.0, 0.0)
    no_features = DistillationLoss(cfg.loss, *cfg.alpha_beta("ETTh1"), [24], 16)
    assert len(no_features.regressors) == 0
    assert set(no_features(y, h_s, y, y)) == {"mse", "pred_period", "pred_scale", "total"}


def test_dataset_defaults_and_overrides() -> None:
    assert DistillConfig().alpha_beta("ETTh1") == (2.0, 2.0)
    assert DistillConfig().alpha_beta("etth2") == (1.0, 0.5)
    assert DistillConfig(alpha=0.3).alpha_beta("ETTh2") == (0.3, 0.5)
    cfg = build_distill_config(data={"dataset": "ETTh1"}, distill={"beta": 1.0})
    assert cfg.run.data.lookback == 720 and cfg.run.model == "mlp"
    assert cfg.distill.teachers == ("simmtm", "himtm", "dmae") and cfg.distill.beta == 1.0
    with pytest.raises(ValueError, match="unknown setting"):
        build_distill_config(distill={"alhpa": 1.0})


def test_student_names() -> None:
    assert DistillConfig().student_name(["simmtm"]) == "student-simmtm"
    names = ["simmtm", "himtm", "dmae"]
    assert DistillConfig().student_name(names) == "student-ensemble"
    assert DistillConfig(feature_terms=False).student_name(names) == "student-ensemble-no-features"
    assert DistillConfig(period=False).student_name(names) == "student-ensemble-no-period"
    assert DistillConfig(scale=False).student_name(names) == "student-ensemble-no-scale"


def test_ensemble_weights() -> None:
    torch.testing.assert_close(ensemble_weights([0.4, 0.5], "mean"), torch.tensor([0.5, 0.5]))
    w = ensemble_weights([0.4, 0.8], "val-weighted")
    torch.testing.assert_close(w, torch.tensor([2 / 3, 1 / 3]))


# --------------------------------------------------------------------------- teachers


def test_teachers_resolve_by_name_or_folder(teacher_root: Path, data) -> None:
    cfg = dcfg(teacher_root)
    by_name = resolve_teacher_dir("ta", "ETTh1", H, cfg)
    assert by_name == teacher_root / f"ETTh1-ta-L{L_T}-H{H}"
    assert resolve_teacher_dir(str(by_name), "ETTh1", H, cfg) == by_name
    with pytest.raises(FileNotFoundError, match="no run folder"):
        resolve_teacher_dir("simmtm", "ETTh1", H, cfg)
    # A folder keeps the architecture's name; a clash gets a suffix.
    teachers = load_teachers(data, DistillConfig(teachers=(str(by_name), str(by_name))))
    assert [t.name for t in teachers] == ["patchtst", "patchtst-1"]
    with pytest.raises(ValueError, match="forecasts"):
        load_teachers(
            prepare(DataConfig("ETTh1", lookback=L_S, horizon=12)),
            DistillConfig(teachers=(str(by_name),)),
        )


def test_gradients_never_reach_the_teachers(teacher_root: Path, data) -> None:
    teachers = load_teachers(data, dcfg(teacher_root))
    before = [{k: v.clone() for k, v in t.model.state_dict().items()} for t in teachers]
    cached = teacher_pass(teachers[0], data, "train", features=True, progress=False)
    assert cached.h is not None and not cached.y.requires_grad
    # Teacher a is read from the cache, teacher b recomputed per batch (the uncached path).
    windows = TeacherWindows(data.splits["train"], cached.y, [cached.h, None], teachers)
    student = build_model("mlp", lookback=L_S, horizon=H, hidden=16)
    criterion = DistillationLoss(
        dcfg(teacher_root).loss, 2.0, 2.0, [t.model.feature_dim for t in teachers], 16
    )
    params = [*student.parameters(), *criterion.parameters()]
    optim = torch.optim.Adam(params, lr=0.1)
    x, y = windows.batch(torch.arange(0, 640, 10))
    y_s, h_s = student.forward_features(x)
    criterion(y_s, h_s, y, windows.current.y, windows.current.h)["total"].backward()
    optim.step()
    for t, state in zip(teachers, before, strict=True):
        assert not t.model.training
        assert all(p.grad is None and not p.requires_grad for p in t.model.parameters())
        for k, v in t.model.state_dict().items():
            torch.testing.assert_close(v, state[k])
    assert all(p.grad is not None for p in criterion.parameters())


def test_features_beyond_the_memory_budget_are_memory_mapped_not_recomputed(
    teacher_root: Path, data, tmp_path: Path
) -> None:
    teacher = load_teachers(data, dcfg(teacher_root))[0]
    in_memory = teacher_pass(teacher, data, "train", features=True, progress=False)
    spilled = teacher_pass(
        teacher, data, "train", True, max_feature_mb=0, spill_dir=tmp_path, progress=False
    )
    dropped = teacher_pass(teacher, data, "train", True, max_feature_mb=0, progress=False)
    assert spilled.spilled and not in_memory.spilled and dropped.h is None
    assert in_memory.h is not None and spilled.h is not None
    assert spilled.h.dtype == torch.float16
    assert (tmp_path / "ta-train-features.f16").stat().st_size == spilled.h.numel() * 2
    torch.testing.assert_close(spilled.h, in_memory.h, rtol=0, atol=0)
    torch.testing.assert_close(spilled.y, in_memory.y, rtol=0, atol=0)
    # Served from the map: a teacher-less TeacherWindows would fail if it had to recompute.
    windows = TeacherWindows(data.splits["train"], spilled.y, [spilled.h], [])
    windows.teachers = [None]  # type: ignore[list-item]  # never called: the feature is cached
    index = torch.tensor([5, 700, 3])
    windows.batch(index)
    assert windows.current is not None
    torch.testing.assert_close(windows.current.h[0], in_memory.h[index], rtol=0, atol=0)


def test_a_distillation_step_lowers_the_total_loss_on_real_windows(
    teacher_root: Path, data
) -> None:
    teachers = load_teachers(data, dcfg(teacher_root))
    index = torch.arange(0, 4096, 64)
    x, y = data.splits["train"].batch(index)  # [64, L_S, 7], [64, H, 7]
    with torch.no_grad():
        outs = [t.model.forward_features(x[:, -t.lookback :]) for t in teachers]
    y_t = torch.stack([o[0] for o in outs]).mean(0)  # [64, H, 7] the ensemble target
    h_t = [o[1] for o in outs]
    student = build_model("mlp", lookback=L_S, horizon=H, hidden=32)
    criterion = DistillationLoss(DistillConfig().loss, 2.0, 2.0, [h.shape[-1] for h in h_t], 32)
    optim = torch.optim.Adam([*student.parameters(), *criterion.parameters()], lr=1e-3)
    student.train()
    losses = []
    for _ in range(6):
        optim.zero_grad()
        y_s, h_s = student.forward_features(x)
        loss = criterion(y_s, h_s, y, y_t, h_t)["total"]
        assert torch.isfinite(loss)
        loss.backward()
        optim.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


# --------------------------------------------------------------------------- end to end


QUICK = {"epochs": 1, "batch_size": 64, "max_train_batches": 4, "progress": False, "threads": 1}


def test_run_distill_writes_a_loadable_student(teacher_root: Path, tmp_path: Path) -> None:
    cfg = build_distill_config(
        data={"dataset": "ETTh1", "lookback": L_S, "horizon": H},
        train=QUICK,
        distill={
            "teachers": ("ta", "tb"),
            "teacher_dir": str(teacher_root),
            "teacher_lookback": L_T,
            "weighting": "val-weighted",
        },
        model_settings={"hidden": 32},
        out_dir=str(tmp_path / "student"),
    )
    result = run_distill(cfg)
    assert result.name == "student-ensemble"
    model, run = load_forecaster(tmp_path / "student")
    assert run["model"] == "mlp" and run["name"] == "student-ensemble"
    assert model.lookback == L_S and run["distill"]["alpha_used"] == 2.0
    assert [(t["name"], t["lookback"]) for t in run["teachers"]] == [("ta", L_T), ("tb", L_T)]
    assert sum(t["weight"] for t in run["teachers"]) == pytest.approx(1.0)
    scores = run["teacher_scores"]
    assert scores["ensemble"]["mean"]["test"]["windows"] == run["test"]["windows"]
    summary = result.summary()
    assert summary["teachers"][0] == {"name": "ta", "lookback": L_T}
    assert summary["mse"] == pytest.approx(run["test"]["mse"])


def test_a_spilled_cache_trains_the_same_student_and_leaves_no_files(
    teacher_root: Path, tmp_path: Path
) -> None:
    def run(out: Path, **distill: object) -> dict[str, torch.Tensor]:
        cfg = build_distill_config(
            data={"dataset": "ETTh1", "lookback": L_S, "horizon": H},
            train={**QUICK, "epochs": 2, "max_train_batches": 3},
            distill={
                "teachers": ("ta",),
                "teacher_dir": str(teacher_root),
                "teacher_lookback": L_T,
                "evaluate_teachers": False,
                **distill,
            },
            model_settings={"hidden": 16},
            out_dir=str(out),
        )
        run_distill(cfg)
        assert not (out / "teacher-cache").exists()
        return load_forecaster(out)[0].state_dict()

    memory = run(tmp_path / "memory")
    spilled = run(tmp_path / "spilled", cache_max_mb=0)
    recomputed = run(tmp_path / "recomputed", cache=False)
    for k, v in memory.items():
        torch.testing.assert_close(spilled[k], v, rtol=0, atol=0)
        # Recomputed features are float32, not the cache's float16: close, not equal.
        torch.testing.assert_close(recomputed[k], v, rtol=1e-2, atol=1e-3)


def test_cli_prints_the_metrics_as_the_last_json_line(
    teacher_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "tiny.toml"
    config.write_text("[model]\nhidden = 16\n[train]\nbatch_size = 64\n")
    argv = [
        "distill", "--dataset", "ETTh1", "--horizon", str(H), "--lookback", str(L_S),
        "--teachers", "ta", "--teacher-dir", str(teacher_root), "--teacher-lookback", str(L_T),
        "--epochs", "1", "--max-train-batches", "2", "--no-progress", "--threads", "1",
        "--no-period", "--alpha", "1", "--config", str(config), "--out", str(tmp_path / "s"),
    ]  # fmt: skip
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["model"] == "student-ta-no-period" and out["alpha"] == 1.0 and out["beta"] == 2.0
    assert out["lookback"] == L_S and out["teachers"] == [{"name": "ta", "lookback": L_T}]
    assert out["mse"] > 0 and Path(out["checkpoint"]).exists()


def test_the_documented_cli_chain_works_with_default_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """pretrain -> finetune --from -> distill --teachers NAME, every output in its default folder
    (./runs), on a user's CSV: the commands README.md gives, at tiny sizes."""
    from tests.training.test_models import TINY
    from tests.training.test_teachers import write_csv

    monkeypatch.chdir(tmp_path)
    csv = write_csv(tmp_path / "plant.csv", channels=2, rows=900)
    budget = ["--epochs", "1", "--batch-size", "16", "--max-train-batches", "2", "--no-progress"]
    teacher_toml = tmp_path / "himtm.toml"
    teacher_toml.write_text("[model]\n" + "".join(f"{k} = {v}\n" for k, v in TINY["himtm"].items()))
    data = ["--dataset", str(csv), "--lookback", str(L_T)]
    assert (
        main(["pretrain", "--method", "himtm", *data, *budget, "--config", str(teacher_toml)]) == 0
    )
    pre = Path("runs/plant-himtm-L48-pretrain")
    assert (pre / "encoder.safetensors").exists()
    ft = ["finetune", "--method", "himtm", *data, "--horizon", str(H), "--from", str(pre)]
    assert main([*ft, *budget, "--config", str(teacher_toml)]) == 0
    assert (tmp_path / "runs/plant-himtm-L48-H24/best.safetensors").exists()
    capsys.readouterr()

    student_toml = tmp_path / "student.toml"
    student_toml.write_text("[model]\nhidden = 16\n")
    argv = ["distill", "--dataset", str(csv), "--horizon", str(H), "--lookback", str(L_S)]
    argv += ["--teachers", "himtm", "--teacher-lookback", str(L_T), *budget]
    assert main([*argv, "--config", str(student_toml)]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["model"] == "student-himtm" and out["teachers"] == [
        {"name": "himtm", "lookback": 48}
    ]
    assert Path(out["checkpoint"]) == Path("runs/plant-student-himtm-L96-H24/best.safetensors")
    assert Path(out["checkpoint"]).exists() and out["mse"] > 0


def test_the_default_config_is_the_authors_form_with_a_per_channel_student(
    teacher_root: Path, tmp_path: Path
) -> None:
    from training.config import CONFIG_DIR

    cfg = build_distill_config(
        CONFIG_DIR / "distill.toml",
        data={"dataset": "ETTh1", "lookback": L_S, "horizon": H},
        train=QUICK,
        distill={"teachers": ("ta",), "teacher_dir": str(teacher_root), "teacher_lookback": L_T},
        model_settings={"hidden": 16},
        out_dir=str(tmp_path / "authors"),
    )
    d = cfg.distill
    assert (d.kl_reduction, d.fft_norm, d.feature_norm) == ("mean", "backward", "none")
    assert (cfg.run.train.lr, cfg.run.train.lr_schedule, cfg.run.train.patience) == (
        0.01, "halve", 5,
    )  # fmt: skip
    run_distill(cfg)
    model, run = load_forecaster(tmp_path / "authors")
    assert run["model_config"]["batch_norm"] == "channel"
    assert run["model_config"]["channels"] == 7 and run["model_config"]["norm"] == "mean"
    assert not model.channel_independent
    assert run["distill"]["kl_reduction"] == "mean"
