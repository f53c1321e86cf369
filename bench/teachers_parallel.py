"""The teacher queue (``bench/teachers.py``) as many one-run jobs at once, for a machine with a GPU.

``bench/teachers.py run`` works through its queue one run after another, which suits two CPU
cores. On a machine with a GPU and many cores the runs are small enough (a few MB of weights,
batch 32) that one of them leaves the GPU mostly idle, so this driver starts up to ``--jobs``
invocations of ``bench/teachers.py run``, each narrowed by its filters to exactly one run (one
pretraining, one fine-tuning cell and seed, one PatchTST or one ensemble), and starts the next as
each ends. Dependencies are those of the queue: a pretrained fine-tuning waits for its method's
encoder on that dataset, an ensemble for the three pretrained teachers of its cell and seed.
Every run keeps the queue's own behaviour: resumable from ``last.pt``, one record appended (under
the records' file lock) when it finishes, ``device`` written into the record.

``--students 96,192,336,720`` adds ``bench/students.py``'s runs (the choices of the objective's
form and of each cell's lookback, the students, the plain MLPs and the ablations; not the peers,
which train on the CPU), re-planned as the teachers' ensembles and the choices land.

``--deadline`` (seconds) bounds the whole invocation: each job gets ``--time-limit`` so that it
stops between epochs before the deadline (resumable later, here or on the CPU), and whatever still
runs at the deadline is stopped; its last finished epoch is kept in ``last.pt``.

The exit status is 1 when a job crashed (not merely stopped at the deadline); the driver's log
names its log file under ``--logs``.

``--pack DIR`` then writes what a later session needs into at most eight files in ``DIR``: the
records and every touched run's ``run.json``/``pretrain.json`` in one archive, the weights in
archives of at most ``--part-mb`` each (pretrained teachers first, then the scratch twins and
PatchTST, then the resume state of unfinished runs), up to ``--pack-mb`` in all, and ``plan.json``
(what ran, how long, what was left out). Unpack with ``tar -xf`` in the repository root.

    python bench/teachers_parallel.py --device cuda --jobs 14 --deadline 480 --pack "$OUT"
    python bench/teachers_parallel.py --horizons 192,720 --inits pretrained \
        --stages finetune,ensemble --students 96,192,336,720 --device cuda
    python bench/teachers_parallel.py --dry-run          # the plan only
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import students as S  # noqa: E402
from bench import teachers as T  # noqa: E402

log = logging.getLogger("bench.teachers_parallel")


@dataclass
class Job:
    name: str
    stage: str
    args: list[str]  # the script's `run` filters narrowing it to this one run
    check: Callable[[], bool]  # did it finish its run (its record, or a finished encoder)?
    needs: list[str] = field(default_factory=list)  # names of jobs that must succeed first
    run_dir: str | None = None  # the run folder it writes (for packing)
    priority: int = 0  # lower starts first
    script: str = "teachers.py"  # or students.py
    proc: subprocess.Popen[bytes] | None = None
    started: float | None = None
    ended: float | None = None
    rc: int | None = None
    done: bool = False  # its record (or finished encoder) exists


def _filters(stage: str, dataset: str, horizon: int, seed: int, **more: str) -> list[str]:
    """The ``run`` flags narrowing a script's queue to one cell and seed of one stage."""
    flags = ["--stages", stage, "--datasets", dataset, "--horizons", str(horizon)]
    flags += ["--seeds", str(seed)]
    for name, value in more.items():
        flags += [f"--{name}", value]
    return flags


def _has_record(path: Path, key: dict[str, Any]) -> Callable[[], bool]:
    """A job's check: the record of ``key`` is in ``path`` (read when asked)."""
    return lambda: T.has_record(path, **key)


def plan(a: argparse.Namespace) -> list[Job]:
    """One job per missing run of the queue, with the queue's dependencies."""
    records_path = a.results / T.RECORDS
    records = T.load_records(records_path)
    protocols = a.results / T.PROTOCOL_RECORDS

    def have(key: dict[str, Any]) -> bool:
        return any(all(r.get(k) == v for k, v in key.items()) for r in records)

    jobs: list[Job] = []
    for dataset in a.datasets:
        for method in a.methods:
            if T.pretrain_meta(a.work, method, dataset) is None:
                jobs.append(
                    Job(
                        f"pretrain {method} {dataset}",
                        "pretrain",
                        ["--stages", "pretrain", "--methods", method, "--datasets", dataset],
                        check=lambda m=method, d=dataset: T.pretrain_meta(a.work, m, d) is not None,
                        run_dir=str(T.pretrain_dir(a.work, method, dataset)),
                        priority=0,
                    )
                )
    names = {j.name for j in jobs}
    for horizon in a.horizons:
        for dataset in a.datasets:
            c = T.Cell(dataset, horizon)
            for seed in a.seeds:
                cell = {"dataset": dataset, "horizon": horizon, "seed": seed}
                for method in a.methods if "finetune" in a.stages else ():
                    for init in a.inits:
                        protocol = T.chosen_protocol(init, method, protocols)
                        if protocol is None:
                            raise SystemExit(
                                f"{method} {init}: no fine-tuning protocol chosen yet (run "
                                "`python bench/teachers.py run --stages protocol` first)"
                            )
                        key = {**cell, "model": method, "init": init}
                        if have(key):
                            continue
                        pre = f"pretrain {method} {dataset}"
                        jobs.append(
                            Job(
                                f"finetune {method} {init} {dataset}-{horizon} s{seed}",
                                "finetune",
                                _filters("finetune", dataset, horizon, seed, methods=method,
                                         inits=init),  # fmt: skip
                                check=_has_record(records_path, key),
                                needs=[pre] if init == "pretrained" and pre in names else [],
                                run_dir=str(
                                    T.finetune_dir(a.work, c, method, init, protocol, seed)
                                ),
                                # pretrained first (the ensembles wait on them), then longer
                                # horizons first (they take longest)
                                priority=10 * (1 if init == "pretrained" else 2) - horizon // 100,
                            )
                        )
                key = {**cell, "model": "patchtst"}
                if "supervised" in a.stages and not have(key):
                    jobs.append(
                        Job(
                            f"patchtst {dataset}-{horizon} s{seed}",
                            "supervised",
                            _filters("supervised", dataset, horizon, seed),
                            check=_has_record(records_path, key),
                            run_dir=str(
                                a.work / f"{dataset}-patchtst-L{T.LOOKBACK}-H{horizon}-s{seed}"
                            ),
                            priority=30,
                        )
                    )
                key = {**cell, "model": "ensemble"}
                if "pretrained" in a.inits and not have(key):
                    members = [
                        f"finetune {m} pretrained {dataset}-{horizon} s{seed}" for m in a.methods
                    ]
                    jobs.append(
                        Job(
                            f"ensemble {dataset}-{horizon} s{seed}",
                            "ensemble",
                            _filters("ensemble", dataset, horizon, seed,
                                     methods=",".join(a.methods)),  # fmt: skip
                            check=_has_record(records_path, key),
                            needs=[m for m in members if m in {j.name for j in jobs}],
                            priority=5,  # minutes of scoring once its teachers exist
                        )
                    )
    return jobs


def student_jobs(a: argparse.Namespace) -> list[Job]:
    """The students' runs (``bench/students.py``) whose prerequisites are met now.

    Priorities interleave with the teachers' (lower first): the teachers a cell waits on and the
    choices come before the students, which come before the plain MLP and the ablations.
    Re-planned while the queue runs: the form is chosen on ETTh1-96 (seed 0) before any other
    cell's lookback is chosen, a cell's lookback (seed 0, validation) before its other seeds, its
    ``mlp`` and its ablations run, and each needs its teacher ensemble's record.
    """
    ns = argparse.Namespace(
        results=a.results,
        teacher_results=a.results / T.RECORDS,
        forms=tuple(S.FORMS),
        lookbacks=S.LOOKBACKS,
        variants=S.CHOICE_VARIANTS,
    )
    form = S.chosen_form(ns)
    students, choices = a.results / S.RECORDS, a.results / S.CHOICES
    jobs: list[Job] = []

    def job(name: str, stage: str, args: list[str], priority: int, **key: Any) -> None:
        path = choices if stage == "choose" else students
        variant = key.pop("variant", None)  # a record without one is the default budget's

        def done() -> bool:
            got = S.find(path, **key)
            return any(variant is None or S.variant_of(r) == variant for r in got)

        if done():
            return
        jobs.append(
            Job(name, stage, ["--stages", stage, *args], done, priority=priority,
                script="students.py")
        )  # fmt: skip

    for horizon in a.student_horizons:
        for dataset in a.datasets:
            c = T.Cell(dataset, horizon)
            where = ["--datasets", dataset, "--horizons", str(horizon)]
            cell = {"dataset": dataset, "horizon": horizon}
            if S.ensemble_of(ns, c, 0) is not None:
                forms = tuple(S.FORMS) if c == S.FORM_CELL else ((form,) if form else ())
                for f in forms:
                    for lb in S.LOOKBACKS:
                        job(f"choose {dataset}-{horizon} L{lb} {f}", "choose",
                            [*where, "--seeds", "0", "--lookbacks", str(lb), "--forms", f,
                             "--variants", ""],
                            5, **cell, seed=0, lookback=lb, form=f,
                            variant=S.DEFAULT_VARIANT)  # fmt: skip
            lookback = S.chosen_lookback(ns, c)
            if lookback is not None and form is not None:  # then the budget, at that lookback
                for v in S.CHOICE_VARIANTS:
                    job(f"choose {dataset}-{horizon} L{lookback} {form} {v}", "choose",
                        [*where, "--seeds", "0", "--forms", form, "--variants", v],
                        5, **cell, seed=0, lookback=lookback, form=form, variant=v)  # fmt: skip
            variant = S.chosen_variant(ns, c)
            for seed in a.seeds:
                ens = S.ensemble_of(ns, c, seed)
                one = [*where, "--seeds", str(seed)]
                if ens is not None:
                    job(f"ensemble-record {dataset}-{horizon} s{seed}", "ensemble", one, 0,
                        **cell, seed=seed, model="ensemble")  # fmt: skip
                if lookback is None or form is None:
                    continue
                job(f"mlp {dataset}-{horizon} s{seed}", "mlp", one, 22,
                    **cell, seed=seed, model="mlp")  # fmt: skip
                if ens is None:
                    continue
                if variant is not None:
                    job(f"student {dataset}-{horizon} s{seed}", "student", one, 12,
                        **cell, seed=seed, model="student", variant=variant)  # fmt: skip
                if c in S.ABLATION_CELLS:
                    for m in S.ABLATIONS:
                        job(f"{m} {dataset}-{horizon} s{seed}", "ablation",
                            [*one, "--ablations", m], 25, **cell, seed=seed, model=m)  # fmt: skip
    return jobs


def _command(a: argparse.Namespace, job: Job, time_left: float) -> list[str]:
    work = a.student_work if job.script == "students.py" else a.work
    return [
        sys.executable, str(REPO / "bench" / job.script), "run", *job.args,
        "--device", a.device, "--threads", str(a.threads), "--no-progress",
        "--time-limit", str(max(time_left, 1.0)),
        "--data-dir", str(a.data_dir), "--work", str(work), "--results", str(a.results),
        *(["--smoke"] if a.smoke else []),
    ]  # fmt: skip


def _log_name(job: Job) -> str:
    return job.name.replace(" ", "_") + ".log"


def execute(
    a: argparse.Namespace, jobs: list[Job], replan: Callable[[], list[Job]] | None = None
) -> None:
    """Run ``jobs`` (and whatever ``replan()`` adds as records unlock it) ``a.jobs`` at a time."""
    started = time.monotonic()
    logs = a.logs
    logs.mkdir(parents=True, exist_ok=True)
    by_name = {j.name: j for j in jobs}
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "PYTHONUNBUFFERED": "1"}

    def left() -> float:
        return a.deadline - (time.monotonic() - started)

    while True:
        running = [j for j in jobs if j.proc is not None and j.rc is None]
        for j in running:
            rc = j.proc.poll() if j.proc else None
            if rc is not None:
                j.rc, j.ended = rc, time.monotonic() - started
                j.done = rc == 0 and j.check()
                log.info(
                    "%s: %s after %.0f s (rc %d)",
                    j.name,
                    "done" if j.done else "stopped",
                    j.ended - (j.started or 0.0),
                    rc,
                )
        if replan is not None:
            for j in replan():
                if j.name not in by_name:  # a job runs once per invocation, finished or not
                    jobs.append(j)
                    by_name[j.name] = j
        running = [j for j in jobs if j.proc is not None and j.rc is None]
        waiting = [
            j
            for j in jobs
            if j.proc is None and all(by_name[n].done for n in j.needs if n in by_name)
        ]
        blocked = [
            j
            for j in jobs
            if j.proc is None
            and any(by_name[n].rc is not None and not by_name[n].done for n in j.needs)
        ]
        for j in blocked:  # a prerequisite ended without finishing: this one cannot run now
            j.rc = -1
            j.proc = None
        waiting = [j for j in waiting if j.rc is None]
        if left() <= a.margin:
            for j in running:
                if j.proc is not None:
                    j.proc.terminate()
            for j in running:
                if j.proc is not None:
                    try:
                        j.proc.wait(timeout=20)
                    except subprocess.TimeoutExpired:
                        j.proc.kill()
                    j.rc, j.ended = -15, time.monotonic() - started
            log.info("deadline: stopped %d running jobs", len(running))
            return
        if not running and not waiting:
            return
        waiting.sort(key=lambda j: j.priority)
        for j in waiting[: max(a.jobs - len(running), 0)]:
            # stop between epochs early enough to finish the epoch and the final scoring
            budget = left() - a.margin - a.epoch_allowance
            if budget <= 0:
                j.rc = -2  # not started: too little time left
                continue
            out = open(logs / _log_name(j), "wb")  # noqa: SIM115
            j.proc = subprocess.Popen(
                _command(a, j, budget), stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO
            )
            j.started = time.monotonic() - started
            log.info("started %s (%d running)", j.name, len(running) + 1)
            running.append(j)
        time.sleep(1.0)


def _arc(f: Path) -> str:
    """The name of ``f`` in an archive: relative to the repository (unpack there), else absolute
    without its leading slash."""
    f = f.resolve()
    return str(f.relative_to(REPO)) if f.is_relative_to(REPO) else str(f).lstrip("/")


def pack(a: argparse.Namespace, jobs: list[Job], dest: Path) -> dict[str, Any]:
    """Records, run metadata and weights into at most eight files under ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    touched = [REPO / j.run_dir if not Path(j.run_dir).is_absolute() else Path(j.run_dir)
               for j in jobs if j.run_dir and j.proc is not None]  # fmt: skip
    touched = [d for d in touched if d.exists()]
    meta_files = [a.results / T.RECORDS, a.results / T.PROTOCOL_RECORDS]
    for d in touched:
        meta_files += [d / n for n in ("run.json", "pretrain.json") if (d / n).exists()]
    meta_files += [a.results / S.RECORDS, a.results / S.CHOICES]
    if a.student_work.exists():  # the students' run.json (their weights are rebuilt, not packed)
        meta_files += sorted(a.student_work.glob("*/run.json"))
    meta_files += sorted(a.logs.glob("*.log")) if a.logs.exists() else []
    with tarfile.open(dest / "records.tar", "w") as tar:
        for f in meta_files:
            if f.exists():
                tar.add(f, arcname=_arc(f))

    def finished(d: Path) -> bool:
        meta = d / ("pretrain.json" if d.name.endswith("-pretrain") else "run.json")
        return meta.exists() and bool(json.loads(meta.read_text()).get("finished"))

    def rank(d: Path) -> int:
        """Encoders first, then finished pretrained teachers, other finished runs, resume state."""
        if d.name.endswith("-pretrain"):
            return 0
        if not done[d]:
            return 3
        return 1 if "-pretrained-" in d.name else 2

    done = {d: finished(d) for d in touched}
    weights: list[Path] = []
    for d in sorted(touched, key=rank):
        names = ["encoder.safetensors", "best.safetensors"]
        if not done[d]:  # an unfinished run (or pretraining) travels with its resume state
            names.append("last.pt")
        weights += [d / n for n in names if (d / n).exists()]
    part_bytes, total_bytes = int(a.part_mb * 2**20), int(a.pack_mb * 2**20)
    parts: list[list[Path]] = [[]]
    size = used = 0
    left_out: list[str] = []
    for f in weights:
        n = f.stat().st_size
        if used + n > total_bytes or n > part_bytes:
            left_out.append(_arc(f))
            continue
        if size + n > part_bytes:
            if len(parts) == 5:  # records.tar, plan.json, the driver log, five parts: eight files
                left_out.append(_arc(f))
                continue
            parts.append([])
            size = 0
        parts[-1].append(f)
        size += n
        used += n
    for i, files in enumerate(p for p in parts if p):
        with tarfile.open(dest / f"weights-{i}.tar", "w") as tar:
            for f in files:
                tar.add(f, arcname=_arc(f))
    summary = {
        "jobs": [
            {
                "name": j.name,
                "rc": j.rc,
                "done": j.done,
                "started_s": None if j.started is None else round(j.started, 1),
                "ended_s": None if j.ended is None else round(j.ended, 1),
            }
            for j in jobs
        ],
        "weights_packed_mb": round(used / 2**20, 1),
        "left_out": left_out,
    }
    (dest / "plan.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda")
    p.add_argument("--jobs", type=int, default=max((os.cpu_count() or 2) - 2, 1))
    p.add_argument("--threads", type=int, default=1, help="torch threads per job")
    p.add_argument("--deadline", type=float, default=3600.0, help="seconds for the whole run")
    p.add_argument("--margin", type=float, default=30.0, help="seconds kept free at the end")
    p.add_argument(
        "--epoch-allowance",
        type=float,
        default=45.0,
        help="a job's time limit leaves this long for its last epoch and its scoring",
    )
    p.add_argument("--methods", type=lambda t: tuple(t.split(",")), default=T.METHODS)
    p.add_argument("--datasets", type=lambda t: tuple(t.split(",")), default=T.DATASETS)
    p.add_argument(
        "--horizons", type=lambda t: tuple(int(h) for h in t.split(",")), default=T.HORIZONS
    )
    p.add_argument("--seeds", type=lambda t: tuple(int(s) for s in t.split(",")), default=T.SEEDS)
    p.add_argument("--inits", type=lambda t: tuple(t.split(",")), default=T.INITS)
    p.add_argument(
        "--stages",
        type=lambda t: tuple(t.split(",")),
        default=("pretrain", "finetune", "supervised", "ensemble"),
    )
    p.add_argument("--skip", type=lambda t: tuple(t.split(",")), default=(),
                   help="job names to leave out (e.g. 'pretrain simmtm ETTh2')")  # fmt: skip
    p.add_argument("--data-dir", type=Path, default=T.DATA_DIR)
    p.add_argument("--work", type=Path, default=T.WORK)
    p.add_argument("--results", type=Path, default=T.RESULTS)
    p.add_argument("--logs", type=Path, default=REPO / "var" / "logs" / "teachers-parallel")
    p.add_argument("--pack", type=Path, default=None, help="folder for the packed results")
    p.add_argument("--pack-mb", type=float, default=60.0)
    p.add_argument("--part-mb", type=float, default=15.5)
    p.add_argument(
        "--students",
        dest="student_horizons",
        type=lambda t: tuple(int(h) for h in t.split(",")) if t else (),
        default=(),
        help="also run bench/students.py's distillations, mlp and ablations at these horizons "
        "as their teachers' ensembles land (e.g. 96,192,336,720; the peers are left out)",
    )
    p.add_argument("--student-work", type=Path, default=S.WORK)
    p.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    p.add_argument("--smoke", action="store_true", help="toy budgets (tests only)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    jobs = plan(a)
    dropped = {j.name for j in jobs if j.name in a.skip or j.stage not in a.stages}
    while True:  # and whatever waits on a job left out
        more = {j.name for j in jobs if j.name not in dropped and set(j.needs) & dropped}
        if not more:
            break
        dropped |= more
    jobs = [j for j in jobs if j.name not in dropped]
    for j in sorted(jobs, key=lambda j: j.priority):
        log.info("plan: %s%s", j.name, f" (after {', '.join(j.needs)})" if j.needs else "")
    if a.dry_run:
        return 0
    replan = (lambda: student_jobs(a)) if a.student_horizons else None
    execute(a, jobs, replan)
    if a.pack is not None:
        summary = pack(a, jobs, a.pack)
        log.info("packed %.1f MB of weights; left out %d files",
                 summary["weights_packed_mb"], len(summary["left_out"]))  # fmt: skip
    done = sum(j.done for j in jobs)
    log.info("%d of %d jobs finished their run", done, len(jobs))
    failed = [j for j in jobs if j.rc is not None and j.rc > 0]
    for j in failed:  # a crash, not a stop at the deadline: its log says why
        log.error("%s failed (rc %d): see %s", j.name, j.rc, a.logs / _log_name(j))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
