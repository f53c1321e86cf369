"""Students against every peer a user could pick instead, per cell and seed, one run each.

The student is the MLP distilled (TimeDistill) from its cell's teacher ensemble: the three
pretrained, fine-tuned teachers of the same seed that ``bench/teachers.py`` trained and combined
(``model == "ensemble"`` records in ``bench/results/teachers.json``: their members and the
weighting validation preferred). Cells: ETTh1 and ETTh2 x H 96/192/336/720, seeds 0-2.
Stages, in priority order:

* ``choose``: on seed 0 of each cell, the student's lookback (336 or 720) by validation MSE; on
  ETTh1-96 also the objective's form, ours (``training/configs/distill-ours.toml``) or the
  authors' (``distill.toml``, the default since validation chose it: per-channel BatchNorm,
  mean-reduced period KL, unnormalised rFFT, their optimiser schedule), each at both lookbacks.
  Validation-only records go to ``bench/results/student_choices.json``; every later run uses the
  choice, and the seed-0 run of the choice is the seed-0 student (the same folder). Then, at
  the chosen lookback, the student's budget: the form's own (``default``) or a ``--variants``
  variant (``VARIANTS``: dropout 0.3, or a 128-unit hidden layer instead of 512), whichever has
  the lowest validation MSE on seed 0; the default's reference is the seed-0 student distilled
  from the current teachers. With
  ``--all-forms`` the stage runs every ``--forms`` form in every cell too, for the record (a
  cell's form still follows ETTh1-96's choice);
* ``student``: the chosen student per cell and seed (a run already recorded, e.g. by
  ``bench/student_tuning.py``, is taken back rather than retrained; a record the choice displaces
  moves to ``student_tuning.json``);
* ``ensemble``: the teacher ensemble's own record, copied from ``teachers.json`` (lookback 336);
* ``mlp``: the plain ``mlp`` (no teacher, ``training/configs/mlp.toml``) at the student's lookback;
* ``peers``: neuralforecast's DLinear and PatchTST, run here on the same split at lookback 336,
  every test window (``bench/peers.py``; needs the ``peers`` extra);
* ``ablation``: on ETTh1-96 and ETTh1-336, at the form's own budget, the student without its
  feature terms, without the period terms, without the multi-scale terms, and with the authors'
  loss form (period KL mean-reduced over (row, frequency) and the unnormalised rFFT) on our
  student and schedule (``distill-ours.toml`` with their loss: the full student, in the
  authors' form, has it already).

Each finished run appends one record to ``bench/results/students.json``:
``{"dataset","horizon","lookback","model","seed","mse","mae","params","train_seconds"}`` plus its
validation MSE, epochs, budget and run folder; ``report`` writes ``bench/results/students.md``
(mean +- std per cell beside the published PatchTST/64 and DLinear figures). A session::

    python bench/students.py run --time-limit 9000
    python bench/students.py run --stages peers --datasets ETTh1 --horizons 96
    python bench/students.py report
    python bench/students.py status     # seeds recorded per cell; cells waiting on teachers

Runs resume from their folder (``--work``, default ``runs/students``); a run with a record is
skipped; ``--time-limit`` stops between epochs, and the next invocation continues.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.teachers import (  # noqa: E402
    DATA_DIR,
    RESULTS,
    SMOKE_TRAIN,
    Budget,
    Cell,
    Task,
    load_records,
    mean_std,
)
from bench.teachers import RECORDS as TEACHER_RECORDS  # noqa: E402
from bench.teachers import save_record as save_keyed  # noqa: E402
from training.config import build_run_config, default_config_path  # noqa: E402
from training.distill import build_distill_config, run_distill  # noqa: E402
from training.loop import resolve_device  # noqa: E402
from training.train import run_train  # noqa: E402

log = logging.getLogger("bench.students")
WORK = REPO / "runs" / "students"
RECORDS = "students.json"
CHOICES = "student_choices.json"
DATASETS = ("ETTh1", "ETTh2")
HORIZONS = (96, 192, 336, 720)
SEEDS = (0, 1, 2)
LOOKBACKS = (336, 720)  # the student's candidates
PEER_LOOKBACK = 336
FORMS = {"ours": "distill-ours", "authors": "distill"}  # TOML in training/configs
FORM_CELL = Cell("ETTh1", 96)  # where the objective's form is chosen (seed 0, validation)
ABLATION_CELLS = (Cell("ETTh1", 96), Cell("ETTh1", 336))
ABLATIONS: dict[str, dict[str, Any]] = {
    "student-no-features": {"feature_terms": False},
    "student-no-period": {"period": False},
    "student-no-scale": {"scale": False},
    "student-authors-loss": {"kl_reduction": "mean", "fft_norm": "backward"},
}
# The ablations distil the chosen form without one part, except the authors' loss: it swaps our
# form's loss for theirs (on our student and schedule), so it starts from our form whichever
# form was chosen (when the authors' form is chosen, the full student already has their loss).
ABLATION_BASE = {"student-authors-loss": "ours"}
# Budget variants of the student: one setting moved from the form's TOML. The choose stage weighs
# CHOICE_VARIANTS against the form's own budget ("default") per cell, on validation (seed 0, at
# the chosen form and lookback), and the student stage trains the winner; the others are tried
# by bench/student_tuning.py (its records: student_tuning.json, with the default runs a new
# choice displaced).
DEFAULT_VARIANT = "default"
VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    "dropout0.3": {"model": {"dropout": 0.3}},
    "lr1e-3": {"train": {"lr": 0.001}},
    "hidden128": {"model": {"hidden": 128}},
}
CHOICE_VARIANTS = ("dropout0.3", "hidden128")
TUNING = "student_tuning.json"
PEER_NAMES = ("nf-dlinear", "nf-patchtst")
RECORD_FIELDS = (
    "dataset",
    "horizon",
    "lookback",
    "model",
    "seed",
    "mse",
    "mae",
    "params",
    "train_seconds",
)
STAGES = ("choose", "student", "ensemble", "mlp", "peers", "ablation")


# --------------------------------------------------------------------------- records


def record_key(r: dict[str, Any]) -> tuple[Any, ...]:
    return (r["dataset"], r["horizon"], r["model"], r["seed"], r["lookback"], r.get("form", ""))


def variant_of(r: dict[str, Any]) -> str:
    """A student record's budget variant (records from before variants: the default)."""
    return str(r.get("variant", DEFAULT_VARIANT))


def choice_key(r: dict[str, Any]) -> tuple[Any, ...]:
    return (*record_key(r), variant_of(r))


def tuning_key(r: dict[str, Any]) -> tuple[Any, ...]:
    return (r["dataset"], r["horizon"], variant_of(r), r["seed"])


def save_record(path: Path, record: dict[str, Any]) -> None:
    """Append ``record`` (replacing one with the same key), atomically, under the records
    file's lock (``bench.teachers.save_record`` with this file's key)."""
    save_keyed(path, record, key=record_key)


def find(path: Path, **key: Any) -> list[dict[str, Any]]:
    return [r for r in load_records(path) if all(r.get(k) == v for k, v in key.items())]


def chosen_form(a: argparse.Namespace) -> str | None:
    """The objective's form of lowest validation MSE on ``FORM_CELL`` (any lookback)."""
    runs = find(a.results / CHOICES, dataset=FORM_CELL.dataset, horizon=FORM_CELL.horizon, seed=0)
    got = {
        (r["form"], r["lookback"]): r["val_mse"] for r in runs if variant_of(r) == DEFAULT_VARIANT
    }
    if any((f, lb) not in got for f in a.forms for lb in a.lookbacks):
        return None
    best: str = min(got, key=got.__getitem__)[0]
    return best


def chosen_lookback(a: argparse.Namespace, c: Cell) -> int | None:
    form = chosen_form(a)
    if form is None:
        return None
    runs = find(a.results / CHOICES, dataset=c.dataset, horizon=c.horizon, seed=0, form=form)
    got = {r["lookback"]: r["val_mse"] for r in runs if variant_of(r) == DEFAULT_VARIANT}
    if set(got) != set(a.lookbacks):
        return None
    best: int = min(got, key=got.__getitem__)
    return best


def chosen_variant(a: argparse.Namespace, c: Cell) -> str | None:
    """The cell's budget: the form's own or one of ``a.variants``, whichever has the lowest
    validation MSE at the chosen form and lookback (seed 0); None until each is recorded."""
    form, lookback = chosen_form(a), chosen_lookback(a, c)
    if form is None or lookback is None:
        return None
    runs = find(
        a.results / CHOICES, dataset=c.dataset, horizon=c.horizon, seed=0, form=form,
        lookback=lookback,
    )  # fmt: skip
    got = {variant_of(r): r["val_mse"] for r in runs}
    # The default's reference is its seed-0 student where one is recorded: trained on the
    # teachers and the device the variants train on (a lookback choice may predate a teacher
    # retrain, or have run on a GPU, where the same seed gives another run).
    base = _recorded(a, c, 0, lookback, form, DEFAULT_VARIANT)
    if base is not None:
        got[DEFAULT_VARIANT] = base["val_mse"]
    wanted = {DEFAULT_VARIANT, *a.variants}
    if not wanted <= set(got):
        return None
    best: str = min(wanted, key=got.__getitem__)
    return best


def _recorded(
    a: argparse.Namespace, c: Cell, seed: int, lookback: int, form: str, variant: str
) -> dict[str, Any] | None:
    """A finished student run of this cell, seed, lookback, form and budget variant, distilled
    from the seed's current ensemble members: its ``students.json`` or ``student_tuning.json``
    record (the tuning bench and displaced choices keep theirs there), as a ``student`` row."""
    ens = ensemble_of(a, c, seed)
    if ens is None:
        return None
    members = [_rel(Path(_path(m))) for m in ens["members"]]
    key = {"dataset": c.dataset, "horizon": c.horizon, "seed": seed, "lookback": lookback}
    for path in (a.results / RECORDS, a.results / TUNING):
        for r in find(path, **key, form=form):
            if (
                r["model"] in ("student", f"student-{variant}")
                and variant_of(r) == variant
                and r.get("teachers") == members
            ):
                return {**r, "model": "student", "variant": variant}
    return None


def ensemble_of(a: argparse.Namespace, c: Cell, seed: int) -> dict[str, Any] | None:
    """The cell's teacher-ensemble record of this seed (members, weighting), if trained."""
    runs = find(
        a.teacher_results, dataset=c.dataset, horizon=c.horizon, model="ensemble", seed=seed
    )
    return runs[0] if runs else None


def _path(p: str) -> str:
    return p if Path(p).is_absolute() else str(REPO / p)


def _rel(p: Path) -> str:
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p)


# --------------------------------------------------------------------------- runs


def _data(a: argparse.Namespace, c: Cell, lookback: int) -> dict[str, Any]:
    return {
        "dataset": c.dataset,
        "data_dir": str(a.data_dir),
        "lookback": lookback,
        "horizon": c.horizon,
    }


def _train(a: argparse.Namespace, budget: Budget, seed: int) -> dict[str, Any]:
    return {
        "threads": a.threads,
        "device": a.device,
        "progress": not a.no_progress,
        "seed": seed,
        "time_limit_s": budget.left(),
        **(SMOKE_TRAIN if a.smoke else {}),
    }


def _budget(train: Any) -> dict[str, Any]:
    keys = ("epochs", "patience", "batch_size", "lr", "lr_schedule", "max_train_batches")
    return {k: getattr(train, k) for k in keys}


def distill_one(
    a: argparse.Namespace,
    budget: Budget,
    c: Cell,
    seed: int,
    lookback: int,
    form: str,
    model: str = "student",
    variant: str = DEFAULT_VARIANT,
) -> dict[str, Any] | None:
    """Distil one student from the cell's ensemble of ``seed``; its record (None: stopped).

    ``variant``: a key of ``VARIANTS`` (settings on top of the form's TOML, by table) or the
    default; a variant's run has its own folder (``...-student-dropout0.3-...``), shared by the
    choose stage, the student stage and ``bench/student_tuning.py``.
    """
    more = {} if variant == DEFAULT_VARIANT else VARIANTS[variant]
    ens = ensemble_of(a, c, seed)
    if ens is None:
        raise RuntimeError(f"no teacher ensemble for {c.dataset}-{c.horizon} seed {seed}")
    tag = model if variant == DEFAULT_VARIANT else f"{model}-{variant}"
    out = a.work / f"{c.dataset}-H{c.horizon}-L{lookback}-{tag}-{form}-s{seed}"
    cfg = build_distill_config(
        default_config_path(FORMS[form]),
        data=_data(a, c, lookback),
        train={**_train(a, budget, seed), **more.get("train", {})},
        distill={
            "teachers": tuple(_path(m) for m in ens["members"]),
            "weighting": ens["weighting"],
            **ABLATIONS.get(model, {}),
            **more.get("distill", {}),
        },
        model_settings=more.get("model"),
        out_dir=str(out),
        resume=True,
    )
    res = run_distill(cfg)
    fit = res.fit
    if not fit.finished:
        return None
    return {
        "dataset": c.dataset,
        "horizon": c.horizon,
        "lookback": lookback,
        "model": model,
        "seed": seed,
        "mse": round(fit.test["mse"], 5),
        "mae": round(fit.test["mae"], 5),
        "params": res.params,
        "train_seconds": round(fit.train_seconds + res.teacher_seconds, 1),
        "teacher_seconds": round(res.teacher_seconds, 1),
        "val_mse": round(fit.val["mse"], 5),
        "epochs": fit.epochs_run,
        "best_epoch": fit.best_epoch,
        "form": form,
        "alpha": res.alpha,
        "beta": res.beta,
        "weighting": res.weighting,
        "device": resolve_device(a.device).type,
        "teachers": [_rel(Path(_path(m))) for m in ens["members"]],
        "budget": {"train": _budget(cfg.run.train), "distill": _distill_budget(cfg.distill)},
        "variant": variant,
        **({"overrides": more} if more else {}),
        "run": _rel(out),
    }


def _distill_budget(d: Any) -> dict[str, Any]:
    keys = (
        "temperature",
        "scales",
        "pool_kernel",
        "feature_terms",
        "period",
        "scale",
        "fft_norm",
        "feature_norm",
        "kl_reduction",
    )
    return {k: getattr(d, k) for k in keys}


def mlp_one(
    a: argparse.Namespace, budget: Budget, c: Cell, seed: int, lookback: int
) -> dict[str, Any] | None:
    out = a.work / f"{c.dataset}-H{c.horizon}-L{lookback}-mlp-s{seed}"
    run = build_run_config(
        "mlp", None, _data(a, c, lookback), _train(a, budget, seed), out_dir=str(out)
    )
    fit = run_train(run, resume=True)
    if not fit.finished:
        return None
    info = json.loads((out / "run.json").read_text())
    return {
        "dataset": c.dataset,
        "horizon": c.horizon,
        "lookback": lookback,
        "model": "mlp",
        "seed": seed,
        "mse": round(fit.test["mse"], 5),
        "mae": round(fit.test["mae"], 5),
        "params": info["params"],
        "train_seconds": round(fit.train_seconds, 1),
        "val_mse": round(fit.val["mse"], 5),
        "epochs": fit.epochs_run,
        "best_epoch": fit.best_epoch,
        "device": resolve_device(a.device).type,
        "budget": {"train": _budget(run.train)},
        "run": _rel(out),
    }


def ensemble_record(a: argparse.Namespace, c: Cell, seed: int) -> dict[str, Any]:
    """The teacher ensemble as a peer of the student: ``teachers.json``'s record, with the
    members' parameters and fine-tuning seconds summed (their pretraining is shared by the
    cells and listed apart)."""
    from safetensors import safe_open

    ens = ensemble_of(a, c, seed)
    assert ens is not None
    members = [
        r
        for r in load_records(a.teacher_results)
        if r.get("run") in ens["members"] and r["seed"] == seed
    ]
    params = 0
    for m in ens["members"]:
        with safe_open(str(Path(_path(m)) / "best.safetensors"), "pt") as f:
            params += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118
    return {
        "dataset": c.dataset,
        "horizon": c.horizon,
        "lookback": ens["lookback"],
        "model": "ensemble",
        "seed": seed,
        "mse": ens["mse"],
        "mae": ens["mae"],
        "params": params,
        "train_seconds": round(sum(r["finetune_seconds"] for r in members), 1),
        "pretrain_seconds": round(sum(r.get("pretrain_seconds") or 0 for r in members), 1),
        "val_mse": ens["val_mse"],
        "weighting": ens["weighting"],
        "teachers": ens["members"],
    }


def peer_one(
    a: argparse.Namespace, budget: Budget, c: Cell, seed: int, name: str
) -> dict[str, Any] | None:
    from bench.peers import run_peer
    from training.data import prepare

    data = prepare(build_run_config("mlp", None, _data(a, c, PEER_LOOKBACK)).data)
    res = run_peer(name, data, seed, a.threads, time_left=budget.left, smoke=a.smoke)
    if not res.finished:
        return None  # neuralforecast cannot resume: the next invocation starts it over
    return {
        "dataset": c.dataset,
        "horizon": c.horizon,
        "lookback": PEER_LOOKBACK,
        "model": name,
        "seed": seed,
        "mse": round(res.test["mse"], 5),
        "mae": round(res.test["mae"], 5),
        "params": res.params,
        "train_seconds": round(res.train_seconds, 1),
        "val_mse": round(res.val_mse, 5),
        "epochs": res.epochs_run,
        "best_epoch": res.best_epoch,
        "budget": res.budget,
    }


# --------------------------------------------------------------------------- the queue


def cells(a: argparse.Namespace) -> list[Cell]:
    return [Cell(d, h) for h in a.horizons for d in a.datasets]


def _done(a: argparse.Namespace, **key: Any) -> bool:
    return bool(find(a.results / RECORDS, **key))


def _record(a: argparse.Namespace, record: dict[str, Any] | None) -> bool:
    if record is None:
        return False
    save_record(a.results / RECORDS, record)
    log.info("record: %s", json.dumps({k: record.get(k) for k in RECORD_FIELDS}))
    return True


def _has_student(a: argparse.Namespace, c: Cell, seed: int, variant: str) -> bool:
    """Whether ``students.json`` holds the cell's student of ``seed`` in budget ``variant``."""
    got = find(
        a.results / RECORDS, dataset=c.dataset, horizon=c.horizon, seed=seed, model="student"
    )
    return any(variant_of(r) == variant for r in got)


def _student(a: argparse.Namespace, record: dict[str, Any] | None) -> bool:
    """Record a student run; a record of the same run key in another budget variant (the cell's
    choice changed) is kept in ``student_tuning.json`` before it is replaced."""
    if record is None:
        return False
    for old in find(a.results / RECORDS, **{k: record[k] for k in ("dataset", "horizon", "model",
                    "seed", "lookback", "form")}):  # fmt: skip
        if variant_of(old) != variant_of(record):
            save_keyed(a.results / TUNING, {**old, "variant": variant_of(old)}, key=tuning_key)
    return _record(a, record)


def _choice(
    a: argparse.Namespace,
    budget: Budget,
    c: Cell,
    lookback: int,
    form: str,
    variant: str = DEFAULT_VARIANT,
) -> bool:
    record = _recorded(a, c, 0, lookback, form, variant) or distill_one(
        a, budget, c, 0, lookback, form, variant=variant
    )
    if record is None:
        return False
    keep = ("dataset", "horizon", "lookback", "seed", "form", "val_mse", "epochs", "best_epoch")
    choice = {**{k: record[k] for k in keep}, "model": "student", "variant": variant}
    save_keyed(a.results / CHOICES, choice, key=choice_key)
    return True


def tasks(a: argparse.Namespace, budget: Budget) -> Iterator[Task]:  # noqa: C901
    """Every missing run whose prerequisites are met, stage by stage in ``a.stages`` order."""
    form = chosen_form(a)
    for stage in a.stages:
        for c in cells(a) if stage != "ablation" else [x for x in ABLATION_CELLS if x in cells(a)]:
            if stage == "choose":
                every = c == FORM_CELL or a.all_forms
                forms = a.forms if every else ((form,) if form else ())
                for f in forms:
                    if ensemble_of(a, c, 0) is None:
                        continue
                    for lb in a.lookbacks:
                        key = {"dataset": c.dataset, "horizon": c.horizon, "seed": 0}
                        got = find(a.results / CHOICES, **key, lookback=lb, form=f)
                        if not any(variant_of(r) == DEFAULT_VARIANT for r in got):
                            yield Task(
                                stage,
                                f"{c.dataset}-{c.horizon} L{lb} {f}",
                                lambda c=c, lb=lb, f=f: _choice(a, budget, c, lb, f),
                            )
                lookback = chosen_lookback(a, c)  # then the budget, at the chosen lookback
                if form is None or lookback is None or ensemble_of(a, c, 0) is None:
                    continue
                key = {"dataset": c.dataset, "horizon": c.horizon, "seed": 0, "form": form}
                done = {variant_of(r) for r in find(a.results / CHOICES, **key, lookback=lookback)}
                for v in a.variants:
                    if v not in done:
                        yield Task(
                            stage,
                            f"{c.dataset}-{c.horizon} L{lookback} {form} {v}",
                            lambda c=c, lb=lookback, v=v: _choice(a, budget, c, lb, form, v),
                        )
                continue
            lookback = chosen_lookback(a, c)
            for seed in a.seeds:
                key = {"dataset": c.dataset, "horizon": c.horizon, "seed": seed}
                if stage == "student":
                    variant = chosen_variant(a, c)
                    if variant is None or lookback is None or form is None:
                        continue
                    if ensemble_of(a, c, seed) is None:
                        continue
                    if not _has_student(a, c, seed, variant):
                        yield Task(
                            stage,
                            f"student {c.dataset}-{c.horizon} s{seed}"
                            + ("" if variant == DEFAULT_VARIANT else f" {variant}"),
                            lambda c=c, s=seed, lb=lookback, v=variant: _student(
                                a,
                                _recorded(a, c, s, lb, form, v)  # run already: no retraining
                                or distill_one(a, budget, c, s, lb, form, "student", v),
                            ),
                        )
                elif stage == "ablation":  # at the form's own budget
                    if lookback is None or form is None or ensemble_of(a, c, seed) is None:
                        continue
                    for m in a.ablations:
                        if not _done(a, **key, model=m):
                            yield Task(
                                stage,
                                f"{m} {c.dataset}-{c.horizon} s{seed}",
                                lambda c=c, s=seed, lb=lookback, m=m: _record(
                                    a,
                                    distill_one(a, budget, c, s, lb, ABLATION_BASE.get(m, form), m),
                                ),
                            )
                elif stage == "ensemble":
                    if ensemble_of(a, c, seed) is not None and not _done(
                        a, **key, model="ensemble"
                    ):
                        yield Task(
                            stage,
                            f"ensemble {c.dataset}-{c.horizon} s{seed}",
                            lambda c=c, s=seed: _record(a, ensemble_record(a, c, s)),
                        )
                elif stage == "mlp":
                    if lookback is not None and not _done(a, **key, model="mlp"):
                        yield Task(
                            stage,
                            f"mlp {c.dataset}-{c.horizon} L{lookback} s{seed}",
                            lambda c=c, s=seed, lb=lookback: _record(
                                a, mlp_one(a, budget, c, s, lb)
                            ),
                        )
                elif stage == "peers":
                    for name in a.peers:
                        if not _done(a, **key, model=name):
                            yield Task(
                                stage,
                                f"{name} {c.dataset}-{c.horizon} s{seed}",
                                lambda c=c, s=seed, n=name: _record(
                                    a, peer_one(a, budget, c, s, n)
                                ),
                            )


def cmd_run(a: argparse.Namespace) -> int:
    budget = Budget(a.time_limit)
    a.results.mkdir(parents=True, exist_ok=True)
    done = 0
    while True:
        pending = next(tasks(a, budget), None)  # re-planned after each run: records unlock more
        if pending is None:
            log.info("nothing left to run for stages %s (%d runs done)", a.stages, done)
            return 0
        if budget.spent():
            log.info("time limit reached; next would be %s %s", pending.stage, pending.label)
            return 0
        log.info("[%s] %s", pending.stage, pending.label)
        if not pending.run():
            log.info("time limit reached during %s %s", pending.stage, pending.label)
            return 0
        done += 1


# --------------------------------------------------------------------------- bundle

BUNDLE_DIR = REPO / "models_registry" / "bundled"
BUNDLE_DATA = REPO / "data"  # the copies shipped with the code: the manifests' data files


def bundle_family(a: argparse.Namespace, budget: Budget, c: Cell, registry: Path) -> str | None:
    """Register one cell's chain of ``a.seed`` in ``registry``: the ensemble's members (the
    bench's teacher checkpoints) as ``NAME-<method>``, their group ``NAME-ensemble`` and the
    student ``NAME`` (the ``student`` stage's run of that seed, trained here if its folder is not
    finished), all promoted to production. Returns the family's name (None: stopped early)."""
    from training.data import DataConfig, prepare
    from training.manifests import file_sha256
    from training.pipeline import Pipeline, PipelineConfig, Teacher, load_export, save_manifest

    form, lookback, ens = chosen_form(a), chosen_lookback(a, c), ensemble_of(a, c, a.seed)
    variant = chosen_variant(a, c)
    if form is None or lookback is None or variant is None or ens is None:
        raise RuntimeError(
            f"{c.dataset}-{c.horizon}: the student's choices and the seed-{a.seed} teacher "
            "ensemble must be recorded first (python bench/students.py status)"
        )
    record = distill_one(a, budget, c, a.seed, lookback, form, variant=variant)
    if record is None:
        return None
    if not _has_student(a, c, a.seed, variant):
        _student(a, record)
    student_dir = REPO / record["run"]
    data_cfg = {"dataset": c.dataset, "data_dir": str(a.bundle_data), "horizon": c.horizon}
    pipe = Pipeline(
        PipelineConfig(
            data={**data_cfg, "lookback": lookback},
            registry=str(registry),
            work_dir=str(a.work / "bundle" / c.dataset),
        )
    )
    trained_on = prepare(
        DataConfig(c.dataset, data_dir=str(a.data_dir), lookback=lookback, horizon=c.horizon)
    ).path
    data = prepare(pipe.data_cfg)
    if file_sha256(data.path) != file_sha256(trained_on):
        raise RuntimeError(f"{data.path} differs from {trained_on}, which the models trained on")
    teachers = []
    for member in ens["members"]:
        run_dir = Path(_path(member))
        arch = json.loads((run_dir / "run.json").read_text())["model"]
        teachers.append(Teacher(arch, run_dir, f"{pipe.name}-{arch}"))
    shutil.rmtree(pipe.work, ignore_errors=True)  # every export is made afresh
    pipe.export(data, teachers, student_dir)
    # The student's lineage names its teachers' folders relative to the repository.
    folder = pipe.work / "exports" / pipe.name
    manifest = load_export(folder)[0]
    assert manifest.lineage is not None
    distill = {**manifest.lineage.distill, "teachers": record["teachers"]}
    lineage = manifest.lineage.model_copy(update={"distill": distill})
    save_manifest(manifest.model_copy(update={"lineage": lineage}), folder)
    registered = pipe.register(data, teachers, student_dir)
    aliases = pipe.promote(registered["ensemble"], registered["student"])
    refused = {n: o["refused"] for n, o in aliases.items() if "refused" in o}
    if refused:
        raise RuntimeError(f"promotion refused: {refused}")
    return pipe.name


def cmd_bundle(a: argparse.Namespace) -> int:
    """``models_registry/bundled/``: each dataset's chain at ``--horizon`` and ``--seed``, built
    in a scratch registry, then exported (manifests, ONNX files, SHA256SUMS) over ``--out``."""
    from models_registry.bundle import export_models
    from models_registry.store import FilesystemStore

    budget = Budget(a.time_limit)
    with tempfile.TemporaryDirectory(prefix="distilcast-bundle.") as scratch:
        registry = Path(scratch) / "registry"
        names = []
        for dataset in a.datasets:
            log.info("[bundle] %s-%d seed %d", dataset, a.horizon, a.seed)
            name = bundle_family(a, budget, Cell(dataset, a.horizon), registry)
            if name is None:
                log.info("time limit reached: rerun to continue (the student run resumes)")
                return 3
            names.append(name)
        staged = Path(scratch) / "bundled"
        export_models(FilesystemStore(registry), names, staged)
        shutil.rmtree(a.out, ignore_errors=True)
        shutil.move(str(staged), a.out)
    total = sum(f.stat().st_size for f in Path(a.out).rglob("*") if f.is_file())
    log.info("bundle: %s -> %s (%.1f MB)", ", ".join(names), a.out, total / 1e6)
    return 0


# --------------------------------------------------------------------------- report

# Published test MSE per (dataset, horizon): PatchTST/64 (Nie et al., 2023, Table 3; L = 512) and
# DLinear (Zeng et al., 2023, Table 2; L = 336).
PUBLISHED = {
    "PatchTST/64 (published)": {
        ("ETTh1", 96): 0.370,
        ("ETTh1", 192): 0.413,
        ("ETTh1", 336): 0.422,
        ("ETTh1", 720): 0.447,
        ("ETTh2", 96): 0.274,
        ("ETTh2", 192): 0.341,
        ("ETTh2", 336): 0.329,
        ("ETTh2", 720): 0.379,
    },
    "DLinear (published)": {
        ("ETTh1", 96): 0.375,
        ("ETTh1", 192): 0.405,
        ("ETTh1", 336): 0.439,
        ("ETTh1", 720): 0.472,
        ("ETTh2", 96): 0.289,
        ("ETTh2", 192): 0.383,
        ("ETTh2", 336): 0.448,
        ("ETTh2", 720): 0.605,
    },
}
MAIN_ROWS = ("student", "ensemble", "mlp", *PEER_NAMES)


def _fmt(values: list[float]) -> str:
    if not values:
        return "-"
    m, sd = mean_std(values)
    return f"{m:.4f} ± {sd:.4f} ({len(values)})"


def _by(records: list[dict[str, Any]], c: Cell, model: str, field: str = "mse") -> list[float]:
    rows = [
        r
        for r in records
        if (r["dataset"], r["horizon"], r["model"]) == (c.dataset, c.horizon, model)
    ]
    return [float(r[field]) for r in sorted(rows, key=lambda r: r["seed"])]


def write_report(results: Path = RESULTS) -> int:
    records = load_records(results / RECORDS)
    choices = load_records(results / CHOICES)
    all_cells = [Cell(d, h) for d in DATASETS for h in HORIZONS]
    lines = [
        "# Students against their peers",
        "",
        "Reproduce: `python bench/students.py run` (after `python bench/teachers.py run` has the",
        'cells\' ensembles; the peers need `pip install -c requirements.lock -e ".[peers]"`), then',
        "`python bench/students.py report`. Test MSE (z-scored, every test window), mean ± sample",
        "std over seeds (count in brackets); the objective's form, the lookback and the budget",
        "variant chosen on validation (below). A difference smaller than the spread is not a win.",
        "",
        "| cell | " + " | ".join(MAIN_ROWS) + " | " + " | ".join(PUBLISHED) + " |",
        "|---|" + "---|" * (len(MAIN_ROWS) + len(PUBLISHED)),
    ]
    for c in all_cells:
        row = [_fmt(_by(records, c, m)) for m in MAIN_ROWS]
        pub = [f"{PUBLISHED[p][(c.dataset, c.horizon)]:.3f}" for p in PUBLISHED]
        lines.append(f"| {c.dataset}-{c.horizon} | " + " | ".join(row + pub) + " |")
    lines += ["", "## Student minus each peer, paired by seed (test MSE)", ""]
    lines += ["| cell | " + " | ".join(MAIN_ROWS[1:]) + " |", "|---|" + "---|" * 4]
    for c in all_cells:
        student = {r["seed"]: r["mse"] for r in records if _is(r, c, "student")}
        diffs = []
        for m in MAIN_ROWS[1:]:
            other = {r["seed"]: r["mse"] for r in records if _is(r, c, m)}
            d = [student[s] - other[s] for s in sorted(student) if s in other]
            diffs.append(
                "-" if not d else f"{mean_std(d)[0]:+.4f} ± {mean_std(d)[1]:.4f} ({len(d)})"
            )
        lines.append(f"| {c.dataset}-{c.horizon} | " + " | ".join(diffs) + " |")
    lines += ["", "## Ablations (test MSE)", ""]
    lines += [
        "At the form's own budget (variant `default`): the `student` column is that budget's "
        "student, from `student_tuning.json` where the cell's choice moved its rows there.",
        "",
    ]
    abl = ("student", *ABLATIONS)
    lines += ["| cell | " + " | ".join(abl) + " |", "|---|" + "---|" * len(abl)]
    default = {  # (dataset, horizon, seed) -> the default-budget student's record
        (r["dataset"], r["horizon"], r["seed"]): r
        for r in [*load_records(results / TUNING), *records]
        if r["model"] == "student" and variant_of(r) == DEFAULT_VARIANT
    }
    for c in ABLATION_CELLS:
        base = [r["mse"] for k, r in sorted(default.items()) if k[:2] == (c.dataset, c.horizon)]
        lines.append(
            f"| {c.dataset}-{c.horizon} | {_fmt(base)} | "
            + " | ".join(_fmt(_by(records, c, m)) for m in ABLATIONS)
            + " |"
        )
    lines += ["", "## Speed and size", ""]
    lines += [
        "Train seconds are per run and depend on where it ran (`cpu`: one or two cores of the "
        "2-core machine; `cuda`: one of 14 jobs sharing an H200; the ensemble's are its "
        "members' fine-tuning, their device in `teachers.json`).",
        "",
        "| cell | model | params | train seconds (mean) | trained on |",
        "|---|---|---|---|---|",
    ]
    for c in all_cells:
        for m in MAIN_ROWS:
            p = _by(records, c, m, "params")
            s = _by(records, c, m, "train_seconds")
            where = sorted(
                {
                    str(r.get("device", "cpu"))
                    for r in records
                    if (r["dataset"], r["horizon"], r["model"]) == (c.dataset, c.horizon, m)
                }
            )
            if p:
                lines.append(
                    f"| {c.dataset}-{c.horizon} | {m} | {int(p[0])} | {mean_std(s)[0]:.0f} | "
                    f"{', '.join(where) if m != 'ensemble' else 'see teachers.json'} |"
                )
    lines += ["", "## Choices (validation MSE, seed 0)", ""]
    lines += [
        "The form on ETTh1-96, then each cell's lookback in that form, then its budget variant "
        "at that lookback (`default`: the form's own). The budget is weighed against the seed-0 "
        "default student distilled from the current teachers (`bench/student_tuning.md`, "
        "column `val MSE (seed 0)`); where the teachers were retrained after the lookback "
        "choice, or the choice ran on a GPU, that run differs from the row below.",
        "",
        "| cell | form | lookback | variant | val MSE |",
        "|---|---|---|---|---|",
    ]
    order = sorted(
        choices,
        key=lambda r: (r["dataset"], r["horizon"], r["form"], r["lookback"], variant_of(r)),
    )
    for r in order:
        lines.append(
            f"| {r['dataset']}-{r['horizon']} | {r['form']} | {r['lookback']} "
            f"| {variant_of(r)} | {r['val_mse']:.4f} |"
        )
    (results / "students.md").write_text("\n".join(lines) + "\n")
    log.info("wrote %s", results / "students.md")
    return 0


def status(results: Path, teacher_results: Path) -> str:
    """Per cell: the seeds each model has a record for, and whether the cell's students can run
    (they need its teacher ensembles: `bench/teachers.py` records with model "ensemble")."""
    records = load_records(results / RECORDS)
    teachers = load_records(teacher_results)
    models = ("student", "ensemble", "mlp", *PEER_NAMES)
    lines = ["records (seeds done; students, ensembles and mlp need 3, peers 1):"]
    blocked: list[str] = []
    for c in (Cell(d, h) for h in HORIZONS for d in DATASETS):
        done = {m: sorted({r["seed"] for r in records if _is(r, c, m)}) for m in models}
        extra = ""
        if c in ABLATION_CELLS:
            extra = ", ablations " + "/".join(
                str(len({r["seed"] for r in records if _is(r, c, m)})) for m in ABLATIONS
            )
        lines.append(
            f"  {c.dataset}-{c.horizon}: "
            + ", ".join(f"{m} {len(seeds)}" for m, seeds in done.items())
            + extra
        )
        ensembles = sorted({r["seed"] for r in teachers if _is(r, c, "ensemble")})
        if len(ensembles) < len(SEEDS):
            hint = (
                ""
                if c.horizon in (96, 336)
                else f" (python bench/teachers.py run --horizons {c.horizon} --inits pretrained "
                "--stages finetune,ensemble)"
            )
            blocked.append(
                f"  {c.dataset}-{c.horizon}: teacher ensembles for seeds {ensembles} "
                f"of {list(SEEDS)}{hint}"
            )
    lines.append(
        "waiting on teachers (students, ensemble records):"
        if blocked
        else "every cell's teacher ensembles exist"
    )
    # A record whose members' weights are not on this machine (a run trained elsewhere whose
    # weights did not come back) cannot teach a student here.
    missing = sorted(
        {
            m
            for r in teachers
            if r.get("model") == "ensemble"
            for m in r.get("members", [])
            if not (Path(_path(m)) / "best.safetensors").exists()
        }
    )
    if missing:
        lines += [
            f"teacher weights missing here ({len(missing)}; their ensembles' students "
            "cannot run until they are retrained: python bench/teachers.py run "
            "--redo-missing-weights --inits pretrained --stages finetune,ensemble):"
        ]
        lines += [f"  {m}" for m in missing]
    return "\n".join(lines + blocked)


def _is(r: dict[str, Any], c: Cell, model: str) -> bool:
    return (r["dataset"], r["horizon"], r["model"]) == (c.dataset, c.horizon, model)


def add_distill_options(q: argparse.ArgumentParser) -> None:
    """The options every command that distils students takes: the choices' candidates, the
    data, where runs and records live, and the budget of one invocation (also
    ``bench/student_tuning.py``'s)."""
    q.add_argument(
        "--lookbacks", type=lambda t: tuple(int(x) for x in t.split(",")), default=LOOKBACKS
    )
    q.add_argument("--forms", type=lambda t: tuple(t.split(",")), default=tuple(FORMS))
    q.add_argument("--data-dir", type=Path, default=DATA_DIR, help="where the models train")
    q.add_argument("--work", type=Path, default=WORK)
    q.add_argument("--threads", type=int, default=2)
    q.add_argument(
        "--device",
        default="cpu",
        help="students and mlp: cpu, cuda, cuda:N or auto (each record says where it "
        "trained); the peers always train on the CPU",
    )
    q.add_argument("--time-limit", type=float, default=None, help="seconds for this invocation")
    q.add_argument("--no-progress", action="store_true")
    q.add_argument("--results", type=Path, default=RESULTS, help="where the records go")
    q.add_argument(
        "--teacher-results",
        type=Path,
        default=None,
        help=f"the teachers' records (default: RESULTS/{TEACHER_RECORDS})",
    )
    q.add_argument("--smoke", action="store_true", help="toy budgets (tests only)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    runp = sub.add_parser("run", help="every missing run of the given stages, in order")
    runp.add_argument("--stages", type=lambda t: tuple(t.split(",")), default=STAGES)
    runp.add_argument(
        "--horizons", type=lambda t: tuple(int(h) for h in t.split(",")), default=HORIZONS
    )
    runp.add_argument("--seeds", type=lambda t: tuple(int(s) for s in t.split(",")), default=SEEDS)
    runp.add_argument(
        "--all-forms",
        action="store_true",
        help="the choose stage runs every --forms form in every cell, not only on ETTh1-96 "
        "(validation records only; the form in use stays ETTh1-96's choice)",
    )
    runp.add_argument("--peers", type=lambda t: tuple(t.split(",")), default=PEER_NAMES)
    runp.add_argument(
        "--ablations",
        type=lambda t: tuple(t.split(",")),
        default=tuple(ABLATIONS),
        help="the ablation stage's variants (default: all)",
    )
    runp.set_defaults(handler=cmd_run)
    bun = sub.add_parser(
        "bundle",
        help="models_registry/bundled: each dataset's student and teacher ensemble (one seed)",
    )
    bun.add_argument("--horizon", type=int, default=96)
    bun.add_argument("--seed", type=int, default=0)
    bun.add_argument("--out", type=Path, default=BUNDLE_DIR, help="replaced by the export")
    bun.add_argument(
        "--bundle-data",
        type=Path,
        default=BUNDLE_DATA,
        help="the data the manifests name (same bytes as --data-dir's, checked)",
    )
    bun.set_defaults(handler=cmd_bundle)
    for q in (runp, bun):  # what both train from: the choices, the data, where runs live
        q.add_argument("--datasets", type=lambda t: tuple(t.split(",")), default=DATASETS)
        q.add_argument(
            "--variants",
            type=lambda t: tuple(v for v in t.split(",") if v),
            default=CHOICE_VARIANTS,
            help="budget variants the choose stage weighs against the form's own (validation, "
            f"seed 0; '' for none; default {','.join(CHOICE_VARIANTS)}; of {', '.join(VARIANTS)})",
        )
        add_distill_options(q)
    rep = sub.add_parser("report", help="bench/results/students.md")
    rep.add_argument("--results", type=Path, default=RESULTS)
    rep.set_defaults(handler=lambda a: write_report(a.results))
    st = sub.add_parser("status", help="what is recorded per cell, and what waits on teachers")
    st.add_argument("--results", type=Path, default=RESULTS)
    st.add_argument("--teacher-results", type=Path, default=None)
    st.set_defaults(
        handler=lambda a: (
            print(status(a.results, a.teacher_results or a.results / TEACHER_RECORDS)) or 0
        )
    )
    a = p.parse_args(argv)
    if a.command == "run":
        for stage in a.stages:
            if stage not in STAGES:
                p.error(f"--stages: unknown stage {stage!r}; choose from {', '.join(STAGES)}")
        for f in a.forms:
            if f not in FORMS:
                p.error(f"--forms: unknown form {f!r}; choose from {', '.join(FORMS)}")
        for n in a.peers:
            if n not in PEER_NAMES:
                p.error(f"--peers: unknown peer {n!r}; choose from {', '.join(PEER_NAMES)}")
        for n in a.ablations:
            if n not in ABLATIONS:
                p.error(f"--ablations: unknown variant {n!r}; choose from {', '.join(ABLATIONS)}")
    if a.command in ("run", "bundle"):
        for v in a.variants:
            if v not in VARIANTS:
                p.error(f"--variants: unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    if a.command in ("run", "bundle") and a.teacher_results is None:
        a.teacher_results = a.results / TEACHER_RECORDS
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return int(a.handler(a))


if __name__ == "__main__":
    sys.exit(main())
