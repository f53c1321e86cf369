"""The pipeline end to end at a test-sized budget: teachers -> student -> registry -> aliases."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from models_registry.store import FilesystemStore
from tests.training.test_models import TINY
from training import pipeline
from training.pipeline import PipelineConfig, choose_alias, default_name, load_plan, run_pipeline

L, H = 48, 12
BUDGET = {"epochs": 1, "batch_size": 64, "max_train_batches": 4}


def tiny_config(tmp: Path, **changes: Any) -> PipelineConfig:
    plan = tmp / "plan.toml"
    # No masked pretraining: its budget alone would exceed the test's (see pipeline-quick.toml).
    plan.write_text('pretrained = []\nsupervised = ["patchtst"]\nstudent = "mlp"\n')
    values: dict[str, Any] = {
        "dataset": "ETTh1",
        "lookback": L,
        "horizon": H,
        "registry": str(tmp / "registry"),
        "work_dir": str(tmp / "runs"),
        "config_file": str(plan),
        "threads": 1,
        "progress": False,
        "parity_windows": 16,
        "overrides": {
            "patchtst": {"model": TINY["patchtst"], "train": BUDGET},
            "mlp": {"model": TINY["mlp"], "train": BUDGET},
            "distill": {"train": BUDGET},
        },
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
    assert store.aliases(name) == {"production": 1}
    assert store.aliases(f"{name}-ensemble") == {"production": 1}
    assert store.resolve(name) == (name, 1)

    student = store.manifest(name, 1)
    group = store.manifest(f"{name}-ensemble", 1)
    teacher = store.manifest(f"{name}-patchtst", 1)
    assert (student.kind, group.kind, teacher.kind) == ("student", "ensemble", "teacher")
    assert group.members == [teacher.ref]
    assert set(student.teachers) == {teacher.ref, group.ref}
    assert student.calibration is not None and group.calibration is not None
    assert student.parity_max_abs_err is not None and student.parity_max_abs_err <= 1e-4
    assert student.channels is None and (student.lookback, student.horizon) == (L, H)
    store.onnx_bytes(name, 1)  # sha256 verified

    distilled = "distill" in pipeline.available_commands()
    assert result["student"]["distilled"] is distilled
    assert result["student"]["alias"] == "production" and result["student"]["version"] == 1
    assert result["ensemble"]["members"] == [f"{name}-patchtst@1"]
    assert result["fallbacks"] == []
    assert [s["stage"] for s in result["stages"]][0] == "data"
    assert result["stages"][-1]["stage"] == "promote"


def test_a_second_run_goes_to_staging_and_works_without_distillation(
    first_run: tuple[Path, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    tmp, _ = first_run
    only_train = pipeline.available_commands() - {"distill", "pretrain", "finetune"}
    monkeypatch.setattr(pipeline, "available_commands", lambda: only_train)
    result = run_pipeline(tiny_config(tmp))
    store = FilesystemStore(tmp / "registry")
    assert (
        result["student"] | {"alias": "staging", "version": 2, "distilled": False}
        == result["student"]
    )
    assert store.aliases("etth1-h12") == {"production": 1, "staging": 2}
    assert store.aliases("etth1-h12-ensemble") == {"production": 1, "staging": 2}
    assert choose_alias(store, "etth1-h12", None) == "staging"
    assert choose_alias(store, "unknown-model", None) == "production"


def test_plan_and_names(tmp_path: Path) -> None:
    assert default_name("ETTh1", 96) == "etth1-h96"
    assert default_name("exchange_rate", 336) == "exchange_rate-h336"
    quick = load_plan(PipelineConfig(quick=True))
    assert quick.student == "mlp" and quick.supervised == ("patchtst",)
    # Both chosen on validation (bench/results/validation_choices.md): the student's and the
    # PatchTST's own TOML settings, no overrides; the PatchTST's batches stay capped.
    assert quick.settings("mlp", "train") == {} and quick.settings("patchtst", "model") == {}
    assert quick.settings("patchtst", "train")["max_train_batches"] == 32
    full = load_plan(PipelineConfig())
    assert full.pretrained == ("simmtm", "himtm", "dmae")
    bad = tmp_path / "bad.toml"
    bad.write_text('student = "nope"\n')
    with pytest.raises(ValueError, match="unknown model"):
        load_plan(PipelineConfig(config_file=str(bad)))
