"""bench/teachers.py: the resumable queue of teacher runs, end to end at toy budgets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import teachers as bench

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def queue(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[str]]:
    tmp = tmp_path_factory.mktemp("teachers")
    work, results = tmp / "work", tmp / "results"
    results.mkdir()
    argv = [
        "run", "--smoke", "--methods", "himtm", "--datasets", "ETTh1", "--horizons", "96",
        "--seeds", "0,1", "--work", str(work), "--results", str(results),
        "--data-dir", str(REPO / "data"), "--no-progress", "--threads", "1",
        "--stages", "pretrain,protocol,finetune,ensemble,supervised,variant",
    ]  # fmt: skip
    assert bench.main(argv) == 0
    return work, results, argv


def test_every_cell_gets_one_record_per_seed_with_the_protocol_chosen_on_validation(
    queue: tuple[Path, Path, list[str]],
) -> None:
    _, results, _ = queue
    protocols = json.loads((results / "teacher_protocols.json").read_text())
    assert len(protocols) == 3 + 2  # himtm: 3 pretrained + 2 scratch protocols
    assert all("mse" not in r and "mae" not in r for r in protocols)  # validation only
    records = json.loads((results / "teachers.json").read_text())
    keys = sorted((r["model"], r["init"], r["seed"]) for r in records)
    assert keys == sorted(
        [("himtm", i, s) for i in ("pretrained", "scratch") for s in (0, 1)]
        + [("ensemble", "", 0), ("ensemble", "", 1), ("patchtst", "", 0), ("patchtst", "", 1)]
    )
    for r in records:
        assert set(bench.RECORD_FIELDS) <= set(r)
        assert r["mse"] > 0 and r["mae"] > 0
        if r["model"] == "himtm":
            chosen = min(
                (p for p in protocols if (p["model"], p["init"]) == (r["model"], r["init"])),
                key=lambda p: p["val_mse"],
            )
            assert r["protocol"] == chosen["protocol"]
            assert r["max_train_batches"] == 2  # --smoke says so in every record
            assert (r["pretrain_epochs"] == 1) == (r["init"] == "pretrained")
        if r["model"] == "ensemble":
            assert r["val_mse"] == min(r["val_mse_by_weighting"].values())
            assert len(r["members"]) == 1


def test_the_ema_variant_has_its_own_encoder_and_is_reported_beside_the_default(
    queue: tuple[Path, Path, list[str]],
) -> None:
    work, results, _ = queue
    variants = json.loads((results / "teacher_variants.json").read_text())
    assert sorted(r["seed"] for r in variants) == [0, 1]
    for r in variants:
        assert (r["model"], r["init"], r["variant"], r["teacher"]) == (
            "himtm", "pretrained", "himtm-ema", "ema"
        )  # fmt: skip
        assert "himtm-ema-L336-H96-pretrained" in r["run"]
    meta = json.loads((work / "ETTh1-himtm-ema-L336-pretrain" / "pretrain.json").read_text())
    assert meta["model_config"]["teacher"] == "ema"
    default = json.loads((work / "ETTh1-himtm-L336-pretrain" / "pretrain.json").read_text())
    assert default["model_config"]["teacher"] == "shared"
    assert bench.main(["report", "--results", str(results), "--work", str(work), "--no-plots"]) == 0
    text = (results / "teachers.md").read_text()
    assert "## himtm: default against `teacher = 'ema'` (ETTh1-96, pretrained)" in text
    assert "himtm-ema minus default, test MSE paired by seed:" in text


def test_a_second_invocation_has_nothing_left_and_the_report_pairs_the_seeds(
    queue: tuple[Path, Path, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    work, results, argv = queue
    before = (results / "teachers.json").read_bytes()
    assert bench.main(argv) == 0
    assert (results / "teachers.json").read_bytes() == before
    assert bench.main(["report", "--results", str(results), "--work", str(work), "--no-plots"]) == 0
    text = (results / "teachers.md").read_text()
    assert "## ETTh1, H = 96" in text and "PatchTST/64 (published, L = 512) | | 0.370" in text
    assert text.count("- himtm: ") == 1
    assert "(2)" in text  # two seeds per mean
    # status: counts what the queue recorded and names what was never started.
    assert bench.main(["status", "--results", str(results), "--work", str(work)]) == 0
    out = capsys.readouterr().out
    assert "himtm   ETTh1: finished, 1 / 0 epochs" in out
    assert "simmtm  ETTh1: not started" in out
    assert "ETTh1-96: simmtm-pre 0, simmtm-scr 0, himtm-pre 2, himtm-scr 2" in out
    assert "patchtst 2, ensemble 2" in out


# --------------------------------------------------------------------------- bench/students.py
# The students' queue reads the teachers' records above (their ensembles), as it does for real.


@pytest.fixture(scope="module")
def students(queue: tuple[Path, Path, list[str]]) -> tuple[Path, list[str]]:
    from bench import students as sbench

    work, results, _ = queue
    argv = [
        "run", "--smoke", "--datasets", "ETTh1", "--horizons", "96", "--seeds", "0,1",
        "--work", str(work / "students"), "--results", str(results),
        "--data-dir", str(REPO / "data"), "--no-progress", "--threads", "1",
        "--stages", "choose,student,ensemble,mlp,ablation",
    ]  # fmt: skip
    assert sbench.main(argv) == 0
    return results, argv


def test_students_use_the_lookback_and_form_chosen_on_validation_and_every_seed_is_recorded(
    students: tuple[Path, list[str]],
) -> None:
    from bench import students as sbench

    results, _ = students
    every = json.loads((results / "student_choices.json").read_text())
    choices = [c for c in every if sbench.variant_of(c) == "default"]
    assert sorted((c["form"], c["lookback"]) for c in choices) == [
        ("authors", 336), ("authors", 720), ("ours", 336), ("ours", 720),
    ]  # fmt: skip
    assert all("mse" not in c and "mae" not in c for c in every)  # validation only
    best = min(choices, key=lambda c: c["val_mse"])
    # then the budget, at the chosen form and lookback: the default against each variant
    budgets = [c for c in every if (c["form"], c["lookback"]) == (best["form"], best["lookback"])]
    assert sorted(sbench.variant_of(c) for c in budgets) == sorted(
        ["default", *sbench.CHOICE_VARIANTS]
    )
    variant = sbench.variant_of(min(budgets, key=lambda c: c["val_mse"]))
    records = json.loads((results / "students.json").read_text())
    for r in records:
        assert set(sbench.RECORD_FIELDS) <= set(r)
        assert r["mse"] > 0 and r["params"] > 0
    by = {(r["model"], r["seed"]): r for r in records}
    assert sorted(by) == sorted(
        (m, s) for m in ("student", "ensemble", "mlp", *sbench.ABLATIONS) for s in (0, 1)
    )
    for s in (0, 1):  # each ablation drops one part of the chosen form (at the form's own
        for m in sbench.ABLATIONS:  # budget); the authors' loss goes onto ours
            assert by[(m, s)]["form"] == sbench.ABLATION_BASE.get(m, best["form"])
            assert by[(m, s)]["variant"] == "default"
    assert by[("student-authors-loss", 0)]["budget"]["distill"]["kl_reduction"] == "mean"
    for s in (0, 1):
        student = by[("student", s)]
        assert (student["form"], student["lookback"]) == (best["form"], best["lookback"])
        assert student["variant"] == variant
        if variant != "default":
            assert student["overrides"] == sbench.VARIANTS[variant]
        assert by[("mlp", s)]["lookback"] == best["lookback"]  # the plain MLP sees what it sees
        # the ensemble row is the teachers' record of the same seed, not a re-measurement
        teacher = next(
            t
            for t in json.loads((results / "teachers.json").read_text())
            if (t["model"], t["seed"]) == ("ensemble", s)
        )
        assert (by[("ensemble", s)]["mse"], by[("ensemble", s)]["teachers"]) == (
            teacher["mse"],
            teacher["members"],
        )
        assert student["teachers"] == [
            str(Path(m).relative_to(REPO)) if Path(m).is_relative_to(REPO) else m
            for m in teacher["members"]
        ]
    assert by[("student-no-features", 0)]["beta"] == 0.0
    assert by[("student-no-period", 0)]["budget"]["distill"]["period"] is False
    assert by[("student-no-scale", 0)]["budget"]["distill"]["scale"] is False


def test_students_second_invocation_has_nothing_left_and_the_report_has_every_row(
    students: tuple[Path, list[str]],
) -> None:
    from bench import students as sbench

    results, argv = students
    before = (results / "students.json").read_bytes()
    assert sbench.main(argv) == 0
    assert (results / "students.json").read_bytes() == before
    assert sbench.main(["report", "--results", str(results)]) == 0
    text = (results / "students.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| ETTh1-96 | "))
    assert row.count("(2)") == 3 and row.endswith("| 0.370 | 0.375 |")  # student, ensemble, mlp
    assert "| ETTh1-96 | ours | 720 |" in text


def test_students_status_counts_seeds_and_names_the_cells_waiting_on_teachers(
    students: tuple[Path, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    from bench import students as sbench

    results, _ = students
    assert sbench.main(["status", "--results", str(results)]) == 0
    out = capsys.readouterr().out
    assert "ETTh1-96: student 2, ensemble 2, mlp 2, nf-dlinear 0, nf-patchtst 0" in out
    assert "ablations " in out
    # the smoke queue trained seeds 0-1 of ETTh1-96 only: that cell still lacks seed 2's
    # ensemble, and the students' extra horizons say how to train theirs
    assert "ETTh1-96: teacher ensembles for seeds [0, 1] of [0, 1, 2]" in out
    assert (
        "ETTh2-720: teacher ensembles for seeds [] of [0, 1, 2] (python bench/teachers.py "
        "run --horizons 720 --inits pretrained --stages finetune,ensemble)" in out
    )


def test_student_tuning_distils_each_variant_like_the_student_and_chooses_on_validation(
    students: tuple[Path, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    from bench import student_tuning as tuning
    from bench import students as sbench

    results, argv = students
    work = argv[argv.index("--work") + 1]
    common = [
        "--results", str(results), "--work", work, "--data-dir", str(REPO / "data"),
        "--no-progress", "--threads", "1", "--smoke",
    ]  # fmt: skip
    run = ["run", "--cells", "ETTh1-96", "--variants", "dropout0.3,lr1e-3", *common]
    assert tuning.main(run) == 0
    records = json.loads((results / tuning.RECORDS).read_text())
    student = next(
        r
        for r in json.loads((results / sbench.RECORDS).read_text())
        if (r["model"], r["seed"]) == ("student", 0)
    )
    assert sorted(r["variant"] for r in records) == ["dropout0.3", "lr1e-3"]
    for r in records:  # the student's cell, seed, lookback, form and teachers; one setting moved
        for k in ("dataset", "horizon", "seed", "lookback", "form", "teachers"):
            assert r[k] == student[k], k
        assert r["overrides"] == tuning.VARIANTS[r["variant"]]
    by = {r["variant"]: r for r in records}
    assert by["lr1e-3"]["budget"]["train"]["lr"] == 0.001
    run_json = json.loads((REPO / by["dropout0.3"]["run"] / "run.json").read_text())
    assert run_json["model_config"]["dropout"] == 0.3
    assert tuning.main(run) == 0  # a second invocation has nothing left
    assert json.loads((results / tuning.RECORDS).read_text()) == records
    assert tuning.main(["report", "--results", str(results)]) == 0
    rows = [ln for ln in (results / tuning.REPORT).read_text().splitlines() if "ETTh1-96" in ln]
    variants = {"dropout0.3", "lr1e-3", student["variant"]}
    assert sorted(ln.split(" | ")[1].split(" ")[0] for ln in rows) == sorted(variants)
    # the row the cell's students are: its validation MSE is seed 0's, as the choice saw it
    in_use = [ln for ln in rows if "**in use**" in ln]
    assert len(in_use) == 1 and in_use[0].startswith(f"| ETTh1-96 | {student['variant']} ")
    assert f"| {student['val_mse']:.4f} |" in in_use[0]
    with pytest.raises(SystemExit):
        tuning.main(["run", "--cells", "ETTh1-96", "--variants", "bogus", *common])
    assert "unknown variant 'bogus'" in capsys.readouterr().err


def test_bundle_exports_the_seed_chain_it_recorded_with_lineage_and_metrics(
    students: tuple[Path, list[str]], tmp_path: Path
) -> None:
    from bench import students as sbench
    from models_registry.bundle import verify_export
    from models_registry.store import FilesystemStore

    results, run_argv = students
    work = run_argv[run_argv.index("--work") + 1]
    before = (results / "students.json").read_bytes()
    out = tmp_path / "bundled"
    argv = [
        "bundle", "--smoke", "--datasets", "ETTh1", "--seed", "1", "--work", work,
        "--results", str(results), "--data-dir", str(REPO / "data"), "--no-progress",
        "--threads", "1", "--out", str(out),
    ]  # fmt: skip
    assert sbench.main(argv) == 0
    # The student is the recorded run of that seed, resumed (finished), not a new one.
    assert (results / "students.json").read_bytes() == before
    record = next(
        r
        for r in json.loads(before)
        if (r["model"], r["seed"], r["dataset"], r["horizon"]) == ("student", 1, "ETTh1", 96)
    )
    assert verify_export(out) == []
    store = FilesystemStore(out)
    student = store.manifest(*store.resolve("etth1-h96@production"))
    group = store.manifest(*store.resolve("etth1-h96-ensemble@production"))
    assert student.kind == "student" and group.kind == "ensemble"
    assert student.metrics["test_mse"] == pytest.approx(record["mse"], abs=1e-5)
    assert student.metrics["val_mse"] == pytest.approx(record["val_mse"], abs=1e-5)
    assert student.lookback == record["lookback"] and group.ref in student.teachers
    lineage = student.lineage
    assert lineage is not None and lineage.seed == 1 and lineage.git_commit
    assert lineage.data_file == "ETTh1.csv" and len(lineage.data_sha256 or "") == 64
    assert lineage.run_dir == record["run"] and lineage.distill["teachers"] == record["teachers"]
    members = [store.manifest(r.name, r.version) for r in group.members]
    assert sorted(m.lineage.run_dir for m in members if m.lineage) == sorted(record["teachers"])
    assert all(m.lineage and m.lineage.seed == 1 for m in members)
    assert {r for r in student.teachers if r != group.ref} == set(group.members)


def test_redo_missing_weights_retrains_the_teacher_and_forgets_what_learned_from_it(
    queue: tuple[Path, Path, list[str]], students: tuple[Path, list[str]]
) -> None:
    # Runs last in this module: it retrains seed 1's pretrained teacher under the fixtures.
    work, results, _ = queue
    records = json.loads((results / "teachers.json").read_text())
    teacher = next(
        r for r in records if (r["model"], r["init"], r["seed"]) == ("himtm", "pretrained", 1)
    )
    old_ensemble = next(r for r in records if (r["model"], r["seed"]) == ("ensemble", 1))
    run = REPO / teacher["run"]
    (run / "best.safetensors").unlink()  # trained elsewhere: the weights never came back
    student_rows = json.loads((results / "students.json").read_text())
    learned = [
        r for r in student_rows if r["seed"] == 1 and teacher["run"] in (r.get("teachers") or ())
    ]
    assert {r["model"] for r in learned} >= {"student", "ensemble"}
    argv = [
        "run", "--smoke", "--redo-missing-weights", "--methods", "himtm", "--datasets", "ETTh1",
        "--horizons", "96", "--seeds", "1", "--inits", "pretrained", "--work", str(work),
        "--results", str(results), "--data-dir", str(REPO / "data"), "--no-progress",
        "--threads", "1", "--stages", "finetune,ensemble",
    ]  # fmt: skip
    assert bench.main(argv) == 0
    assert (run / "best.safetensors").exists()  # trained again, in the same folder
    after = json.loads((results / "teachers.json").read_text())
    assert len(after) == len(records)  # the teacher and its ensemble replaced, nothing else
    assert (
        next(r for r in after if (r["model"], r["seed"]) == ("ensemble", 1))["members"]
        == (old_ensemble["members"])
    )
    rows = json.loads((results / "students.json").read_text())
    assert not [r for r in rows if r["seed"] == 1 and teacher["run"] in (r.get("teachers") or ())]
    assert len(rows) == len(student_rows) - len(learned)  # seed 0's rows are kept
    for r in learned:
        if r.get("run"):
            assert not (REPO / r["run"]).exists()  # a resumed run would bring the old one back
