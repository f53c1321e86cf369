"""Teachers at the papers' budgets: masked pretraining, fine-tuning, ensembles, one run each.

Every (method, dataset) pretraining and every (cell, init, protocol, seed) fine-tuning is its own
run folder under ``--work`` (default ``bench/checkpoints``, committed: the encoders and the
resume state of unfinished runs are small, so a later session continues where this one stopped).
Runs resume (``last.pt``); a run with a record is skipped. Stages:

* ``pretrain``: each method's encoder per dataset (one per method and dataset, as the papers do;
  lookback 336), until the validation pretext loss stops improving (``[pretrain]`` budgets);
* ``protocol``: the fine-tuning protocol of each method, chosen on the validation MSE of
  ETTh1-96, seed 0 (never on test): for pretrained encoders the scratch recipe (lr 1e-3 on the
  whole network), a one-epoch head-only warm-up then the encoder at 0.1x the head's lr, or lr
  1e-4 throughout; for the scratch twins lr 1e-3 or 1e-4. Records (validation MSE only) go to
  ``bench/results/teacher_protocols.json``; every later run uses the chosen protocol;
* ``finetune``: the cells (ETTh1/ETTh2 x H 96/336 x method x pretrained/scratch x seeds 0-2);
* ``supervised``: PatchTST, the supervised reference, per cell and seed;
* ``ensemble``: the three pretrained teachers of a seed, mean or validation-weighted (whichever
  has the lower validation MSE in that cell and seed).

Each finished run appends one record to ``bench/results/teachers.json`` (fields in
``RECORD_FIELDS``, plus the protocol, validation MSE and every budget); ``report`` writes
``bench/results/teachers.md``. A typical session::

    python bench/teachers.py run --time-limit 9000     # every stage, in priority order
    python bench/teachers.py pretrain --methods simmtm --datasets ETTh2 --time-limit 3600
    python bench/teachers.py report
    python bench/teachers.py status                    # done, unfinished, left (no training)

``--time-limit`` stops between epochs once that many seconds have passed (the run stays
resumable), so a job never outlives the session that started it.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from training.config import build_run_config, default_config_path  # noqa: E402
from training.data import prepare  # noqa: E402
from training.distill import DistillConfig  # noqa: E402
from training.distill_teachers import load_teachers, score_teachers  # noqa: E402
from training.loop import resolve_device  # noqa: E402
from training.pretrain import (  # noqa: E402
    FinetuneRunConfig,
    build_pretrain_config,
    run_finetune,
    run_pretrain,
)
from training.train import run_train  # noqa: E402

log = logging.getLogger("bench.teachers")
WORK = REPO / "bench" / "checkpoints"
DATA_DIR = REPO.parent / "shared" / "data"
RESULTS = REPO / "bench" / "results"
RECORDS = "teachers.json"  # in --results
PROTOCOL_RECORDS = "teacher_protocols.json"
# --smoke: the whole queue at toy budgets (tests; records say so in max_train_batches).
SMOKE_TRAIN = {"epochs": 1, "max_train_batches": 2, "eval_batch_size": 256}
SMOKE_PRETRAIN = {"epochs": 1, "min_epochs": 0, "max_train_batches": 2, "val_max_windows": 64}

METHODS = ("simmtm", "himtm", "dmae")
INITS = ("pretrained", "scratch")
DATASETS = ("ETTh1", "ETTh2")
HORIZONS = (96, 336)
SEEDS = (0, 1, 2)
LOOKBACK = 336
# Fine-tuning protocols (overrides of the method's [train] table) and where they are chosen.
# Every protocol sets all three knobs, so a later change to a TOML's [train] cannot leak in.
_WHOLE = {"head_warmup_epochs": 0, "encoder_lr_scale": 1.0}
PROTOCOLS: dict[str, dict[str, dict[str, Any]]] = {
    "pretrained": {
        "lr1e-3": {"lr": 1e-3, **_WHOLE},
        "warmup-enc0.1": {"lr": 1e-3, "head_warmup_epochs": 1, "encoder_lr_scale": 0.1},
        "lr1e-4": {"lr": 1e-4, **_WHOLE},
    },
    "scratch": {"lr1e-3": {"lr": 1e-3, **_WHOLE}, "lr1e-4": {"lr": 1e-4, **_WHOLE}},
}
SELECTION = ("ETTh1", 96, 0)  # dataset, horizon, seed whose validation MSE picks the protocol
# Variants of a method reported beside it on one cell (stage ``variant``): HiMTM's
# self-distillation target as a momentum (EMA) copy of the encoder instead of the encoder itself
# under stop-gradient (the default). Own encoder, the method's chosen protocol, seeds 0-2;
# records in ``teacher_variants.json``.
VARIANTS: dict[str, dict[str, Any]] = {
    "himtm-ema": {"method": "himtm", "model": {"teacher": "ema"}}
}
VARIANT_CELL = ("ETTh1", 96)
VARIANT_RECORDS = "teacher_variants.json"
RECORD_FIELDS = (
    "dataset",
    "horizon",
    "lookback",
    "model",
    "init",
    "seed",
    "mse",
    "mae",
    "epochs",
    "best_epoch",
    "pretrain_epochs",
    "pretrain_seconds",
    "finetune_seconds",
    "max_train_batches",
)


# --------------------------------------------------------------------------- records


def load_records(path: Path) -> list[dict[str, Any]]:
    return json.loads(path.read_text()) if path.exists() else []


def record_key(r: dict[str, Any]) -> tuple[Any, ...]:
    return (r["dataset"], r["horizon"], r["model"], r["init"], r["seed"], r.get("protocol", ""))


def update_records(
    path: Path, change: Callable[[list[dict[str, Any]]], list[dict[str, Any]]]
) -> list[dict[str, Any]]:
    """Rewrite the records file ``path`` as ``change(records)``, atomically; returns what it read.

    An exclusive lock on ``<path>.lock`` serialises the read-modify-write, so two invocations
    (say pretraining on one core, fine-tuning on the other) never drop each other's records.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".json.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        records = load_records(path)
        tmp = path.with_suffix(f".json.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(change(records), indent=1) + "\n")
        os.replace(tmp, path)
    return records


def save_record(
    path: Path,
    record: dict[str, Any],
    key: Callable[[dict[str, Any]], tuple[Any, ...]] = record_key,
) -> None:
    """Append ``record`` (replacing one with the same ``key``), sorted by key, atomically."""

    def change(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        kept = [r for r in records if key(r) != key(record)]
        return sorted([*kept, record], key=lambda r: tuple(str(v) for v in key(r)))

    update_records(path, change)


def drop_missing_weights(a: argparse.Namespace) -> list[str]:
    """Forget the fine-tuned teachers of the selected cells, seeds and inits whose weights are
    not on this machine (trained elsewhere, their ``best.safetensors`` never came back): their
    records, the ensemble records they are members of, the ``students.json`` records that learned
    from them, and their run folders (metadata only), so that the queue trains them again and
    rebuilds those ensembles. Returns the runs dropped."""
    gone: set[str] = set()

    def forget_teachers(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        gone.update(
            r["run"]
            for r in records
            if r["model"] in a.methods
            and r.get("init") in a.inits
            and Cell(r["dataset"], r["horizon"]) in cells(a)
            and r["seed"] in a.seeds
            and r.get("run")
            and not (REPO / r["run"] / "best.safetensors").exists()
        )
        return [r for r in records if not depends(r)]

    def depends(r: dict[str, Any]) -> bool:  # one of those teachers, or an ensemble of them
        return r.get("run") in gone or bool(set(r.get("members") or ()) & gone)

    records = update_records(a.results / RECORDS, forget_teachers)
    if not gone:
        return []
    dropped = sum(map(depends, records))

    # The students' records learned from (or copied) those teachers: stale once they retrain.
    def learned(r: dict[str, Any]) -> bool:
        return bool(set(r.get("teachers") or ()) & gone)

    students = a.results / "students.json"
    if students.exists():
        rows = update_records(students, lambda rows: [r for r in rows if not learned(r)])
        stale = [r for r in rows if learned(r)]
        if stale:
            log.info("dropped %d students.json records of those teachers", len(stale))
        for r in stale:  # their run folders too, or a resumed run would bring them back
            if r.get("run"):
                shutil.rmtree(REPO / r["run"], ignore_errors=True)
    for run in sorted(gone):
        shutil.rmtree(REPO / run, ignore_errors=True)
        log.info("weights missing: dropped %s and its record (%d records dropped in all)", run,
                 dropped)  # fmt: skip
    return sorted(gone)


def has_record(path: Path, **key: Any) -> bool:
    return any(all(r.get(k) == v for k, v in key.items()) for r in load_records(path))


def chosen_protocol(init: str, method: str, path: Path) -> str | None:
    """The protocol of lowest validation MSE on the selection cell, once every one has run."""
    dataset, horizon, seed = SELECTION
    runs = {
        r["protocol"]: r["val_mse"]
        for r in load_records(path)
        if (r["dataset"], r["horizon"], r["seed"], r["model"], r["init"])
        == (dataset, horizon, seed, method, init)
    }
    if set(runs) != set(PROTOCOLS[init]):
        return None
    return min(runs, key=runs.__getitem__)


# --------------------------------------------------------------------------- runs


def config_for(method: str, dataset: str) -> Path:
    """The method's TOML, or its per-dataset one (``simmtm-etth2.toml``) when there is one."""
    specific = default_config_path(f"{method}-{dataset.lower()}")
    return specific if specific.exists() else default_config_path(method)


def pretrain_dir(work: Path, method: str, dataset: str, lookback: int = LOOKBACK) -> Path:
    return work / f"{dataset}-{method}-L{lookback}-pretrain"


def pretrain_meta(work: Path, method: str, dataset: str) -> dict[str, Any] | None:
    """The finished pretraining's ``pretrain.json``, else None."""
    path = pretrain_dir(work, method, dataset) / "pretrain.json"
    if not path.exists():
        return None
    meta: dict[str, Any] = json.loads(path.read_text())
    return meta if meta.get("finished") else None


def finetune_dir(work: Path, c: Cell, method: str, init: str, protocol: str, seed: int) -> Path:
    return work / f"{c.dataset}-{method}-L{LOOKBACK}-H{c.horizon}-{init}-{protocol}-s{seed}"


@dataclass(frozen=True)
class Cell:
    dataset: str
    horizon: int


@dataclass
class Budget:
    """What one invocation may spend; ``left()`` is None without a limit."""

    limit: float | None
    started: float = field(default_factory=time.monotonic)

    def left(self) -> float | None:
        return None if self.limit is None else self.limit - (time.monotonic() - self.started)

    def spent(self) -> bool:
        left = self.left()
        return left is not None and left <= 0


def _data(a: argparse.Namespace, c: Cell) -> dict[str, Any]:
    return {
        "dataset": c.dataset,
        "data_dir": str(a.data_dir),
        "lookback": LOOKBACK,
        "horizon": c.horizon,
    }


def _train(a: argparse.Namespace, budget: Budget, seed: int, **extra: Any) -> dict[str, Any]:
    return {
        "threads": a.threads,
        "device": a.device,
        "progress": not a.no_progress,
        "seed": seed,
        "time_limit_s": budget.left(),
        **(SMOKE_TRAIN if a.smoke else {}),
        **extra,
    }


def pretrain_one(
    a: argparse.Namespace, budget: Budget, method: str, dataset: str, variant: str | None = None
) -> bool:
    """Pretrain (or continue) one encoder (of ``variant``, a key of ``VARIANTS``, when given);
    True when it finished."""
    label = variant or method
    cfg = build_pretrain_config(
        method,
        config_for(method, dataset),
        data={"dataset": dataset, "data_dir": str(a.data_dir), "lookback": LOOKBACK},
        model_settings=VARIANTS[variant]["model"] if variant else None,
        pretrain={
            "threads": a.threads,
            "device": a.device,
            "progress": not a.no_progress,
            "time_limit_s": budget.left(),
            **(SMOKE_PRETRAIN if a.smoke else {}),
        },
        out_dir=str(pretrain_dir(a.work, label, dataset)),
        resume=True,
    )
    result = run_pretrain(cfg)
    log.info("%s", json.dumps({"method": label, "dataset": dataset, **result.summary()}))
    return result.loop.finished


def finetune_one(
    a: argparse.Namespace,
    budget: Budget,
    c: Cell,
    method: str,
    init: str,
    protocol: str,
    seed: int,
    variant: str | None = None,
) -> dict[str, Any] | None:
    """Fine-tune one teacher (from ``variant``'s encoder when given); its record, or None when
    the time limit stopped it."""
    label = variant or method
    meta = pretrain_meta(a.work, label, c.dataset) if init == "pretrained" else None
    if init == "pretrained" and meta is None:
        raise RuntimeError(f"{label} on {c.dataset} is not pretrained yet")
    out = finetune_dir(a.work, c, label, init, protocol, seed)
    run = build_run_config(
        method,
        config_for(method, c.dataset),
        _data(a, c),
        _train(a, budget, seed, **PROTOCOLS[init][protocol]),
        out_dir=str(out),
    )
    init_from = str(pretrain_dir(a.work, label, c.dataset)) if meta else None
    fit = run_finetune(FinetuneRunConfig(run, init_from=init_from, resume=True))
    if not fit.finished:
        return None
    pre = (meta or {}).get("pretrain", {})
    variant_fields = {"variant": variant, **VARIANTS[variant]["model"]} if variant else {}
    return {
        **variant_fields,
        "dataset": c.dataset,
        "horizon": c.horizon,
        "lookback": LOOKBACK,
        "model": method,
        "init": init,
        "seed": seed,
        "mse": round(fit.test["mse"], 5),
        "mae": round(fit.test["mae"], 5),
        "epochs": fit.epochs_run,
        "best_epoch": fit.best_epoch,
        "pretrain_epochs": len(meta["history"]) if meta else None,
        "pretrain_best_epoch": meta.get("best_epoch") if meta else None,
        "pretrain_seconds": round(meta["seconds"], 1) if meta else None,
        "finetune_seconds": round(fit.train_seconds, 1),
        "max_train_batches": run.train.max_train_batches,
        "val_mse": round(fit.val["mse"], 5),
        "protocol": protocol,
        "device": resolve_device(a.device).type,
        "budget": {
            "pretrain": {
                k: pre.get(k)
                for k in (
                    "epochs",
                    "min_epochs",
                    "patience",
                    "batch_size",
                    "lr",
                    "max_train_batches",
                )
            }
            if meta
            else None,
            "finetune": {
                k: getattr(run.train, k)
                for k in (
                    "epochs",
                    "patience",
                    "batch_size",
                    "lr",
                    "lr_schedule",
                    "encoder_lr_scale",
                    "head_warmup_epochs",
                    "max_train_batches",
                )
            },
        },
        "run": str(out.relative_to(REPO)) if out.is_relative_to(REPO) else str(out),
    }


def supervised_one(
    a: argparse.Namespace, budget: Budget, c: Cell, seed: int
) -> dict[str, Any] | None:
    out = a.work / f"{c.dataset}-patchtst-L{LOOKBACK}-H{c.horizon}-s{seed}"
    run = build_run_config("patchtst", None, _data(a, c), _train(a, budget, seed), out_dir=str(out))
    fit = run_train(run, resume=True)
    if not fit.finished:
        return None
    return {
        "dataset": c.dataset,
        "horizon": c.horizon,
        "lookback": LOOKBACK,
        "model": "patchtst",
        "init": "",
        "seed": seed,
        "mse": round(fit.test["mse"], 5),
        "mae": round(fit.test["mae"], 5),
        "epochs": fit.epochs_run,
        "best_epoch": fit.best_epoch,
        "pretrain_epochs": None,
        "pretrain_seconds": None,
        "finetune_seconds": round(fit.train_seconds, 1),
        "max_train_batches": run.train.max_train_batches,
        "val_mse": round(fit.val["mse"], 5),
        "device": resolve_device(a.device).type,
        "budget": {
            "finetune": {
                k: getattr(run.train, k)
                for k in (
                    "epochs",
                    "patience",
                    "batch_size",
                    "lr",
                    "lr_schedule",
                    "max_train_batches",
                )
            }
        },
        "run": str(out.relative_to(REPO)) if out.is_relative_to(REPO) else str(out),
    }


def ensemble_one(a: argparse.Namespace, c: Cell, seed: int, runs: list[Path]) -> dict[str, Any]:
    """Score the mean and the validation-weighted ensemble; keep the one better on validation."""
    data = prepare(build_run_config("mlp", None, _data(a, c)).data)
    teachers = load_teachers(data, DistillConfig(teachers=tuple(str(r) for r in runs)))
    scores = score_teachers(teachers, data, progress=not a.no_progress)["ensemble"]
    weighting = min(scores, key=lambda w: scores[w]["val"]["mse"])
    chosen = scores[weighting]
    return {
        "dataset": c.dataset,
        "horizon": c.horizon,
        "lookback": LOOKBACK,
        "model": "ensemble",
        "init": "",
        "seed": seed,
        "mse": round(chosen["test"]["mse"], 5),
        "mae": round(chosen["test"]["mae"], 5),
        "epochs": None,
        "best_epoch": None,
        "pretrain_epochs": None,
        "pretrain_seconds": None,
        "finetune_seconds": None,
        "max_train_batches": None,
        "val_mse": round(chosen["val"]["mse"], 5),
        "weighting": weighting,
        "weights": [round(w, 4) for w in chosen["weights"]],
        "val_mse_by_weighting": {w: round(s["val"]["mse"], 5) for w, s in scores.items()},
        "members": [str(r.relative_to(REPO)) if r.is_relative_to(REPO) else str(r) for r in runs],
    }


# --------------------------------------------------------------------------- report

# PatchTST/64's published test MSE (Nie et al., 2023, Table 3; L = 512) per (dataset, horizon).
PUBLISHED_PATCHTST64 = {
    ("ETTh1", 96): 0.370,
    ("ETTh1", 336): 0.422,
    ("ETTh2", 96): 0.274,
    ("ETTh2", 336): 0.329,
}
ROWS = [*((m, i) for m in METHODS for i in INITS), ("patchtst", ""), ("ensemble", "")]


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _fmt(values: list[float]) -> str:
    if not values:
        return "-"
    m, sd = mean_std(values)
    return f"{m:.4f} ± {sd:.4f} ({len(values)})"


def paired(records: list[dict[str, Any]], c: Cell, method: str) -> list[float]:
    """pretrained - scratch test MSE per seed both have."""
    by = {
        (r["init"], r["seed"]): r["mse"]
        for r in records
        if (r["dataset"], r["horizon"], r["model"]) == (c.dataset, c.horizon, method)
    }
    return [
        by[("pretrained", s)] - by[("scratch", s)]
        for s in sorted({s for _, s in by})
        if ("pretrained", s) in by and ("scratch", s) in by
    ]


def variants_section(records: list[dict[str, Any]], variants: list[dict[str, Any]]) -> list[str]:
    """Each variant beside its method's default on ``VARIANT_CELL`` (pretrained), paired."""
    dataset, horizon = VARIANT_CELL
    lines: list[str] = []
    for variant, spec in VARIANTS.items():
        method = spec["method"]
        base = {
            r["seed"]: r
            for r in records
            if (r["dataset"], r["horizon"], r["model"], r["init"])
            == (dataset, horizon, method, "pretrained")
        }
        alt = {
            r["seed"]: r
            for r in variants
            if r.get("variant") == variant and (r["dataset"], r["horizon"]) == (dataset, horizon)
        }
        if not alt:
            continue
        settings = ", ".join(f"{k} = {v!r}" for k, v in spec["model"].items())
        lines += [
            f"## {method}: default against `{settings}` ({dataset}-{horizon}, pretrained)",
            "",
            "| variant | test MSE | test MAE | val MSE | pretraining epochs (best) |",
            "|---|---|---|---|---|",
        ]
        for name, rs in ((f"{method} (default)", base), (variant, alt)):
            pre = sorted(
                {(r.get("pretrain_epochs"), r.get("pretrain_best_epoch")) for r in rs.values()}
            )
            lines.append(
                f"| {name} | {_fmt([r['mse'] for r in rs.values()])} | "
                f"{_fmt([r['mae'] for r in rs.values()])} | "
                f"{_fmt([r['val_mse'] for r in rs.values()])} | "
                + ", ".join(f"{e} ({b})" for e, b in pre)
                + " |"
            )
        diffs = [alt[s]["mse"] - base[s]["mse"] for s in sorted(alt) if s in base]
        if diffs:
            m, sd = mean_std(diffs)
            each = ", ".join(f"{d:+.4f}" for d in diffs)
            lines += [
                "",
                f"{variant} minus default, test MSE paired by seed: {m:+.4f} ± {sd:.4f} ({each}).",
            ]
        lines.append("")
    return lines


def targets_section(records: list[dict[str, Any]]) -> list[str]:
    """The issue's targets against the seed means, and where the runs trained."""
    lower = total = 0
    for c in (Cell(d, h) for h in HORIZONS for d in DATASETS):
        for method in METHODS:
            mse = {
                init: [
                    r["mse"]
                    for r in records
                    if (r["dataset"], r["horizon"], r["model"], r["init"])
                    == (c.dataset, c.horizon, method, init)
                ]
                for init in INITS
            }
            if all(mse.values()):
                total += 1
                lower += statistics.fmean(mse["pretrained"]) < statistics.fmean(mse["scratch"])
    lines = [
        "## Targets (seed means)",
        "",
        f"- Pretrained below its scratch twin: {lower} of {total} cells by the mean "
        "(target: 9 of 12), however small the difference; the paired differences above say "
        "which of them are beyond the seed spread.",
    ]
    for c in (Cell(d, h) for h in HORIZONS for d in DATASETS):
        ens = [
            r["mse"]
            for r in records
            if (r["dataset"], r["horizon"], r["model"]) == (c.dataset, c.horizon, "ensemble")
        ]
        if not ens:
            continue
        ref = PUBLISHED_PATCHTST64[(c.dataset, c.horizon)]
        m = statistics.fmean(ens)
        verdict = "at or below" if m <= ref else f"{100 * (m / ref - 1):.1f}% above"
        lines.append(
            f"- Ensemble {c.dataset}-{c.horizon}: {m:.4f}, {verdict} PatchTST/64's published "
            f"{ref:.3f}" + (" (target for this cell: <= 0.365)" if c == Cell("ETTh1", 96) else "")
        )
    where: dict[str, int] = {}
    for r in records:
        if r["model"] != "ensemble" and r["horizon"] in HORIZONS:
            where[r.get("device", "cpu")] = where.get(r.get("device", "cpu"), 0) + 1
    lines += [
        "",
        "Where the runs trained: "
        + ", ".join(f"{n} on {d}" for d, n in sorted(where.items()))
        + " (each record's `device`; records without it trained on the CPU; the ensembles are "
        "scored on the CPU). The protocol and budgets are the same on both, but a seed does not "
        "give bit-identical runs across devices (other kernels, other random streams on the "
        "GPU): a seed's GPU run is another draw of the same recipe, not a replica of its CPU run.",
        "",
    ]
    return lines


def write_plots(work: Path, out: Path, protocols: Path) -> list[str]:
    """Pretraining and fine-tuning curves (train/val loss per epoch) of each method on ETTh1."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit("report: the curves need matplotlib (pip install -e '.[plot]')") from exc
    written = []
    for method in METHODS:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        meta_path = pretrain_dir(work, method, "ETTh1") / "pretrain.json"
        ax = axes[0]
        if meta_path.exists():
            hist = json.loads(meta_path.read_text())["history"]
            ep = [h["epoch"] for h in hist]
            ax.plot(ep, [h["train_loss"] for h in hist], label="train")
            ax.plot(ep, [h["val_loss"] for h in hist], label="val")
            ax.legend()
        ax.set(title=f"{method} pretraining (ETTh1)", xlabel="epoch", ylabel="pretext loss")
        ax = axes[1]
        for init in INITS:
            protocol = chosen_protocol(init, method, protocols)
            run = finetune_dir(work, Cell("ETTh1", 96), method, init, protocol or "", 0)
            if protocol is None or not (run / "run.json").exists():
                continue
            hist = json.loads((run / "run.json").read_text()).get("history", [])
            ep = [h["epoch"] for h in hist]
            line = ax.plot(ep, [h["train_loss"] for h in hist], label=f"{init} train")[0]
            ax.plot(
                ep,
                [h["val_mse"] for h in hist],
                "--",
                color=line.get_color(),
                label=f"{init} val MSE",
            )
        ax.set(title=f"{method} fine-tuning (ETTh1-96, seed 0)", xlabel="epoch", ylabel="loss")
        if ax.lines:
            ax.legend()
        fig.tight_layout()
        name = f"teachers-{method}-etth1.png"
        fig.savefig(out / name, dpi=90)
        plt.close(fig)
        written.append(name)
    return written


def write_report(results: Path = RESULTS, work: Path = WORK, plots: bool = True) -> int:
    """``teachers.md`` (and the curves' PNGs) in ``results`` from its records."""
    records = load_records(results / RECORDS)
    protocols_path = results / PROTOCOL_RECORDS
    lines = [
        "# Teachers at the papers' budgets",
        "",
        "Test MSE / MAE on the z-scored scale (standard split, L = 336), mean ± std over seeds "
        "(n in brackets). Every choice (fine-tuning protocol, ensemble weighting) was made on the "
        "validation split. Reproduce: `python bench/teachers.py run` (resumable; "
        "`--time-limit` per session) then `python bench/teachers.py report`.",
        "",
    ]
    wins = total = 0
    for c in [Cell(d, h) for h in HORIZONS for d in DATASETS]:
        cell = [r for r in records if (r["dataset"], r["horizon"]) == (c.dataset, c.horizon)]
        if not cell:
            continue
        ref = PUBLISHED_PATCHTST64[(c.dataset, c.horizon)]
        lines += [
            f"## {c.dataset}, H = {c.horizon}",
            "",
            "| model | init | test MSE | test MAE | val MSE | epochs (best) |",
            "|---|---|---|---|---|---|",
        ]
        for model, init in ROWS:
            rs = [r for r in cell if r["model"] == model and r["init"] == init]
            if not rs:
                continue
            best = ", ".join(f"{r['epochs']} ({r['best_epoch']})" for r in rs if r["epochs"])
            lines.append(
                f"| {model} | {init or '-'} | {_fmt([r['mse'] for r in rs])} | "
                f"{_fmt([r['mae'] for r in rs])} | {_fmt([r['val_mse'] for r in rs])} | "
                f"{best or '-'} |"
            )
        lines += [
            f"| PatchTST/64 (published, L = 512) | | {ref:.3f} | | | |",
            "",
            "Pretrained minus scratch, test MSE, paired by seed (negative: pretraining "
            "helps; a mean inside its spread is not a win):",
            "",
        ]
        for method in METHODS:
            diffs = paired(records, c, method)
            if not diffs:
                continue
            m, sd = mean_std(diffs)
            total += 1
            verdict = (
                "helps"
                if m < 0 and m + sd < 0
                else "hurts"
                if m > 0 and m - sd > 0
                else ("within the spread")
            )
            wins += verdict == "helps"
            each = ", ".join(f"{d:+.4f}" for d in diffs)
            lines.append(f"- {method}: {m:+.4f} ± {sd:.4f} ({each}): {verdict}")
        lines.append("")
    lines += [f"Pretraining helps beyond the seed spread in {wins} of {total} cells measured.", ""]
    lines += targets_section(records)
    lines += variants_section(records, load_records(results / VARIANT_RECORDS))
    protocols = load_records(protocols_path)
    if protocols:
        lines += [
            "## Fine-tuning protocol (chosen on validation: ETTh1-96, seed 0)",
            "",
            "| method | init | protocol | val MSE | epochs (best) | chosen |",
            "|---|---|---|---|---|---|",
        ]
        for r in sorted(protocols, key=lambda r: (r["model"], r["init"], r["protocol"])):
            chosen = chosen_protocol(r["init"], r["model"], protocols_path) == r["protocol"]
            lines.append(
                f"| {r['model']} | {r['init']} | {r['protocol']} | {r['val_mse']:.4f} "
                f"| {r['epochs']} ({r['best_epoch']}) | {'yes' if chosen else ''} |"
            )
        lines.append("")
    if plots:
        lines += ["## Curves (ETTh1)", ""]
        lines += [f"![{n}]({n})" for n in write_plots(work, results, protocols_path)]
        lines.append("")
    (results / "teachers.md").write_text("\n".join(lines))
    log.info("wrote %s", results / "teachers.md")
    return 0


# --------------------------------------------------------------------------- the queue


@dataclass
class Task:
    stage: str
    label: str
    run: Callable[[], bool]  # True: done; False: stopped by the time limit


def cells(a: argparse.Namespace) -> list[Cell]:
    """Cells in priority order: the headline (ETTh1-96) first, then by horizon."""
    return [Cell(d, h) for h in a.horizons for d in a.datasets]


def tasks(a: argparse.Namespace, budget: Budget) -> Iterator[Task]:
    """Every missing run whose prerequisites are met, stage by stage in ``a.stages`` order."""
    for stage in a.stages:
        if stage == "pretrain":
            for dataset in a.datasets:
                for method in a.methods:
                    if pretrain_meta(a.work, method, dataset) is None:
                        yield Task(
                            stage,
                            f"{method} {dataset}",
                            lambda m=method, d=dataset: pretrain_one(a, budget, m, d),
                        )
        elif stage == "protocol":
            dataset, horizon, seed = SELECTION
            c = Cell(dataset, horizon)
            for method in a.methods:
                for init in INITS:
                    if init == "pretrained" and pretrain_meta(a.work, method, dataset) is None:
                        continue
                    for protocol in PROTOCOLS[init]:
                        key = {
                            "dataset": dataset,
                            "horizon": horizon,
                            "model": method,
                            "init": init,
                            "seed": seed,
                            "protocol": protocol,
                        }
                        if not has_record(a.results / PROTOCOL_RECORDS, **key):
                            yield Task(
                                stage,
                                f"{method} {init} {protocol}",
                                lambda m=method, i=init, p=protocol, cc=c: _protocol_run(
                                    a, budget, cc, m, i, p
                                ),
                            )
        elif stage == "finetune":
            for c in cells(a):  # a cell's seeds together: its mean and spread come first
                for seed in a.seeds:
                    for method in a.methods:
                        for init in a.inits:
                            protocol = chosen_protocol(init, method, a.results / PROTOCOL_RECORDS)
                            if protocol is None or has_record(
                                a.results / RECORDS,
                                dataset=c.dataset,
                                horizon=c.horizon,
                                model=method,
                                init=init,
                                seed=seed,
                            ):
                                continue
                            if init == "pretrained" and not pretrain_meta(
                                a.work, method, c.dataset
                            ):
                                continue
                            yield Task(
                                stage,
                                f"{method} {init} {c.dataset}-{c.horizon} s{seed}",
                                lambda c=c, m=method, i=init, p=protocol, s=seed: _record(
                                    a, finetune_one(a, budget, c, m, i, p, s)
                                ),
                            )
        elif stage == "supervised":
            for c in cells(a):  # a cell's seeds together: its mean and spread come first
                for seed in a.seeds:
                    if not has_record(
                        a.results / RECORDS,
                        dataset=c.dataset,
                        horizon=c.horizon,
                        model="patchtst",
                        seed=seed,
                    ):
                        yield Task(
                            stage,
                            f"patchtst {c.dataset}-{c.horizon} s{seed}",
                            lambda c=c, s=seed: _record(a, supervised_one(a, budget, c, s)),
                        )
        elif stage == "variant":
            dataset, horizon = VARIANT_CELL
            vc = Cell(dataset, horizon)
            for variant, spec in VARIANTS.items():
                method = spec["method"]
                if method not in a.methods:
                    continue
                if pretrain_meta(a.work, variant, dataset) is None:
                    yield Task(
                        stage,
                        f"pretrain {variant} {dataset}",
                        lambda v=variant, m=method, d=dataset: pretrain_one(a, budget, m, d, v),
                    )
                    continue
                protocol = chosen_protocol("pretrained", method, a.results / PROTOCOL_RECORDS)
                if protocol is None:
                    continue
                for seed in a.seeds:
                    if not has_record(
                        a.results / VARIANT_RECORDS, variant=variant, seed=seed, horizon=horizon
                    ):
                        yield Task(
                            stage,
                            f"{variant} {dataset}-{horizon} s{seed}",
                            lambda v=variant, m=method, p=protocol, s=seed, c=vc: _record(
                                a,
                                finetune_one(a, budget, c, m, "pretrained", p, s, v),
                                a.results / VARIANT_RECORDS,
                            ),
                        )
        elif stage == "ensemble":
            for c in cells(a):  # a cell's seeds together: its mean and spread come first
                for seed in a.seeds:
                    if has_record(
                        a.results / RECORDS,
                        dataset=c.dataset,
                        horizon=c.horizon,
                        model="ensemble",
                        seed=seed,
                    ):
                        continue
                    members = [
                        r
                        for r in load_records(a.results / RECORDS)
                        if (r["dataset"], r["horizon"], r["seed"], r["init"])
                        == (c.dataset, c.horizon, seed, "pretrained")
                        and r["model"] in a.methods
                    ]
                    if {r["model"] for r in members} == set(a.methods):
                        runs = [REPO / r["run"] for r in sorted(members, key=lambda r: r["model"])]
                        yield Task(
                            stage,
                            f"ensemble {c.dataset}-{c.horizon} s{seed}",
                            lambda c=c, s=seed, r=runs: _record(a, ensemble_one(a, c, s, r)),
                        )


def _record(a: argparse.Namespace, record: dict[str, Any] | None, path: Path | None = None) -> bool:
    if record is None:
        return False
    save_record(path or a.results / RECORDS, record)
    log.info("record: %s", json.dumps({k: record.get(k) for k in RECORD_FIELDS}))
    return True


def _protocol_run(
    a: argparse.Namespace, budget: Budget, c: Cell, method: str, init: str, protocol: str
) -> bool:
    seed = SELECTION[2]
    record = finetune_one(a, budget, c, method, init, protocol, seed)
    if record is None:
        return False
    # Validation only: the choice must not see test (the seed-0 record reuses the run folder).
    save_record(
        a.results / PROTOCOL_RECORDS,
        {
            k: record[k]
            for k in (
                "dataset",
                "horizon",
                "lookback",
                "model",
                "init",
                "seed",
                "protocol",
                "val_mse",
                "epochs",
                "best_epoch",
                "finetune_seconds",
                "budget",
            )
        },
    )
    return True


def cmd_run(a: argparse.Namespace) -> int:
    budget = Budget(a.time_limit)
    done = 0
    if a.redo_missing_weights:
        drop_missing_weights(a)
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
            log.info("time limit reached during %s %s (resumable)", pending.stage, pending.label)
            return 0
        done += 1


def status(results: Path = RESULTS, work: Path = WORK) -> str:
    """What is done, what runs now (a run folder without its record) and what is left, with a
    rough single-thread estimate of the compute left (from the runs done so far)."""
    lines = ["pretraining (epochs done / at least; best epoch by validation pretext loss):"]
    left_s = 0.0
    not_started: list[str] = []
    for dataset in DATASETS:
        for method in METHODS:
            path = pretrain_dir(work, method, dataset) / "pretrain.json"
            if not path.exists():
                lines.append(f"  {method:7s} {dataset}: not started")
                not_started.append(f"{method} {dataset}")
                continue
            meta = json.loads(path.read_text())
            history = meta.get("history") or []
            want = int(meta.get("pretrain", {}).get("min_epochs") or 0)
            last = float(history[-1]["seconds"]) if history else 0.0
            state = "finished" if meta.get("finished") else "in progress"
            if not meta.get("finished") and history:
                left_s += max(0, want - len(history)) * last / len(history)
            lines.append(
                f"  {method:7s} {dataset}: {state}, {len(history)} / {want} epochs, "
                f"best {meta.get('best_epoch')}, {last / 3600:.1f} h"
            )
    records = load_records(results / RECORDS)
    finetune = [float(r["finetune_seconds"]) for r in records if r.get("finetune_seconds")]
    typical = statistics.median(finetune) if finetune else float("nan")
    lines.append(f"fine-tuned records (seeds done of {len(SEEDS)}):")
    missing = 0
    for c in (Cell(d, h) for h in HORIZONS for d in DATASETS):
        row = []
        for model, init in [(m, i) for m in METHODS for i in INITS] + [
            ("patchtst", ""),
            ("ensemble", ""),
        ]:
            n = sum(
                1
                for r in records
                if (r["dataset"], r["horizon"], r["model"], r["init"])
                == (c.dataset, c.horizon, model, init)
            )
            row.append(f"{model}{'-' + init[:3] if init else ''} {n}")
            if model != "ensemble":
                missing += len(SEEDS) - n
        lines.append(f"  {c.dataset}-{c.horizon}: " + ", ".join(row))

    def unfinished(run: Path) -> bool:
        """Started (resume state or a run.json) and not finished."""
        meta = run / "run.json"
        if meta.exists():
            return not json.loads(meta.read_text()).get("finished")
        return (run / "last.pt").exists()

    running = [d.name for d in sorted(work.glob("*-s[0-9]")) if unfinished(d)]
    lines.append(f"unfinished run folders: {', '.join(running) or 'none'}")
    lines.append(
        f"left: {missing} fine-tuning runs (~{missing * typical / 3600:.1f} h at the "
        f"median {typical / 60:.0f} min each, one thread), ~{left_s / 3600:.1f} h of "
        "pretraining in progress to its minimum epochs, and pretraining not started: "
        f"{', '.join(not_started) or 'none'}; then the ensembles (minutes)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    stages = ("pretrain", "protocol", "finetune", "supervised", "ensemble", "variant")
    runp = sub.add_parser("run", help="every missing run of the given stages, in order")
    runp.add_argument(
        "--stages",
        type=lambda t: tuple(t.split(",")),
        default=("protocol", "pretrain", "finetune", "ensemble", "supervised", "variant"),
    )
    runp.add_argument(
        "--redo-missing-weights",
        action="store_true",
        help="first forget the selected fine-tuned teachers whose best.safetensors is not here "
        "(records, their ensembles' records, run folders), so that they train again",
    )
    pre = sub.add_parser("pretrain", help="masked pretraining of each method on each dataset")
    pre.set_defaults(stages=("pretrain",), redo_missing_weights=False)
    rep = sub.add_parser("report", help="bench/results/teachers.md and the curves' PNGs")
    st = sub.add_parser("status", help="what is done, running and left (no training)")
    st.add_argument("--results", type=Path, default=RESULTS)
    st.add_argument("--work", type=Path, default=WORK)
    st.set_defaults(handler=lambda a: print(status(a.results, a.work)) or 0)
    for q in (runp, pre):
        q.add_argument("--methods", type=lambda t: tuple(t.split(",")), default=METHODS)
        q.add_argument("--datasets", type=lambda t: tuple(t.split(",")), default=DATASETS)
        q.add_argument(
            "--horizons", type=lambda t: tuple(int(h) for h in t.split(",")), default=HORIZONS
        )
        q.add_argument("--seeds", type=lambda t: tuple(int(s) for s in t.split(",")), default=SEEDS)
        q.add_argument(
            "--inits",
            type=lambda t: tuple(t.split(",")),
            default=INITS,
            help="fine-tuning stage: pretrained and/or scratch (the students' extra horizons "
            "need only the pretrained teachers of their ensembles)",
        )
        q.add_argument("--data-dir", type=Path, default=DATA_DIR)
        q.add_argument("--work", type=Path, default=WORK)
        q.add_argument("--threads", type=int, default=2)
        q.add_argument(
            "--device",
            default="cpu",
            help="cpu, cuda, cuda:N or auto; each record says where it trained (records "
            "without the field trained on the CPU)",
        )
        q.add_argument("--time-limit", type=float, default=None, help="seconds for this invocation")
        q.add_argument("--no-progress", action="store_true")
        q.add_argument("--results", type=Path, default=RESULTS, help="where the records go")
        q.add_argument("--smoke", action="store_true", help="toy budgets (tests only)")
        q.set_defaults(handler=cmd_run)
    rep.add_argument("--no-plots", action="store_true")
    rep.add_argument("--results", type=Path, default=RESULTS)
    rep.add_argument("--work", type=Path, default=WORK)
    rep.set_defaults(handler=lambda a: write_report(a.results, a.work, plots=not a.no_plots))
    a = p.parse_args(argv)
    for init in getattr(a, "inits", ()):
        if init not in INITS:
            p.error(f"--inits: unknown init {init!r}; choose from {', '.join(INITS)}")
    for stage in getattr(a, "stages", ()):
        if stage not in stages:
            p.error(f"--stages: unknown stage {stage!r}; choose from {', '.join(stages)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return int(a.handler(a))


if __name__ == "__main__":
    sys.exit(main())
