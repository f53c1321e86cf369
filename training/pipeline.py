"""``python -m training pipeline``: teachers -> student -> export -> register -> promote.

The chain uses whatever is available when it runs:

* teachers: the masked-pretraining methods (``pretrain`` then ``finetune``) when
  ``training.pretrain`` has landed, else the supervised teachers of the plan (``patchtst``);
* student: distilled from the teachers when ``training.distill`` has landed, else the plain
  ``mlp`` trained on its own;
* every model is exported to ONNX and parity-checked (``training.export``); teachers are
  registered as ``NAME-<arch>``, grouped as ``NAME-ensemble`` (the accurate path, with its own
  metrics and calibration), and the student as ``NAME`` with the teacher versions and the group in
  its manifest's ``teachers``;
* each name is promoted to ``production`` when it has no production alias yet, else to
  ``staging`` (the group first, so a replica switching the student already finds its group).

Stages that come from other modules are driven through their CLI subcommands (the flags the
issues specify), with ``--out`` pointing at a run folder this pipeline owns, so nothing here
depends on their config classes: ``pretrain --method M --dataset D --lookback L --out DIR``,
``finetune --method M --dataset D --lookback L --horizon H --from CKPT --out DIR`` and
``distill --dataset D --lookback L --horizon H --teachers RUN_DIR,... --out DIR``, plus budget
flags (``--epochs`` ...) where the subcommand has them. The run folders they write must load with
``training.checkpoints.load_forecaster``. If such an optional stage fails, the pipeline falls back
(fewer teachers, the plain student), says so on stderr and in the result's ``fallbacks``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import re
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from models_registry.errors import ModelNotFound, RegistryError
from models_registry.manifest import DEFAULT_ALIAS, Manifest
from models_registry.store import FilesystemStore
from training.checkpoints import read_run
from training.config import CONFIG_DIR, build_run_config, load_toml
from training.data import DataConfig, PreparedData, prepare, resolve_dataset
from training.export import (
    PARITY_WINDOWS,
    ExportedModel,
    ExportError,
    export_run,
    promote,
    register_ensemble,
    register_exported,
    registry_root,
)
from training.models import MODELS
from training.train import run_train

log = logging.getLogger(__name__)

ENSEMBLE_SUFFIX = "-ensemble"
STAGING = "staging"
TRAIN_FLAGS = {  # TrainConfig field -> the flag of training.__main__.add_train_args
    "epochs": "--epochs",
    "batch_size": "--batch-size",
    "lr": "--lr",
    "patience": "--patience",
    "seed": "--seed",
    "threads": "--threads",
    "max_train_batches": "--max-train-batches",
}


@dataclass(frozen=True)
class PipelineConfig:
    """One pipeline run. ``overrides`` merges over the plan TOML: ``{"mlp": {"model": {...},
    "train": {...}}, "distill": {"train": {...}}}`` (architectures and CLI stages alike)."""

    dataset: str = "ETTh1"
    horizon: int = 96
    lookback: int = 336
    data_dir: str | None = None
    name: str | None = None
    registry: str | None = None
    quick: bool = False
    config_file: str | None = None
    work_dir: str | None = None
    alias: str | None = None
    """None: ``production`` for a name without one, else ``staging``."""
    threads: int | None = None
    seed: int | None = None
    progress: bool = True
    parity_windows: int | None = PARITY_WINDOWS
    redis_url: str | None = None
    overrides: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)

    def plan_path(self) -> Path:
        if self.config_file:
            return Path(self.config_file)
        return CONFIG_DIR / ("pipeline-quick.toml" if self.quick else "pipeline.toml")


@dataclass(frozen=True)
class Plan:
    pretrained: tuple[str, ...]
    supervised: tuple[str, ...]
    student: str
    budgets: dict[str, dict[str, dict[str, Any]]]

    def settings(self, key: str, section: str) -> dict[str, Any]:
        return dict(self.budgets.get(key, {}).get(section, {}))


def load_plan(cfg: PipelineConfig) -> Plan:
    path = cfg.plan_path()
    doc = load_toml(path)
    known = {"pretrained", "supervised", "student", "models", "stages"}
    unknown = sorted(set(doc) - known)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; known: {sorted(known)}")
    budgets: dict[str, dict[str, dict[str, Any]]] = {}
    for key, tables in doc.get("models", {}).items():
        budgets[key] = {k: dict(v) for k, v in tables.items()}
    for key, flags in doc.get("stages", {}).items():
        budgets[key] = {"train": dict(flags)}
    for key, tables in cfg.overrides.items():
        for section, values in tables.items():
            budgets.setdefault(key, {}).setdefault(section, {}).update(values)
    supervised = tuple(doc.get("supervised", ("patchtst",)))
    student = str(doc.get("student", "mlp"))
    for arch in (*supervised, student):
        if arch not in MODELS:
            raise ValueError(f"{path}: unknown model {arch!r}; choose from {sorted(MODELS)}")
    return Plan(tuple(doc.get("pretrained", ())), supervised, student, budgets)


def default_name(dataset: str, horizon: int, data_dir: str | None = None) -> str:
    """``etth1-h96``: the dataset's name, lower-cased and made registry-safe, and the horizon."""
    info, _ = resolve_dataset(dataset, data_dir)
    base = re.sub(r"[^a-z0-9._-]+", "-", info.name.lower()).strip("-._") or "model"
    return f"{base}-h{horizon}"


# -- progress ------------------------------------------------------------------------------------


class StageDisplay:
    """One line per stage on stderr: ``[i/n] label ...`` then ``done in 12.3s``."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.total = total
        self.enabled = enabled
        self.index = 0
        self.timings: list[dict[str, Any]] = []
        self.t0 = time.perf_counter()

    def _write(self, text: str) -> None:
        if self.enabled:
            sys.stderr.write(text + "\n")
            sys.stderr.flush()

    @contextlib.contextmanager
    def stage(self, label: str) -> Iterator[dict[str, Any]]:
        self.index += 1
        prefix = f"[{self.index}/{self.total}] {label}"
        self._write(f"{prefix} ...")
        note: dict[str, Any] = {}
        start = time.perf_counter()
        try:
            yield note
        except BaseException:
            self._write(f"{prefix}: failed after {time.perf_counter() - start:.1f}s")
            raise
        seconds = time.perf_counter() - start
        self.timings.append({"stage": label, "seconds": round(seconds, 2)})
        detail = f" ({note['detail']})" if note.get("detail") else ""
        self._write(f"{prefix}: done in {seconds:.1f}s{detail}")

    def warn(self, text: str) -> None:
        log.warning("%s", text)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0


# -- optional stages through the training CLI ----------------------------------------------------


class StageUnavailable(RuntimeError):
    pass


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    from training.__main__ import build_parser

    parser = build_parser()
    for action in parser._actions:  # argparse keeps subparsers only here
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def available_commands() -> set[str]:
    """The ``python -m training`` subcommands present now (modules of other issues may lag)."""
    return set(_subparsers())


def _budget_flags(
    sub: argparse.ArgumentParser, budget: dict[str, Any], progress: bool
) -> list[str]:
    known = sub._option_string_actions
    argv: list[str] = []
    for key, value in budget.items():
        flag = TRAIN_FLAGS.get(key, "--" + key.replace("_", "-"))
        if flag in known and value is not None:
            argv += [flag, str(value)]
        else:
            log.debug("%s has no %s; budget %s=%r not passed", sub.prog, flag, key, value)
    if not progress and "--no-progress" in known:
        argv.append("--no-progress")
    return argv


def run_cli_stage(
    command: str, argv: Sequence[str], budget: dict[str, Any], progress: bool
) -> dict[str, Any]:
    """Run ``python -m training COMMAND ARGV`` in-process; returns its result dict."""
    subs = _subparsers()
    if command not in subs:
        raise StageUnavailable(f"`python -m training {command}` is not available")
    sub = subs[command]
    known = sub._option_string_actions
    args: list[str] = []
    it = iter(argv)
    for flag in it:  # keep only the flags this subcommand defines
        value = next(it)
        if flag in known:
            args += [flag, value]
        else:
            log.info("`%s` has no %s; not passed", command, flag)
    full = [command, *args, *_budget_flags(sub, budget, progress)]
    log.info("running: python -m training %s", " ".join(full))
    from training.__main__ import build_parser

    try:
        ns = build_parser().parse_args(full)
    except SystemExit as exc:
        raise StageUnavailable(f"`python -m training {' '.join(full)}` was refused") from exc
    result = ns.handler(ns)
    return result if isinstance(result, dict) else {}


def _run_dir(out: Path, result: dict[str, Any]) -> Path:
    """The run folder a CLI stage wrote: ``--out`` if it holds run.json, else one it reported."""
    candidates = [out]
    for key in ("out", "out_dir", "run_dir", "checkpoint", "path"):
        value = result.get(key)
        if isinstance(value, str):
            p = Path(value)
            candidates += [p, p.parent]
    for c in candidates:
        if (c / "run.json").is_file():
            return c
    raise FileNotFoundError(f"no run folder with run.json among {[str(c) for c in candidates]}")


# -- the pipeline --------------------------------------------------------------------------------


@dataclass
class Trained:
    arch: str
    run_dir: Path
    registry_name: str
    how: str  # "train" | "pretrain+finetune" | "distill"


def _train_overrides(cfg: PipelineConfig, plan: Plan, arch: str) -> dict[str, Any]:
    values = plan.settings(arch, "train")
    if cfg.threads is not None:
        values["threads"] = cfg.threads
    if cfg.seed is not None:
        values["seed"] = cfg.seed
    if not cfg.progress:
        values["progress"] = False
    return values


def _cli_budget(cfg: PipelineConfig, plan: Plan, stage: str) -> dict[str, Any]:
    budget = plan.settings(stage, "train")
    if cfg.threads is not None:
        budget.setdefault("threads", cfg.threads)
    if cfg.seed is not None:
        budget.setdefault("seed", cfg.seed)
    return budget


def _data_args(cfg: PipelineConfig) -> list[str]:
    argv = ["--dataset", cfg.dataset, "--lookback", str(cfg.lookback)]
    if cfg.data_dir:
        argv += ["--data-dir", cfg.data_dir]
    return argv


def train_supervised(cfg: PipelineConfig, plan: Plan, arch: str, out: Path) -> tuple[Path, str]:
    run_cfg = build_run_config(
        arch,
        data={
            "dataset": cfg.dataset,
            "lookback": cfg.lookback,
            "horizon": cfg.horizon,
            "data_dir": cfg.data_dir,
        },
        train=_train_overrides(cfg, plan, arch),
        model_settings=plan.settings(arch, "model"),
        out_dir=str(out),
    )
    result = run_train(run_cfg)
    return result.out_dir, f"test mse {result.test['mse']:.3f}"


def pretrain_finetune(cfg: PipelineConfig, plan: Plan, method: str, work: Path) -> Path:
    pre_out, ft_out = work / f"{method}-pretrain", work / method
    pre = run_cli_stage(
        "pretrain",
        ["--method", method, *_data_args(cfg), "--out", str(pre_out)],
        _cli_budget(cfg, plan, "pretrain"),
        cfg.progress,
    )
    ckpt = next(
        (str(pre[k]) for k in ("checkpoint", "encoder", "out", "out_dir") if pre.get(k)),
        str(pre_out),
    )
    ft = run_cli_stage(
        "finetune",
        [
            "--method",
            method,
            *_data_args(cfg),
            "--horizon",
            str(cfg.horizon),
            "--from",
            ckpt,
            "--out",
            str(ft_out),
        ],
        _cli_budget(cfg, plan, "finetune"),
        cfg.progress,
    )
    return _run_dir(ft_out, ft)


def distill_student(
    cfg: PipelineConfig, plan: Plan, teachers: Sequence[Trained], out: Path
) -> Path:
    result = run_cli_stage(
        "distill",
        [
            *_data_args(cfg),
            "--horizon",
            str(cfg.horizon),
            "--teachers",
            ",".join(str(t.run_dir) for t in teachers),
            "--out",
            str(out),
        ],
        _cli_budget(cfg, plan, "distill"),
        cfg.progress,
    )
    return _run_dir(out, result)


def pretrain_methods(plan: Plan, commands: set[str]) -> list[str]:
    """The plan's pretraining methods that the ``pretrain`` subcommand offers now."""
    if not plan.pretrained or not {"pretrain", "finetune"} <= commands:
        return []
    method = _subparsers()["pretrain"]._option_string_actions.get("--method")
    choices = set(method.choices) if method is not None and method.choices else None
    return [m for m in plan.pretrained if choices is None or m in choices]


def choose_alias(store: FilesystemStore, name: str, forced: str | None) -> str:
    if forced:
        return forced
    try:
        aliases = store.aliases(name)
    except ModelNotFound:
        aliases = {}
    return STAGING if DEFAULT_ALIAS in aliases else DEFAULT_ALIAS


def _export(run_dir: Path, name: str, data: PreparedData, cfg: PipelineConfig, **kw: Any):
    run = read_run(run_dir)
    same = run.get("data", {}).get("lookback") == data.config.lookback
    return export_run(
        run_dir, name, data=data if same else None, parity_windows=cfg.parity_windows, **kw
    )


def _summary(m: Manifest, alias: str | None) -> dict[str, Any]:
    keys = ("val_mse", "test_mse", "test_mae")
    return {
        "name": m.name,
        "version": m.version,
        "alias": alias,
        "kind": m.kind,
        "architecture": m.architecture,
        **{k: round(m.metrics[k], 4) for k in keys if k in m.metrics},
        **(
            {"parity_max_abs_err": m.parity_max_abs_err} if m.parity_max_abs_err is not None else {}
        ),
    }


def run_pipeline(cfg: PipelineConfig) -> dict[str, Any]:
    """Build, register and promote one model family; returns what was registered and how."""
    if cfg.quick and cfg.threads is None:
        # Measured on 2 shared cores: one thread 2 min, two threads 14 min (OpenMP workers spin
        # when the cores are oversubscribed); on idle cores the second thread gains little here.
        cfg = replace(cfg, threads=1)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    plan = load_plan(cfg)
    name = cfg.name or default_name(cfg.dataset, cfg.horizon, cfg.data_dir)
    store = FilesystemStore(registry_root(cfg.registry))
    work = Path(
        cfg.work_dir or Path("runs") / "pipeline" / (name + ("-quick" if cfg.quick else ""))
    )
    commands = available_commands()
    methods = pretrain_methods(plan, commands)
    supervised = [] if methods else list(plan.supervised)
    distill = "distill" in commands
    fallbacks: list[str] = []

    teacher_stages = [f"teacher {m} (pretrain + finetune)" for m in methods]
    teacher_stages += [f"teacher {a}" for a in supervised]
    student_label = f"student {plan.student} ({'distilled' if distill else 'trained alone'})"
    stages = [
        "data",
        *teacher_stages,
        "export + register teachers",
        "register ensemble",
        student_label,
        "export + register student",
        "promote",
    ]
    display = StageDisplay(len(stages))
    log.info("pipeline %s: %d stages -> %s (runs in %s)", name, len(stages), store.root, work)

    with display.stage("data") as note:
        data = prepare(DataConfig(cfg.dataset, cfg.lookback, cfg.horizon, data_dir=cfg.data_dir))
        note["detail"] = (
            f"{data.info.name}, {data.channels} channels, L={cfg.lookback} H={cfg.horizon}"
        )

    teachers: list[Trained] = []
    for method in methods:
        with display.stage(f"teacher {method} (pretrain + finetune)") as note:
            try:
                run_dir = pretrain_finetune(cfg, plan, method, work)
                teachers.append(Trained(method, run_dir, f"{name}-{method}", "pretrain+finetune"))
            except (StageUnavailable, FileNotFoundError, ValueError, RuntimeError) as exc:
                fallbacks.append(f"teacher {method} skipped: {exc}")
                display.warn(f"teacher {method} skipped: {exc}")
                note["detail"] = "skipped"
    if methods and not teachers:
        # Every pretrained teacher failed: fall back to the supervised ones (not counted above).
        fallbacks.append(f"no pretrained teacher; using {list(plan.supervised)}")
        supervised = list(plan.supervised)
    for arch in supervised:
        label = f"teacher {arch}"
        if label not in stages:
            display.total += 1
        with display.stage(label) as note:
            run_dir, note["detail"] = train_supervised(cfg, plan, arch, work / arch)
            teachers.append(Trained(arch, run_dir, f"{name}-{arch}", "train"))

    exported: list[ExportedModel] = []
    members: list[Manifest] = []
    with display.stage("export + register teachers") as note:
        for t in teachers:
            e = _export(t.run_dir, t.registry_name, data, cfg)
            exported.append(e)
            members.append(register_exported(e, store))
        note["detail"] = ", ".join(f"{m.name}@{m.version}" for m in members)

    group_name = name + ENSEMBLE_SUFFIX
    with display.stage("register ensemble") as note:
        # Members with another lookback than the data here cannot be scored on these windows.
        same = all(e.graph.lookback == data.config.lookback for e in exported)
        group = register_ensemble(
            store,
            group_name,
            [m.ref for m in members],
            modules=[e.graph.module for e in exported] if same else None,
            data=data,
            val_forecasts=[e.val for e in exported] if same else None,
        )
        test = group.metrics.get("test_mse")
        note["detail"] = f"{group.name}@{group.version}" + (
            f", test mse {test:.3f}" if test is not None else ""
        )

    student_dir = work / plan.student
    distilled = False
    with display.stage(student_label) as note:
        if distill:
            try:
                student_dir = distill_student(
                    cfg, plan, teachers, work / f"{plan.student}-distilled"
                )
                distilled = True
            except (StageUnavailable, FileNotFoundError, ValueError, RuntimeError) as exc:
                fallbacks.append(f"distillation failed, plain {plan.student} instead: {exc}")
                display.warn(fallbacks[-1])
        if not distilled:
            student_dir, note["detail"] = train_supervised(cfg, plan, plan.student, student_dir)

    with display.stage("export + register student") as note:
        # The teacher versions it was distilled from (or, trained alone, registered beside it)
        # and their group: the service's accurate path for a pinned student version uses these.
        refs = [m.ref for m in members] + [group.ref]
        e = _export(student_dir, name, data, cfg, teachers=refs, kind="student")
        student = register_exported(e, store)
        test_mse = student.metrics.get("test_mse", float("nan"))
        note["detail"] = (
            f"{student.name}@{student.version}, test mse {test_mse:.3f}, "
            f"parity {student.parity_max_abs_err:.1e}"
        )

    aliases: dict[str, str] = {}
    with display.stage("promote") as note:
        for m in (group, student):
            alias = choose_alias(store, m.name, cfg.alias)
            promote(store, m.name, alias, m.version, cfg.redis_url)
            aliases[m.name] = alias
        note["detail"] = ", ".join(f"{n}@{a}" for n, a in aliases.items())

    return {
        "name": name,
        "registry": str(store.root),
        "dataset": data.info.name,
        "lookback": cfg.lookback,
        "horizon": cfg.horizon,
        "quick": cfg.quick,
        "student": {**_summary(student, aliases[student.name]), "distilled": distilled},
        "ensemble": {
            **_summary(group, aliases[group.name]),
            "members": [str(m.ref) for m in members],
        },
        "teachers": [
            {**_summary(m, None), "trained": t.how} for m, t in zip(members, teachers, strict=True)
        ],
        "fallbacks": fallbacks,
        "stages": display.timings,
        "seconds": round(display.seconds, 1),
    }


# -- CLI -----------------------------------------------------------------------------------------


def cmd_pipeline(a: argparse.Namespace) -> dict[str, Any]:
    cfg = PipelineConfig(
        dataset=a.dataset,
        horizon=a.horizon,
        lookback=a.lookback,
        data_dir=a.data_dir,
        name=a.name,
        registry=a.registry,
        quick=a.quick,
        config_file=a.config,
        work_dir=a.work_dir,
        alias=a.alias,
        threads=a.threads,
        seed=a.seed,
        progress=not a.no_progress,
        parity_windows=a.parity_windows,
    )
    try:
        return run_pipeline(cfg)
    except RegistryError as exc:
        raise ExportError(f"registry: {exc}") from exc


def add_cli(sub: Any) -> None:
    p = sub.add_parser(
        "pipeline", help="teachers -> student -> ONNX -> registry -> promote, in one go"
    )
    p.add_argument("--dataset", default="ETTh1", help="catalogue name or a CSV path")
    p.add_argument("--data-dir", default=None, help="folder holding the catalogue's files")
    p.add_argument("--lookback", type=int, default=336)
    p.add_argument("--horizon", type=int, default=96)
    p.add_argument("--quick", action="store_true", help="tiny budgets (~2 min on 2 CPU cores)")
    p.add_argument(
        "--registry",
        default=None,
        help="registry root (default: $DISTILCAST_REGISTRY_ROOT, else ./var/registry)",
    )
    p.add_argument("--name", default=None, help="registry name (default: <dataset>-h<horizon>)")
    p.add_argument(
        "--alias",
        default=None,
        help="alias to set (default: production if the name has none yet, else staging)",
    )
    p.add_argument("--config", default=None, help="plan TOML (default: configs/pipeline*.toml)")
    p.add_argument("--work-dir", default=None, help="run folders (default: runs/pipeline/NAME)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (--quick: 1)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--parity-windows", type=int, default=PARITY_WINDOWS)
    p.add_argument("--no-progress", action="store_true", help="no per-epoch progress bars")
    p.set_defaults(handler=cmd_pipeline)
