"""Distillation recipes for ``bench/accuracy.py`` (TimeDistill students and the teacher ensemble).

    python bench/accuracy.py --models mlp,student-simmtm,student-himtm,student-dmae,\\
        student-ensemble --datasets ETTh1,ETTh2 --horizons 96,336 --lookback 720

Record names: ``student-<teacher>`` (one teacher), ``student-ensemble`` (the served ensemble,
``ENSEMBLE`` below) and its ablations ``student-ensemble-no-features`` / ``-no-period`` /
``-no-scale``. ``mlp`` at the student's lookback is the plain supervised recipe of ``accuracy.py``;
the teachers and their ``ensemble`` are recorded by ``accuracy_teachers.py``.
Teachers are the run folders ``<runs>/<dataset>-<teacher>-L336-H<h>`` (``--runs``, default
``runs/bench``); students go to ``<runs>/<dataset>-<record>-L<lookback>-H<h>``. Each record names
its teachers and their lookback. ``DISTILCAST_BENCH_ENSEMBLE=a,b`` changes the ensemble's members
(e.g. ``patchtst`` while the pretrained teachers are not trained yet).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from runargs import train_overrides

from training.distill import DistillConfig, build_distill_config, run_distill

OURS = Path(__file__).resolve().parents[1] / "training" / "configs" / "distill-ours.toml"
"""Our form of the objective and student: these figures were measured with it."""

Recipe = Callable[[argparse.Namespace, str, int], dict[str, Any]]

ENSEMBLE = ("simmtm", "himtm", "dmae")
SINGLE = ("simmtm", "himtm", "dmae", "patchtst")
ABLATIONS: dict[str, dict[str, bool]] = {
    "": {},
    "-no-features": {"feature_terms": False},
    "-no-period": {"period": False},
    "-no-scale": {"scale": False},
}


def ensemble_members() -> tuple[str, ...]:
    env = os.environ.get("DISTILCAST_BENCH_ENSEMBLE", "")
    return tuple(n.strip() for n in env.split(",") if n.strip()) or ENSEMBLE


def distilled(teachers: tuple[str, ...] | None, flags: dict[str, bool]) -> Recipe:
    """Distil a student (``teachers=None``: the ensemble's members) and score it on test."""

    def run(args: argparse.Namespace, dataset: str, horizon: int) -> dict[str, Any]:
        names = teachers or ensemble_members()
        name = DistillConfig(teachers=names, **flags).student_name(names)
        train = train_overrides(args)
        cfg = build_distill_config(
            OURS,
            data={"dataset": dataset, "lookback": args.lookback, "horizon": horizon},
            train=train,
            distill={"teachers": names, "teacher_dir": str(args.runs), **flags},
            out_dir=str(args.runs / f"{dataset}-{name}-L{args.lookback}-H{horizon}"),
        )
        t0 = time.perf_counter()
        result = run_distill(cfg)
        return {
            **result.fit.test_record(),
            "params": result.params,
            "train_seconds": round(result.fit.train_seconds, 1),
            "teacher_seconds": round(result.teacher_seconds, 1),  # 0 when memoised
            "wall_seconds": round(time.perf_counter() - t0, 1),
            "epochs": result.fit.epochs_run,
            "best_epoch": result.fit.best_epoch,
            "alpha": result.alpha,
            "beta": result.beta,
            "weighting": cfg.distill.weighting,
            "teachers": [
                {"name": t["name"], "lookback": t["lookback"], "test_mse": t.get("test_mse")}
                for t in result.teachers
            ],
            "teacher_target_mse": round(result.target["test"]["mse"], 5) if result.target else None,
            # Both ensemble weightings on val (what chooses between them) and test.
            "ensemble_mse": {
                w: {s: round(e[s]["mse"], 5) for s in ("val", "test")}
                for w, e in result.scores["ensemble"].items()
            }
            if result.scores and len(result.teachers) > 1
            else None,
        }

    return run


RECIPES: dict[str, Recipe] = {
    **{f"student-{t}": distilled((t,), {}) for t in SINGLE},
    **{f"student-ensemble{suffix}": distilled(None, flags) for suffix, flags in ABLATIONS.items()},
}


def markdown_notes(records: list[dict[str, Any]]) -> list[str]:
    """A table in ``accuracy.md``: what each student was distilled from, beside its target."""
    rows = [r for r in records if str(r.get("model", "")).startswith("student-")]
    if not rows:
        return []
    lines = [
        "",
        "## Distilled students: teachers and target",
        "",
        "Target = the test MSE of what the student was taught to match (the teacher, or the "
        "ensemble's forecast as weighted).",
        "",
        "| dataset | H | student | L | teachers (lookback) | alpha | beta | target MSE | MSE |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        teachers = ", ".join(f"{t['name']} ({t['lookback']})" for t in r.get("teachers", []))
        target = r.get("teacher_target_mse")
        lines.append(
            f"| {r['dataset']} | {r['horizon']} | {r['model']} | {r['lookback']} | {teachers} | "
            f"{r.get('alpha', '')} | {r.get('beta', '')} | "
            f"{'' if target is None else f'{target:.4f}'} | {r['mse']:.4f} |"
        )
    return lines
