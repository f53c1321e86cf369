"""``python -m training pipeline``: teachers -> student -> ONNX -> registry -> promotion.

Stages, each named on stderr as it runs (``[i/n] stage ...``):

1. ``data``: load and split the dataset once (errors name the file, column and row);
2. ``pretrain M`` and ``finetune M`` for each masked-pretraining method of the plan (or
   ``train A`` for each supervised teacher of a plan without pretraining);
3. ``distill student``: TimeDistill from all the teachers (their mean forecast);
4. ``export``: every model to ONNX, parity-checked, into ``<work>/exports/<name>/``;
5. ``register``: the teachers (``NAME-<arch>``), their group ``NAME-ensemble`` (the accurate
   path) and the student ``NAME``, whose manifest lists the teacher versions and the group;
6. ``promote``: registering put each version on ``staging``; the group and the student are then
   promoted to ``production`` (or ``alias``) through the registry's gate, which refuses a
   version worse on validation than the one in production: it stays on ``staging``.

Nothing falls back: a stage that fails stops the pipeline with :class:`StageFailed` naming the
stage and its cause (the CLI exits 1). ``resume=True`` (``--resume``) keeps what is done: a
training stage whose run folder finished returns at once, an unfinished one continues from its
last epoch, exports and registrations already on disk are reused, so a late failure (a parity
refusal after hours of teachers) costs only the failed stage.

The plan TOML (``training/configs/pipeline.toml``, ``--quick``: ``pipeline-quick.toml``):
``pretrained`` (methods), ``supervised`` (teachers used only when ``pretrained`` is empty),
``student`` (``mlp``), ``[models.<arch>.model|train|pretrain]`` tables merged over the
architecture's own TOML, ``distill_config`` (the student's base TOML in ``training/configs``:
``distill``, the authors' form, by default; the quick plan takes ``distill-ours``), ``[distill]``
(``DistillConfig`` fields) and ``[stages.distill]`` (the student's ``TrainConfig``).
Command-line data and optimisation flags override every stage.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models_registry.defaults import registry_root
from models_registry.errors import PromotionRefused
from models_registry.manifest import DEFAULT_ALIAS, Manifest, ModelRef
from models_registry.store import FilesystemStore
from training.checkpoints import load_forecaster
from training.config import CONFIG_DIR, build_run_config, default_config_path, load_toml
from training.data import DataConfig, PreparedData, prepare, resolve_dataset
from training.distill import build_distill_config, run_distill
from training.export import PARITY_WINDOWS, serving_graph
from training.manifests import ExportedModel, export_run
from training.models import MODELS
from training.pretrain import (
    METHODS,
    FinetuneRunConfig,
    build_pretrain_config,
    run_finetune,
    run_pretrain,
)
from training.publish import promote, register_ensemble
from training.train import run_train

log = logging.getLogger(__name__)

ENSEMBLE_SUFFIX = "-ensemble"
STAGING = "staging"
PLAN_KEYS = frozenset(
    {"pretrained", "supervised", "student", "models", "distill", "distill_config", "stages"}
)


class StageFailed(RuntimeError):
    """A pipeline stage failed; the message names the stage and the cause."""

    def __init__(self, stage: str, cause: BaseException) -> None:
        self.stage = stage
        super().__init__(
            f"pipeline stage '{stage}' failed: {type(cause).__name__}: {cause} "
            "(fix it and rerun with --resume: finished stages are kept)"
        )


@dataclass(frozen=True)
class PipelineConfig:
    """One pipeline run. ``data`` and ``train`` are ``DataConfig``/``TrainConfig`` overrides
    (the command line's); ``train`` applies to every training stage."""

    data: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    name: str | None = None
    registry: str | None = None
    quick: bool = False
    plan_file: str | None = None
    work_dir: str | None = None
    alias: str | None = None
    """The alias to promote to (default ``production``, through the registry's gate)."""
    parity_windows: int | None = PARITY_WINDOWS
    resume: bool = False
    redis_url: str | None = None

    def plan_path(self) -> Path:
        if self.plan_file:
            return Path(self.plan_file)
        return CONFIG_DIR / ("pipeline-quick.toml" if self.quick else "pipeline.toml")


@dataclass(frozen=True)
class Plan:
    pretrained: tuple[str, ...]
    supervised: tuple[str, ...]
    student: str
    models: dict[str, dict[str, dict[str, Any]]]
    distill: dict[str, Any]
    stages: dict[str, dict[str, Any]]
    distill_config: str = "distill"
    """The student's base TOML in training/configs (``distill``: the authors' form)."""

    def table(self, arch: str, section: str) -> dict[str, Any]:
        return dict(self.models.get(arch, {}).get(section, {}))


def load_plan(path: Path) -> Plan:
    doc = load_toml(path)
    unknown = sorted(set(doc) - PLAN_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; known: {sorted(PLAN_KEYS)}")
    pretrained = tuple(doc.get("pretrained", ()))
    supervised = tuple(doc.get("supervised", ()))
    student = str(doc.get("student", "mlp"))
    for method in pretrained:
        if method not in METHODS:
            raise ValueError(f"{path}: unknown method {method!r}; choose from {sorted(METHODS)}")
    for arch in (*supervised, student):
        if arch not in MODELS:
            raise ValueError(f"{path}: unknown model {arch!r}; choose from {sorted(MODELS)}")
    if not pretrained and not supervised:
        raise ValueError(f"{path}: the plan names no teacher (pretrained or supervised)")
    distill_config = str(doc.get("distill_config", "distill"))
    if not default_config_path(distill_config).is_file():
        raise ValueError(
            f"{path}: distill_config {distill_config!r} names no file "
            f"{default_config_path(distill_config)}"
        )
    return Plan(
        pretrained,
        () if pretrained else supervised,
        student,
        {k: {s: dict(t) for s, t in v.items()} for k, v in doc.get("models", {}).items()},
        dict(doc.get("distill", {})),
        {k: dict(v) for k, v in doc.get("stages", {}).items()},
        distill_config,
    )


def default_name(dataset: str, horizon: int, data_dir: str | None = None) -> str:
    """``etth1-h96``: the dataset's name, lower-cased and made registry-safe, and the horizon."""
    info, _ = resolve_dataset(dataset, data_dir)
    base = re.sub(r"[^a-z0-9._-]+", "-", info.name.lower()).strip("-._") or "model"
    return f"{base}-h{horizon}"


class Stages:
    """Runs named stages: ``[i/n] label ...`` then ``done in 12.3s`` on stderr; a failure is
    re-raised as :class:`StageFailed` naming the stage."""

    def __init__(self, labels: list[str]) -> None:
        self.labels = labels
        self.timings: list[dict[str, Any]] = []
        self.t0 = time.perf_counter()

    @contextlib.contextmanager
    def run(self, label: str) -> Iterator[dict[str, Any]]:
        prefix = f"[{self.labels.index(label) + 1}/{len(self.labels)}] {label}"
        sys.stderr.write(f"{prefix} ...\n")
        note: dict[str, Any] = {}
        start = time.perf_counter()
        try:
            yield note
        except StageFailed:
            raise
        except Exception as exc:  # any cause: the stage's name is what the user needs
            sys.stderr.write(f"{prefix}: failed after {time.perf_counter() - start:.1f}s\n")
            raise StageFailed(label, exc) from exc
        seconds = time.perf_counter() - start
        self.timings.append({"stage": label, "seconds": round(seconds, 2)})
        detail = f" ({note['detail']})" if note.get("detail") else ""
        sys.stderr.write(f"{prefix}: done in {seconds:.1f}s{detail}\n")

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0


@dataclass
class Teacher:
    arch: str
    run_dir: Path
    registry_name: str


class Pipeline:
    """The stages of one run, sharing the config, the plan, the data and the work folder."""

    def __init__(self, cfg: PipelineConfig) -> None:
        self.cfg = cfg
        self.plan = load_plan(cfg.plan_path())
        self.data_cfg = DataConfig(**cfg.data)
        self.name = cfg.name or default_name(
            self.data_cfg.dataset, self.data_cfg.horizon, self.data_cfg.data_dir
        )
        self.store = FilesystemStore(registry_root(cfg.registry))
        suffix = "-quick" if cfg.quick else ""
        self.work = Path(cfg.work_dir or Path("runs") / "pipeline" / (self.name + suffix))
        teachers = [f"{s} {m}" for m in self.plan.pretrained for s in ("pretrain", "finetune")]
        teachers += [f"train {a}" for a in self.plan.supervised]
        self.stages = Stages(
            ["data", *teachers, "distill student", "export", "register", "promote"]
        )

    def _data(self) -> dict[str, Any]:
        return {k: v for k, v in self.cfg.data.items() if v is not None}

    def _train(self, *tables: dict[str, Any]) -> dict[str, Any]:
        # Quick runs default to one thread: on 2 shared cores, two threads took 14 min against 2
        # (OpenMP workers spin when the cores are oversubscribed).
        merged: dict[str, Any] = {"threads": 1} if self.cfg.quick else {}
        for t in (*tables, self.cfg.train):
            merged.update(t)
        return merged

    # -- training stages ----------------------------------------------------------------------

    def pretrain_finetune(self, method: str) -> Teacher:
        pre_dir, ft_dir = self.work / f"{method}-pretrain", self.work / method
        with self.stages.run(f"pretrain {method}") as note:
            pre = build_pretrain_config(
                method,
                data=self._data(),
                pretrain=self._train(self.plan.table(method, "pretrain")),
                model_settings=self.plan.table(method, "model"),
                out_dir=str(pre_dir),
                resume=self.cfg.resume,
            )
            result = run_pretrain(pre)
            if not result.loop.finished:
                raise RuntimeError(f"pretraining stopped early ({result.summary()['resume']})")
            note["detail"] = f"best epoch {result.loop.best_epoch}/{result.loop.epochs_run}"
        with self.stages.run(f"finetune {method}") as note:
            run = build_run_config(
                method,
                data=self._data(),
                train=self._train(self.plan.table(method, "train")),
                model_settings=self.plan.table(method, "model"),
                out_dir=str(ft_dir),
            )
            fit = run_finetune(FinetuneRunConfig(run, str(pre_dir), resume=self.cfg.resume))
            self._finished(fit.finished, fit.out_dir)
            note["detail"] = f"val mse {fit.val['mse']:.4f}"
        return Teacher(method, ft_dir, f"{self.name}-{method}")

    def train_supervised(self, arch: str) -> Teacher:
        with self.stages.run(f"train {arch}") as note:
            run = build_run_config(
                arch,
                data=self._data(),
                train=self._train(self.plan.table(arch, "train")),
                model_settings=self.plan.table(arch, "model"),
                out_dir=str(self.work / arch),
            )
            fit = run_train(run, resume=self.cfg.resume)
            self._finished(fit.finished, fit.out_dir)
            note["detail"] = f"val mse {fit.val['mse']:.4f}"
        return Teacher(arch, self.work / arch, f"{self.name}-{arch}")

    def distill_student(self, teachers: list[Teacher]) -> Path:
        out = self.work / f"{self.plan.student}-distilled"
        with self.stages.run("distill student") as note:
            cfg = build_distill_config(
                default_config_path(self.plan.distill_config),
                data=self._data(),
                train=self._train(self.plan.stages.get("distill", {})),
                distill={**self.plan.distill, "teachers": tuple(str(t.run_dir) for t in teachers)},
                model_settings=self.plan.table(self.plan.student, "model"),
                out_dir=str(out),
                resume=self.cfg.resume,
            )
            result = run_distill(cfg)
            self._finished(result.fit.finished, out)
            note["detail"] = f"val mse {result.fit.val['mse']:.4f}"
        return out

    @staticmethod
    def _finished(finished: bool, out_dir: Path) -> None:
        if not finished:
            raise RuntimeError(f"{out_dir} stopped before its schedule ended; rerun with --resume")

    # -- export, registration, promotion ------------------------------------------------------

    def export(self, data: PreparedData, teachers: list[Teacher], student_dir: Path) -> None:
        with self.stages.run("export") as note:
            done = []
            for run_dir, name, kind in [
                *((t.run_dir, t.registry_name, None) for t in teachers),
                (student_dir, self.name, "student"),
            ]:
                folder = self.work / "exports" / name
                if self.cfg.resume and (folder / "manifest.json").exists():
                    done.append(f"{name} (kept)")
                    continue
                same = load_forecaster(run_dir)[1]["data"]["lookback"] == data.config.lookback
                exported = export_run(
                    run_dir,
                    name,
                    data=data if same else None,
                    kind=kind,
                    parity_windows=self.cfg.parity_windows,
                )
                save_export(exported, folder)
                done.append(f"{name} parity {exported.parity.max_abs_err:.1e}")
            note["detail"] = ", ".join(done)

    def register(
        self, data: PreparedData, teachers: list[Teacher], student_dir: Path
    ) -> dict[str, Manifest]:
        """Register what is not registered yet (``<work>/registered.json`` keeps the refs)."""
        path = self.work / "registered.json"
        done: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}
        if not self.cfg.resume:
            done = {}

        def keep(key: str, manifest: Manifest) -> Manifest:
            done[key] = str(manifest.ref)
            path.write_text(json.dumps(done, indent=2))
            return manifest

        def known(key: str) -> Manifest | None:
            if key not in done:
                return None
            ref = ModelRef.parse(done[key])
            return self.store.manifest(ref.name, ref.version)

        with self.stages.run("register") as note:
            members: list[Manifest] = []
            for t in teachers:
                found = known(t.registry_name)
                if found is None:
                    exported = load_export(self.work / "exports" / t.registry_name)
                    found = keep(t.registry_name, self.store.register(*exported))
                members.append(found)
            group_name = self.name + ENSEMBLE_SUFFIX
            group = known(group_name)
            if group is None:
                modules = [
                    serving_graph(load_forecaster(t.run_dir)[0], data).module for t in teachers
                ]
                same = all(getattr(m, "lookback", None) == data.config.lookback for m in modules)
                group = keep(
                    group_name,
                    register_ensemble(
                        self.store,
                        group_name,
                        [m.ref for m in members],
                        modules=modules if same else None,
                        data=data,
                    ),
                )
            student = known(self.name)
            if student is None:
                manifest, onnx_bytes = load_export(self.work / "exports" / self.name)
                refs = [m.ref for m in members] + [group.ref]
                manifest = manifest.model_copy(update={"teachers": refs})
                student = keep(self.name, self.store.register(manifest, onnx_bytes))
            note["detail"] = ", ".join(str(m.ref) for m in (*members, group, student))
        return {"student": student, "ensemble": group, **{m.name: m for m in members}}

    def promote(self, group: Manifest, student: Manifest) -> dict[str, dict[str, Any]]:
        """Registering put both on ``staging``; promote each to ``--alias`` (``production`` by
        default) through the registry's gate. A version the gate refuses (worse on validation
        than the one in production) stays on ``staging`` and the result says why."""
        target = self.cfg.alias or DEFAULT_ALIAS
        out: dict[str, dict[str, Any]] = {}
        with self.stages.run("promote") as note:
            for m in (group, student):  # the group first: a replica switching finds its group
                try:
                    promote(
                        self.store, m.name, target, m.version, self.cfg.redis_url, actor="pipeline"
                    )
                    out[m.name] = {"alias": target}
                except PromotionRefused as exc:
                    log.warning("%s", exc)
                    out[m.name] = {"alias": STAGING, "refused": str(exc)}
            note["detail"] = ", ".join(f"{n}@{o['alias']}" for n, o in out.items())
        return out

    def run(self) -> dict[str, Any]:
        log.info("pipeline %s -> %s (runs in %s)", self.name, self.store.root, self.work)
        with self.stages.run("data") as note:
            data = prepare(self.data_cfg)
            note["detail"] = f"{data.info.name}, {data.channels} channels"
        teachers = [self.pretrain_finetune(m) for m in self.plan.pretrained]
        teachers += [self.train_supervised(a) for a in self.plan.supervised]
        student_dir = self.distill_student(teachers)
        self.export(data, teachers, student_dir)
        registered = self.register(data, teachers, student_dir)
        student, group = registered.pop("student"), registered.pop("ensemble")
        aliases = self.promote(group, student)
        return {
            "name": self.name,
            "registry": str(self.store.root),
            "dataset": data.info.name,
            "lookback": self.data_cfg.lookback,
            "horizon": self.data_cfg.horizon,
            "quick": self.cfg.quick,
            "student": {**summary(student), **aliases[student.name]},
            "ensemble": {
                **summary(group),
                **aliases[group.name],
                "members": [str(m.ref) for m in registered.values()],
            },
            "teachers": [summary(m) for m in registered.values()],
            "stages": self.stages.timings,
            "seconds": round(self.stages.seconds, 1),
        }


def save_export(exported: ExportedModel, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.onnx").write_bytes(exported.onnx_bytes)
    save_manifest(exported.manifest, folder)  # written last: its presence marks a whole export


def save_manifest(manifest: Manifest, folder: Path) -> None:
    """Write (or replace) an export folder's ``manifest.json`` atomically."""
    tmp = folder / "manifest.json.tmp"
    tmp.write_text(manifest.model_dump_json(indent=2))
    tmp.replace(folder / "manifest.json")


def load_export(folder: Path) -> tuple[Manifest, bytes]:
    manifest = Manifest.model_validate_json((folder / "manifest.json").read_text())
    return manifest, (folder / "model.onnx").read_bytes()


def summary(m: Manifest) -> dict[str, Any]:
    keys = ("val_mse", "test_mse", "test_mae")
    out: dict[str, Any] = {
        "name": m.name,
        "version": m.version,
        "kind": m.kind,
        "architecture": m.architecture,
        **{k: round(m.metrics[k], 4) for k in keys if k in m.metrics},
    }
    if m.parity_max_abs_err is not None:
        out["parity_max_abs_err"] = m.parity_max_abs_err
    return out


def run_pipeline(cfg: PipelineConfig) -> dict[str, Any]:
    """Build, register and promote one model family; returns what was registered and how."""
    return Pipeline(cfg).run()


__all__ = ["PipelineConfig", "StageFailed", "default_name", "run_pipeline"]
