"""Every command's run stopped after epoch k and resumed ends with the weights of an
uninterrupted run with the same seed (the one training loop's checkpoint is complete)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from training.config import build_run_config
from training.distill import build_distill_config, run_distill
from training.pretrain import (
    CheckpointError,
    FinetuneRunConfig,
    build_pretrain_config,
    run_finetune,
    run_pretrain,
)
from training.train import run_train

L, H = 48, 12
# Dropout on, several epochs, a shuffled data order and a cosine schedule: everything that a
# partial checkpoint could get wrong shows up in the final weights.
BUDGET: dict[str, Any] = {
    "epochs": 3,
    "batch_size": 16,
    "max_train_batches": 4,
    "lr_schedule": "cosine",
    "lr": 0.003,
    "patience": 5,
    "progress": False,
    "threads": 1,
}
TINY = {"d_model": 8, "n_heads": 2, "d_ff": 16}


@pytest.fixture(scope="module")
def csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(0)
    rows = 360
    t = np.arange(rows)
    cols = {
        f"c{i}": np.sin(2 * np.pi * t / (10 + 4 * i)) + 0.1 * rng.normal(size=rows)
        for i in range(3)
    }
    frame = pd.DataFrame({"date": pd.date_range("2024-01-01", periods=rows, freq="h"), **cols})
    path = tmp_path_factory.mktemp("resume") / "series.csv"
    frame.to_csv(path, index=False)
    return path


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path)


def last_module(folder: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = torch.load(folder / "last.pt", weights_only=True)["module"]
    return state


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def interrupted_vs_straight(
    tmp_path: Path, run: Callable[[Path, dict[str, Any], bool], Any], best_file: str
) -> None:
    """Run straight through; run again stopping after epoch 1, then after epoch 2, resuming."""
    torch.manual_seed(99)  # each run function must reseed whatever was drawn before
    run(tmp_path / "straight", BUDGET, False)
    for k, resume in ((1, False), (1, True)):
        torch.rand(7)
        out = run(tmp_path / "stopped", {**BUDGET, "stop_after_epochs": k}, resume)
        assert out is not None
    state = torch.load(tmp_path / "stopped" / "last.pt", weights_only=True)
    assert state["epoch"] == 2 and not state["finished"]
    run(tmp_path / "stopped", BUDGET, True)
    assert_same(last_module(tmp_path / "straight"), last_module(tmp_path / "stopped"))
    assert_same(
        weights(tmp_path / "straight" / best_file), weights(tmp_path / "stopped" / best_file)
    )


def test_train_resumes_exactly(tmp_path: Path, csv: Path) -> None:
    def run(out: Path, budget: dict[str, Any], resume: bool) -> Any:
        cfg = build_run_config(
            "patchtst",
            data={"dataset": str(csv), "lookback": L, "horizon": H},
            train=budget,
            model_settings={**TINY, "n_layers": 1, "dropout": 0.2},
            out_dir=str(out),
        )
        return run_train(cfg, resume=resume)

    interrupted_vs_straight(tmp_path, run, "best.safetensors")
    doc = json.loads((tmp_path / "stopped" / "run.json").read_text())
    assert [row["epoch"] for row in doc["history"]] == [1, 2, 3]
    assert doc["finished"] and 1 <= doc["best_epoch"] <= 3


def simmtm_pretrain(
    csv: Path, out: Path, budget: dict[str, Any], resume: bool, lookback: int = L
) -> Any:
    """A tiny SimMTM pretraining config on the fixture series."""
    return build_pretrain_config(
        "simmtm",
        data={"dataset": str(csv), "lookback": lookback},
        pretrain=budget,
        model_settings={**TINY, "n_layers": 1, "patch_len": 8, "stride": 8},
        out_dir=str(out),
        resume=resume,
    )


def test_pretrain_resumes_exactly_and_keeps_the_best_encoder(tmp_path: Path, csv: Path) -> None:
    def run(out: Path, budget: dict[str, Any], resume: bool) -> Any:
        return run_pretrain(simmtm_pretrain(csv, out, budget, resume))

    interrupted_vs_straight(tmp_path, run, "encoder.safetensors")
    meta = json.loads((tmp_path / "stopped" / "pretrain.json").read_text())
    losses = [row["val_loss"] for row in meta["history"]]
    assert meta["finished"] and meta["best_epoch"] == int(np.argmin(losses)) + 1


def test_finetune_resumes_exactly(tmp_path: Path, csv: Path) -> None:
    pre = build_pretrain_config(
        "dmae",
        data={"dataset": str(csv), "lookback": L},
        pretrain={**BUDGET, "epochs": 1},
        model_settings={**TINY, "n_layers": 1},
        out_dir=str(tmp_path / "pre"),
    )
    run_pretrain(pre)

    def run(out: Path, budget: dict[str, Any], resume: bool) -> Any:
        cfg = build_run_config(
            "dmae",
            data={"dataset": str(csv), "lookback": L, "horizon": H},
            train={**budget, "encoder_lr_scale": 0.1, "head_warmup_epochs": 1},
            out_dir=str(out),
        )
        return run_finetune(FinetuneRunConfig(cfg, init_from=str(tmp_path / "pre"), resume=resume))

    interrupted_vs_straight(tmp_path, run, "best.safetensors")


def test_head_warmup_leaves_the_encoder_untouched(tmp_path: Path, csv: Path) -> None:
    pre = build_pretrain_config(
        "dmae",
        data={"dataset": str(csv), "lookback": L},
        pretrain={**BUDGET, "epochs": 1},
        model_settings={**TINY, "n_layers": 1},
        out_dir=str(tmp_path / "pre"),
    )
    run_pretrain(pre)
    cfg = build_run_config(
        "dmae",
        data={"dataset": str(csv), "lookback": L, "horizon": H},
        train={**BUDGET, "epochs": 1, "head_warmup_epochs": 1},
        out_dir=str(tmp_path / "ft"),
    )
    run_finetune(FinetuneRunConfig(cfg, init_from=str(tmp_path / "pre")))
    encoder = weights(tmp_path / "pre" / "encoder.safetensors")
    tuned = last_module(tmp_path / "ft")
    params = {k for k in encoder if "running" not in k and "num_batches" not in k}
    assert params and all(torch.equal(encoder[k], tuned[f"backbone.{k}"]) for k in params)
    head = [k for k in tuned if not k.startswith("backbone.")]
    assert head


def test_distill_resumes_exactly(tmp_path: Path, csv: Path) -> None:
    teacher = build_run_config(
        "patchtst",
        data={"dataset": str(csv), "lookback": L, "horizon": H},
        train={**BUDGET, "epochs": 1},
        model_settings={**TINY, "n_layers": 1},
        out_dir=str(tmp_path / "teacher"),
    )
    run_train(teacher)

    def run(out: Path, budget: dict[str, Any], resume: bool) -> Any:
        cfg = build_distill_config(
            data={"dataset": str(csv), "lookback": L, "horizon": H},
            train=budget,
            distill={"teachers": (str(tmp_path / "teacher"),)},
            model_settings={"hidden": 16},
            out_dir=str(out),
            resume=resume,
        )
        return run_distill(cfg)

    interrupted_vs_straight(tmp_path, run, "best.safetensors")

    # Resuming a finished run restores and scores its best epoch without the teacher passes
    # (their scores, weights and seconds come from its run.json) and reports the same result.
    first = json.loads((tmp_path / "straight" / "run.json").read_text())
    import training.distill as distill

    def no_pass(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a finished run reran its teacher passes")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(distill, "teacher_pass", no_pass)
        mp.setattr(distill, "score_teachers", no_pass)
        again = run(tmp_path / "straight", BUDGET, True)
    assert again.fit.finished
    assert again.fit.test == pytest.approx(first["test"])
    assert again.scores == first["teacher_scores"]
    assert again.teacher_seconds == first["teacher_seconds"]
    assert [t["weight"] for t in again.teachers] == [t["weight"] for t in first["teachers"]]
    assert json.loads((tmp_path / "straight" / "run.json").read_text())["history"] == first[
        "history"
    ]


def test_pretrain_resumes_a_checkpoint_written_before_a_data_option_existed(
    tmp_path: Path, csv: Path
) -> None:
    """A data option added to the code since (left at its None default) does not block a resume;
    a setting that really differs still does, with the setting named."""

    def cfg(out: Path, budget: dict[str, Any], resume: bool, lookback: int = L) -> Any:
        return simmtm_pretrain(csv, out, budget, resume, lookback)

    out = tmp_path / "old"
    run_pretrain(cfg(out, {**BUDGET, "stop_after_epochs": 1}, False))
    meta_path = out / "pretrain.json"
    meta = json.loads(meta_path.read_text())
    assert meta["data"].pop("id_column") is None  # as written before long-format data existed
    meta_path.write_text(json.dumps(meta))
    run_pretrain(cfg(out, BUDGET, True))
    assert json.loads(meta_path.read_text())["finished"]

    other = tmp_path / "other"
    run_pretrain(cfg(other, {**BUDGET, "stop_after_epochs": 1}, False))
    with pytest.raises(CheckpointError, match="lookback"):
        run_pretrain(cfg(other, BUDGET, True, lookback=L + 8))
