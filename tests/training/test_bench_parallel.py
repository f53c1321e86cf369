"""bench/teachers_parallel.py: the teacher and student queues as many one-run jobs at once."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tarfile
from pathlib import Path

import pytest

from bench import students as S
from bench import teachers as T
from bench import teachers_parallel as P

REPO = Path(__file__).resolve().parents[2]


def planned(argv: list[str]) -> list[str]:
    """The jobs a ``--dry-run`` of ``argv`` plans (its ``plan:`` log lines)."""
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: messages.append(r.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("bench.teachers_parallel")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        assert P.main([*argv, "--dry-run"]) == 0
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return [m.removeprefix("plan: ") for m in messages if m.startswith("plan: ")]


def test_the_queue_runs_in_parallel_with_its_dependencies_and_packs_what_it_made(
    tmp_path: Path,
) -> None:
    work, results, out = tmp_path / "work", tmp_path / "results", tmp_path / "out"
    results.mkdir()
    # The fine-tuning protocol is chosen already (the queue's protocol stage is not parallel).
    shutil.copy(REPO / "bench" / "results" / T.PROTOCOL_RECORDS, results)
    argv = [
        "--smoke", "--device", "cpu", "--jobs", "2", "--methods", "himtm",
        "--datasets", "ETTh1", "--horizons", "96", "--seeds", "0,1", "--inits", "pretrained",
        "--stages", "pretrain,finetune,ensemble", "--work", str(work), "--results", str(results),
        "--data-dir", str(REPO / "data"), "--logs", str(tmp_path / "logs"), "--pack", str(out),
        "--deadline", "900",
    ]  # fmt: skip
    assert P.main(argv) == 0
    records = json.loads((results / T.RECORDS).read_text())
    keys = sorted((r["model"], r["seed"]) for r in records)
    assert keys == [("ensemble", 0), ("ensemble", 1), ("himtm", 0), ("himtm", 1)]
    assert all(r["device"] == "cpu" for r in records if r["model"] == "himtm")
    plan = json.loads((out / "plan.json").read_text())
    jobs = {j["name"]: j for j in plan["jobs"]}
    assert set(jobs) == {
        "pretrain himtm ETTh1",
        "finetune himtm pretrained ETTh1-96 s0",
        "finetune himtm pretrained ETTh1-96 s1",
        "ensemble ETTh1-96 s0",
        "ensemble ETTh1-96 s1",
    }
    assert all(j["done"] for j in jobs.values())
    # Each fine-tuning started only after the encoder, each ensemble after its teacher.
    pre = jobs["pretrain himtm ETTh1"]["ended_s"]
    for seed in (0, 1):
        ft = jobs[f"finetune himtm pretrained ETTh1-96 s{seed}"]
        assert ft["started_s"] >= pre
        assert jobs[f"ensemble ETTh1-96 s{seed}"]["started_s"] >= ft["ended_s"]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and "records.tar" in files and "weights-0.tar" in files
    with tarfile.open(out / "weights-0.tar") as tar:
        names = tar.getnames()
    assert any(n.endswith("ETTh1-himtm-L336-pretrain/encoder.safetensors") for n in names)
    assert sum(n.endswith("best.safetensors") for n in names) == 2
    # Nothing left: a second invocation plans no job.
    assert planned(argv[: argv.index("--pack")]) == []


def _ensemble(dataset: str, horizon: int, seed: int) -> dict[str, object]:
    return {
        "dataset": dataset, "horizon": horizon, "lookback": 336, "model": "ensemble", "init": "",
        "seed": seed, "mse": 0.4, "mae": 0.4, "members": [], "weighting": "mean",
    }  # fmt: skip


def _choice(lookback: int, form: str, val: float, dataset: str = "ETTh1") -> dict[str, object]:
    return {
        "dataset": dataset, "horizon": 96, "lookback": lookback, "seed": 0, "form": form,
        "val_mse": val, "epochs": 3, "best_epoch": 2, "model": "student",
    }  # fmt: skip


def test_the_students_are_planned_as_their_choices_and_teachers_land(tmp_path: Path) -> None:
    a = argparse.Namespace(
        results=tmp_path, student_horizons=(96,), datasets=("ETTh1", "ETTh2"), seeds=(0, 1, 2)
    )
    teachers = [_ensemble("ETTh1", 96, 0), _ensemble("ETTh1", 96, 1), _ensemble("ETTh2", 96, 0)]
    (tmp_path / T.RECORDS).write_text(json.dumps(teachers))
    names = {j.name for j in P.student_jobs(a)}
    # First the form, chosen on ETTh1-96 alone: nothing else waits on it but the records copy.
    assert names == {
        *(f"choose ETTh1-96 L{lb} {f}" for lb in S.LOOKBACKS for f in S.FORMS),
        "ensemble-record ETTh1-96 s0", "ensemble-record ETTh1-96 s1",
        "ensemble-record ETTh2-96 s0",
    }  # fmt: skip
    choices = [
        _choice(336, "ours", 0.70), _choice(720, "ours", 0.71),
        _choice(336, "authors", 0.69), _choice(720, "authors", 0.72),
    ]  # fmt: skip
    (tmp_path / S.CHOICES).write_text(json.dumps(choices))
    names = {j.name for j in P.student_jobs(a)}
    # The authors' form won: ETTh2-96 chooses its lookback in that form; ETTh1-96 (L=336 won)
    # weighs its budget variants at that lookback, and runs its plain MLPs for every seed and its
    # ablations (the authors' loss among them: it starts from our form, S.ABLATION_BASE); its
    # students wait on the budget.
    assert {n for n in names if n.startswith("choose")} == {
        "choose ETTh2-96 L336 authors", "choose ETTh2-96 L720 authors",
        *(f"choose ETTh1-96 L336 authors {v}" for v in S.CHOICE_VARIANTS),
    }  # fmt: skip
    assert not {n for n in names if n.startswith("student ")}
    assert {n for n in names if n.startswith("mlp")} == {f"mlp ETTh1-96 s{s}" for s in (0, 1, 2)}
    ablations = {n for n in names if n.startswith("student-")}
    assert ablations == {f"{m} ETTh1-96 s{s}" for m in S.ABLATIONS for s in (0, 1)}
    job = next(j for j in P.student_jobs(a) if j.name.startswith("choose ETTh1-96 L336 authors "))
    assert job.args == ["--stages", "choose", "--datasets", "ETTh1", "--horizons", "96",
                        "--seeds", "0", "--forms", "authors", "--variants",
                        S.CHOICE_VARIANTS[0]]  # fmt: skip
    # The default budget wins on validation: ETTh1-96's students run where a seed has its
    # ensemble. A student recorded in another variant does not count as done.
    budgets = [{**_choice(336, "authors", 0.70), "variant": v} for v in S.CHOICE_VARIANTS]
    (tmp_path / S.CHOICES).write_text(json.dumps(choices + budgets))
    (tmp_path / S.RECORDS).write_text(json.dumps([{
        "dataset": "ETTh1", "horizon": 96, "model": "student", "seed": 0, "lookback": 336,
        "form": "authors", "variant": S.CHOICE_VARIANTS[0], "mse": 0.4,
    }]))  # fmt: skip
    names = {j.name for j in P.student_jobs(a)}
    assert {n for n in names if n.startswith("student ")} == {
        "student ETTh1-96 s0", "student ETTh1-96 s1",
    }  # fmt: skip
    job = next(j for j in P.student_jobs(a) if j.name == "student ETTh1-96 s1")
    assert job.args == ["--stages", "student", "--datasets", "ETTh1", "--horizons", "96",
                        "--seeds", "1"]  # fmt: skip
    assert job.check is not None and not job.check()


@pytest.mark.parametrize("flag", ["--stages", "--skip"])
def test_a_job_left_out_takes_what_waits_on_it_along(tmp_path: Path, flag: str) -> None:
    results = tmp_path / "results"
    results.mkdir()
    shutil.copy(REPO / "bench" / "results" / T.PROTOCOL_RECORDS, results)
    value = "finetune,ensemble" if flag == "--stages" else "pretrain himtm ETTh1"
    argv = [
        "--methods", "himtm", "--datasets", "ETTh1", "--horizons", "96",
        "--seeds", "0", "--inits", "pretrained", "--work", str(tmp_path / "work"),
        "--results", str(results), "--stages", "pretrain,finetune,ensemble",
    ]  # fmt: skip
    assert planned(argv) == [
        "pretrain himtm ETTh1",
        "ensemble ETTh1-96 s0 (after finetune himtm pretrained ETTh1-96 s0)",
        "finetune himtm pretrained ETTh1-96 s0 (after pretrain himtm ETTh1)",
    ]
    assert planned([*argv, flag, value]) == []


def test_a_crashed_job_fails_the_invocation_and_names_its_log(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    argv = [
        "--smoke", "--device", "cpu", "--jobs", "1", "--methods", "himtm", "--datasets", "ETTh1",
        "--stages", "pretrain", "--work", str(tmp_path / "work"), "--results", str(results),
        "--data-dir", str(tmp_path / "no-such-folder"), "--logs", str(tmp_path / "logs"),
    ]  # fmt: skip
    assert P.main(argv) == 1
    log = (tmp_path / "logs" / "pretrain_himtm_ETTh1.log").read_text()
    assert "no-such-folder" in log


def test_the_budget_is_weighed_against_the_default_student_on_the_current_teachers(
    tmp_path: Path,
) -> None:
    """A lookback choice recorded before its teachers were retrained (or on another device) is
    not the default's reference: the seed-0 default student distilled from the current members
    is; and a student run already recorded (by the tuning bench, or displaced by an earlier
    choice) is taken back instead of retrained."""
    a = argparse.Namespace(
        results=tmp_path, teacher_results=tmp_path / T.RECORDS, forms=tuple(S.FORMS),
        lookbacks=S.LOOKBACKS, variants=("dropout0.3",), datasets=("ETTh1",), horizons=(96,),
        seeds=(0, 1), stages=("student",), ablations=(), peers=(), all_forms=False,
        time_limit=None,
    )  # fmt: skip
    members = ["bench/checkpoints/x-s0", "bench/checkpoints/y-s0"]
    teachers = [{**_ensemble("ETTh1", 96, s), "members": members} for s in (0, 1)]
    (tmp_path / T.RECORDS).write_text(json.dumps(teachers))
    choices = [
        _choice(336, "authors", 0.70), _choice(720, "authors", 0.72),
        _choice(336, "ours", 0.71), _choice(720, "ours", 0.73),
        {**_choice(336, "authors", 0.69), "variant": "dropout0.3"},
    ]  # fmt: skip
    (tmp_path / S.CHOICES).write_text(json.dumps(choices[:-1]))
    c = T.Cell("ETTh1", 96)
    assert S.chosen_variant(a, c) is None  # the variant's run is missing

    def student(seed: int, variant: str, val: float, who: list[str]) -> dict[str, object]:
        return {
            "dataset": "ETTh1", "horizon": 96, "lookback": 336, "model": "student",
            "seed": seed, "form": "authors", "variant": variant, "val_mse": val, "mse": val / 2,
            "teachers": who, "epochs": 4, "best_epoch": 2,
        }  # fmt: skip

    # the choose stage takes the tuning bench's run of it (these members do not exist: nothing
    # could train)
    (tmp_path / S.TUNING).write_text(json.dumps([student(0, "dropout0.3", 0.69, members)]))
    assert S.cmd_run(argparse.Namespace(**{**vars(a), "stages": ("choose",)})) == 0
    got = json.loads((tmp_path / S.CHOICES).read_text())
    assert [r for r in got if r not in choices] == [{**choices[-1], "epochs": 4, "best_epoch": 2}]
    assert S.chosen_variant(a, c) == "dropout0.3"  # against the choice record alone

    # a default student from teachers since replaced does not count; one from these does
    (tmp_path / S.TUNING).write_text(json.dumps([student(0, "default", 0.60, ["old"])]))
    assert S.chosen_variant(a, c) == "dropout0.3"
    (tmp_path / S.TUNING).write_text(
        json.dumps([student(0, "default", 0.68, members), student(1, "default", 0.66, members)])
    )
    assert S.chosen_variant(a, c) == "default"
    # the student stage takes both seeds back from the tuning records: nothing trains
    tasks = list(S.tasks(a, T.Budget(None)))
    assert [t.label for t in tasks] == ["student ETTh1-96 s0", "student ETTh1-96 s1"]
    assert S.cmd_run(a) == 0
    rows = json.loads((tmp_path / S.RECORDS).read_text())
    assert sorted((r["seed"], r["variant"], r["val_mse"]) for r in rows) == [
        (0, "default", 0.68), (1, "default", 0.66),
    ]  # fmt: skip
