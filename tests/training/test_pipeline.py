"""The pipeline end to end at a test-sized budget: teachers -> student -> registry -> aliases;
a failing stage stops it by name, ``--resume`` keeps what was done, any time column works."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from models_registry.store import FilesystemStore
from tests.training.test_models import TINY
from training.data import DataError, load_frame
from training.pipeline import PipelineConfig, StageFailed, default_name, load_plan, run_pipeline

REPO = Path(__file__).resolve().parents[2]
L, H = 48, 12
BUDGET = {"epochs": 1, "batch_size": 64, "max_train_batches": 4, "threads": 1, "progress": False}


def toml_table(values: dict[str, Any]) -> str:
    return "\n".join(f"{k} = {json.dumps(v)}" for k, v in values.items())


def write_plan(path: Path, student_model: dict[str, Any] | None = None) -> Path:
    # No masked pretraining: its budget alone would exceed the test's (see pipeline-quick.toml).
    path.write_text(
        'pretrained = []\nsupervised = ["patchtst"]\nstudent = "mlp"\n'
        f"[models.patchtst.model]\n{toml_table(TINY['patchtst'])}\n"
        f"[models.mlp.model]\n{toml_table(student_model or TINY['mlp'])}\n"
        "[stages.distill]\nepochs = 1\n"
    )
    return path


def tiny_config(tmp: Path, **changes: Any) -> PipelineConfig:
    values: dict[str, Any] = {
        "data": {"dataset": "ETTh1", "lookback": L, "horizon": H},
        "train": BUDGET,
        "registry": str(tmp / "registry"),
        "work_dir": str(tmp / "runs"),
        "plan_file": str(write_plan(tmp / "default-plan.toml")),
        "parity_windows": 16,
    }
    return PipelineConfig(**{**values, **changes})


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("pipeline")
    return tmp, run_pipeline(tiny_config(tmp))


def test_pipeline_registers_the_family_and_promotes_it_to_production(
    first_run: tuple[Path, dict[str, Any]],
) -> None:
    tmp, result = first_run
    store = FilesystemStore(tmp / "registry")
    name = "etth1-h12"
    assert result["name"] == name
    assert store.list_models() == [name, f"{name}-ensemble", f"{name}-patchtst"]
    assert store.aliases(name) == {"production": 1, "staging": 1}
    assert store.aliases(f"{name}-ensemble") == {"production": 1, "staging": 1}

    student = store.manifest(name, 1)
    group = store.manifest(f"{name}-ensemble", 1)
    teacher = store.manifest(f"{name}-patchtst", 1)
    assert (student.kind, group.kind, teacher.kind) == ("student", "ensemble", "teacher")
    assert group.members == [teacher.ref]
    assert set(student.teachers) == {teacher.ref, group.ref}
    assert student.calibration is not None and group.calibration is not None
    assert student.parity_max_abs_err is not None and student.parity_max_abs_err <= 1e-4
    # The default (authors') form's per-channel BatchNorm ties the student to ETTh1's 7 channels.
    assert student.channels == 7 and (student.lookback, student.horizon) == (L, H)
    store.onnx_bytes(name, 1)  # sha256 verified

    # The student was distilled from the teacher (its run records it), never trained alone.
    run = json.loads((tmp / "runs" / "mlp-distilled" / "run.json").read_text())
    assert [t["run"] for t in run["teachers"]] == [str(tmp / "runs" / "patchtst")]
    assert result["student"]["alias"] == "production" and result["student"]["version"] == 1
    assert result["ensemble"]["members"] == [f"{name}-patchtst@1"]
    stages = [s["stage"] for s in result["stages"]]
    assert stages == ["data", "train patchtst", "distill student", "export", "register", "promote"]


def test_a_worse_second_run_stays_on_staging(first_run: tuple[Path, dict[str, Any]]) -> None:
    tmp, first = first_run
    # A narrower student trained on fewer batches: worse on validation, so the gate refuses it.
    plan = write_plan(tmp / "worse.toml", student_model={"hidden": 8})
    worse = {**BUDGET, "max_train_batches": 1, "lr": 1e-5}
    result = run_pipeline(
        tiny_config(tmp, plan_file=str(plan), train=worse, work_dir=str(tmp / "w2"))
    )
    store = FilesystemStore(tmp / "registry")
    assert result["student"]["val_mse"] > first["student"]["val_mse"]
    assert result["student"]["alias"] == "staging" and result["student"]["version"] == 2
    assert (
        "refused" in result["student"]
        and str(first["student"]["val_mse"])[:5] in (result["student"]["refused"])
    )
    assert store.aliases("etth1-h12") == {"production": 1, "staging": 2}


def test_a_failed_stage_is_named_and_resume_keeps_the_finished_ones(tmp_path: Path) -> None:
    plan = write_plan(tmp_path / "plan.toml", student_model={"hidden": 2})
    cfg = tiny_config(tmp_path, plan_file=str(plan))
    with pytest.raises(StageFailed, match="stage 'distill student' failed") as info:
        run_pipeline(cfg)
    assert info.value.stage == "distill student"
    assert FilesystemStore(tmp_path / "registry").list_models() == []  # nothing half-published
    teacher = tmp_path / "runs" / "patchtst" / "best.safetensors"
    trained_at = teacher.stat().st_mtime_ns

    write_plan(plan)  # fixed: the student's width is valid again
    result = run_pipeline(tiny_config(tmp_path, plan_file=str(plan), resume=True))
    assert teacher.stat().st_mtime_ns == trained_at  # the teacher was not trained again
    assert result["student"]["version"] == 1
    # A resumed registration does not register twice.
    again = run_pipeline(tiny_config(tmp_path, plan_file=str(plan), resume=True))
    assert again["student"]["version"] == 1
    assert FilesystemStore(tmp_path / "registry").list_versions("etth1-h12") == [1]


def test_cli_quick_pipeline_on_a_csv_with_a_timestamp_column(tmp_path: Path) -> None:
    rows = 400
    t = np.arange(rows)
    frame = pd.DataFrame(
        {
            "timestamp": pd.date_range("2024-01-01", periods=rows, freq="h"),
            "load": np.sin(2 * np.pi * t / 24) + 0.01 * t,
            "temp": np.cos(2 * np.pi * t / 24),
        }
    )
    csv = tmp_path / "meters.csv"
    frame.to_csv(csv, index=False)
    argv = [sys.executable, "-m", "training", "pipeline", "--quick", "--dataset", str(csv)]
    argv += ["--lookback", str(L), "--horizon", str(H), "--epochs", "1", "--max-train-batches"]
    argv += ["2", "--no-progress", "--parity-windows", "8", "--registry", str(tmp_path / "reg")]
    argv += ["--work-dir", str(tmp_path / "runs")]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["name"] == "meters-h12" and result["student"]["alias"] == "production"
    assert "[6/6] promote: done" in proc.stderr

    # A failing stage exits non-zero and names itself.
    bad = tmp_path / "bad.toml"
    write_plan(bad, student_model={"hidden": 2})
    proc = subprocess.run(
        [*argv, "--config", str(bad), "--name", "other"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 1
    assert "pipeline stage 'distill student' failed" in proc.stderr


def test_time_column_detection_names_the_columns(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_text("when,v\n2024-01-01 00:00,1\n2024-01-01 01:00,2\n")
    assert load_frame(path, None).columns == ("v",)
    path.write_text("a,b\n1,2\n3,4\n")
    with pytest.raises(DataError, match=r"no timestamp column: none of \['a', 'b'\]"):
        load_frame(path, None)


def test_plan_and_names(tmp_path: Path) -> None:
    assert default_name("ETTh1", 96) == "etth1-h96"
    assert default_name("exchange_rate", 336) == "exchange_rate-h336"
    quick = load_plan(PipelineConfig(quick=True).plan_path())
    assert quick.student == "mlp" and quick.supervised == ("patchtst",)
    assert quick.table("patchtst", "train")["max_train_batches"] == 32
    full = load_plan(PipelineConfig().plan_path())
    assert full.pretrained == ("simmtm", "himtm", "dmae") and full.supervised == ()
    # The full chain distils in the default (authors') form; the quick plan keeps ours.
    assert (full.distill_config, quick.distill_config) == ("distill", "distill-ours")
    typo = tmp_path / "typo.toml"
    typo.write_text('supervised = ["patchtst"]\ndistill_config = "distil"\n')
    with pytest.raises(ValueError, match="distill_config 'distil' names no file"):
        load_plan(typo)
    bad = tmp_path / "bad.toml"
    bad.write_text('pretrained = []\nsupervised = ["patchtst"]\nstudent = "nope"\n')
    with pytest.raises(ValueError, match="unknown model"):
        load_plan(bad)
