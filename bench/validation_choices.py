"""Settings that were once chosen on test MSE, re-made on the validation split.

    python bench/validation_choices.py --groups distill,norm,quick --dataset ETTh1 --horizon 96 \\
        --threads 1 --no-progress

Each group trains every candidate of one setting at the budget of the original measurement and
records its validation MSE (best epoch, the one early stopping keeps) and, for reporting only,
its test MSE. The candidate with the lowest validation MSE is marked ``chosen``; test plays no
part in it. Groups:

* ``distill``: ``DistillConfig.fft_norm`` ("ortho" vs the authors' unscaled "backward") x
  ``feature_norm`` ("standardize" vs "none"), the student at ``training/configs/distill.toml``'s
  budget (L = 720, 10 epochs at most, patience 3), distilled from one PatchTST teacher: a small
  PatchTST (``SMALL_PATCHTST``, the quick pipeline's before this bench) at the quick pipeline's
  training budget, trained here first at L = 336 (the original measurement used the bench's full
  PatchTST, 44 minutes of training; this teacher takes under one);
* ``norm``: ``norm = "batch"`` vs ``"layer"`` for SimMTM and HiMTM, pretrained then fine-tuned
  at the teacher bench's budgets of the original measurement (``PRETRAIN_BUDGET``,
  ``FINETUNE_BUDGET``), and the same networks fine-tuned from scratch (``--norm-modes``);
* ``quick``: the quick pipeline's settings: its teacher (a PatchTST, either size, vs the three
  masked-pretraining teachers at one epoch of pretraining and one of fine-tuning, their mean
  forecast), the PatchTST size (``SMALL_PATCHTST`` vs ``patchtst.toml``'s model, both at the
  quick training budget) and the plain student's epochs (2 vs ``mlp.toml``'s 10, patience 3).

Writes ``bench/results/validation_choices.json`` (records merged by (group, setting,
candidate), so groups can run apart) and ``validation_choices.md``.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import torch  # noqa: E402
from runargs import train_overrides  # noqa: E402

from training.checkpoints import load_forecaster  # noqa: E402
from training.config import CONFIG_DIR, build_run_config, load_toml  # noqa: E402
from training.data import DataConfig, prepare  # noqa: E402
from training.distill import build_distill_config, run_distill  # noqa: E402
from training.engine import FitResult, metrics, predict  # noqa: E402
from training.pretrain import (  # noqa: E402
    FinetuneRunConfig,
    build_pretrain_config,
    run_finetune,
    run_pretrain,
)
from training.train import run_train  # noqa: E402

OURS = Path(__file__).resolve().parents[1] / "training" / "configs" / "distill-ours.toml"
"""Our form of the objective and student: these figures were measured with it."""

log = logging.getLogger("bench.validation_choices")

RESULTS = REPO / "bench" / "results"
KEY = ("group", "setting", "candidate")
QUICK = load_toml(CONFIG_DIR / "pipeline-quick.toml")
# The smaller PatchTST the quick pipeline used before this bench (non-overlapping patches: 21
# tokens, two layers): the distillation group's teacher, and a candidate of the quick group.
SMALL_PATCHTST: dict[str, Any] = {
    "patch_len": 16,
    "stride": 16,
    "d_model": 16,
    "n_heads": 4,
    "d_ff": 64,
    "n_layers": 2,
    "dropout": 0.2,
}
QUICK_PATCHTST_TRAIN: dict[str, Any] = QUICK["models"]["patchtst"]["train"]
TEACHER_LOOKBACK = 336
# The budgets of the original measurements (the teacher bench's TOMLs at commit 5e252fa), pinned
# here so that later changes to the TOMLs' schedules do not change this bench. Model settings
# (other than the candidate's) are the TOMLs' and are recorded with each result.
PRETRAIN_BUDGET: dict[str, dict[str, Any]] = {
    "simmtm": {"epochs": 6, "batch_size": 32, "max_train_batches": 30},
    "himtm": {"epochs": 10, "batch_size": 64, "max_train_batches": 50},
    "dmae": {"epochs": 6, "batch_size": 64, "max_train_batches": 30},
}
PRETRAIN_COMMON: dict[str, Any] = {
    "lr": 0.001,
    "lr_schedule": "cosine",
    "min_epochs": 0,
    "patience": 100,  # every epoch runs, as then
    "val_max_windows": 128,  # the pretext loss on 4 batches of 32 windows, as then
}
FINETUNE_BUDGET: dict[str, Any] = {
    "epochs": 5,
    "batch_size": 64,
    "lr": 0.001,
    "lr_schedule": "cosine",
    "patience": 2,
    "max_train_batches": 40,
}


def fit_record(result: FitResult, seconds: float, **extra: Any) -> dict[str, Any]:
    return {
        "val_mse": round(result.val["mse"], 5),
        "test_mse": round(result.test["mse"], 5),  # reported, never used to choose
        "epochs": result.epochs_run,
        "best_epoch": result.best_epoch,
        "seconds": round(seconds, 1),
        **extra,
    }


def timed(fn: Callable[[], FitResult]) -> tuple[FitResult, float]:
    t0 = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - t0


# --------------------------------------------------------------------------- runs


def quick_patchtst(args: argparse.Namespace, model: dict[str, Any], tag: str) -> dict[str, Any]:
    """PatchTST at the quick pipeline's training budget with the given model settings."""
    out = args.runs / f"{args.dataset}-patchtst-{tag}-L{TEACHER_LOOKBACK}-H{args.horizon}"
    cfg = build_run_config(
        "patchtst",
        data={"dataset": args.dataset, "lookback": TEACHER_LOOKBACK, "horizon": args.horizon},
        train={**QUICK_PATCHTST_TRAIN, **train_overrides(args, epochs=False)},
        model_settings=model,
        out_dir=str(out),
    )
    result, seconds = timed(lambda: run_train(cfg))
    return fit_record(result, seconds, run=str(out))


def teacher_dir(args: argparse.Namespace) -> Path:
    return args.runs / f"{args.dataset}-patchtst-small-L{TEACHER_LOOKBACK}-H{args.horizon}"


def ensure_teacher(args: argparse.Namespace) -> Path:
    """The small PatchTST (the distillation teacher and a quick-pipeline candidate)."""
    run = teacher_dir(args)
    if not (run / "run.json").exists() or "test" not in json.loads((run / "run.json").read_text()):
        quick_patchtst(args, SMALL_PATCHTST, "small")
    return run


def quick_record(
    setting: str, candidate: str, rec: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    return {"group": "quick", "setting": setting, "candidate": candidate, **common(args), **rec}


def common(args: argparse.Namespace) -> dict[str, Any]:
    return {"dataset": args.dataset, "horizon": args.horizon, "threads": args.threads}


def group_distill(args: argparse.Namespace) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    teacher = ensure_teacher(args)
    for fft_norm in ("ortho", "backward"):
        for feature_norm in ("standardize", "none"):
            name = f"fft_norm={fft_norm}, feature_norm={feature_norm}"
            out = args.runs / f"{args.dataset}-student-{fft_norm}-{feature_norm}-H{args.horizon}"
            cfg = build_distill_config(
                OURS,
                data={"dataset": args.dataset, "horizon": args.horizon},
                train=train_overrides(args, epochs=False),
                distill={
                    "teachers": (str(teacher),),
                    "fft_norm": fft_norm,
                    "feature_norm": feature_norm,
                },
                out_dir=str(out),
            )
            t0 = time.perf_counter()
            res = run_distill(cfg)
            rec = fit_record(
                res.fit,
                time.perf_counter() - t0,
                lookback=cfg.run.data.lookback,
                alpha=res.alpha,
                beta=res.beta,
                teacher=str(teacher),
                teacher_val_mse=res.target["val"]["mse"] if res.target else None,
                teacher_test_mse=res.target["test"]["mse"] if res.target else None,
            )
            records.append(
                {
                    "group": "distill",
                    "setting": "fft_norm x feature_norm",
                    "candidate": name,
                    **common(args),
                    **rec,
                }
            )
    return records


def pretrained_teacher(
    args: argparse.Namespace,
    method: str,
    tag: str,
    model: dict[str, Any],
    pretrain: dict[str, Any] | None = None,
    finetune: dict[str, Any] | None = None,
    scratch: bool = False,
) -> dict[str, Any]:
    """Pretrain (unless ``scratch``) then fine-tune ``method``: the TOML's settings, overridden by
    ``model`` / ``pretrain`` / ``finetune``; the model config used is recorded."""
    data = {"dataset": args.dataset, "lookback": TEACHER_LOOKBACK}
    base = f"{args.dataset}-{method}-{tag}-L{TEACHER_LOOKBACK}"
    t0 = time.perf_counter()
    init_from: str | None = None
    if not scratch:
        pre = build_pretrain_config(
            method,
            data=data,
            pretrain={**(pretrain or {}), **train_overrides(args, epochs=False)},
            model_settings=model,
            out_dir=str(args.runs / f"{base}-pretrain"),
        )
        run_pretrain(pre)
        init_from = str(args.runs / f"{base}-pretrain")
    out = args.runs / f"{base}-H{args.horizon}"
    run = build_run_config(
        method,
        data={**data, "horizon": args.horizon},
        train={**(finetune or {}), **train_overrides(args, epochs=False)},
        model_settings=model,
        out_dir=str(out),
    )
    result = run_finetune(FinetuneRunConfig(run, init_from))
    used = json.loads((out / "run.json").read_text())
    return fit_record(
        result,
        time.perf_counter() - t0,
        run=str(out),
        model_config=used.get("model_config"),
        train_config=used.get("train"),
    )


def group_norm(args: argparse.Namespace) -> list[dict[str, Any]]:
    records = []
    for method in ("simmtm", "himtm"):
        for scratch in (m == "scratch" for m in args.norm_modes.split(",")):
            for norm in ("batch", "layer"):
                tag = f"{norm}{'-scratch' if scratch else ''}"
                rec = pretrained_teacher(
                    args,
                    method,
                    tag,
                    {"norm": norm},
                    pretrain={**PRETRAIN_COMMON, **PRETRAIN_BUDGET[method]},
                    finetune=FINETUNE_BUDGET,
                    scratch=scratch,
                )
                how = "from scratch" if scratch else "pretrained + fine-tuned"
                records.append(
                    {
                        "group": "norm",
                        "setting": f"{method} norm ({how})",
                        "candidate": f"norm={norm}",
                        **common(args),
                        **rec,
                    }
                )
    return records


def ensemble_scores(args: argparse.Namespace, runs: list[Path]) -> dict[str, float]:
    """Validation and test MSE of the mean forecast of ``runs`` (the served ensemble's rule)."""
    data = prepare(DataConfig(args.dataset, lookback=TEACHER_LOOKBACK, horizon=args.horizon))
    out: dict[str, float] = {}
    for split in ("val", "test"):
        preds = []
        true = torch.empty(0)
        for run in runs:
            model, _ = load_forecaster(run)
            pred, true = predict(model, data.splits[split])
            preds.append(pred)
        out[f"{split}_mse"] = round(
            metrics(torch.stack(preds).mean(dim=0), true, data.scaler)["mse"], 5
        )
    return out


DEFAULT_TEACHER = "patchtst, default size (pretrained = [])"
SMALL_TEACHER = "patchtst, small (pretrained = [])"
DEFAULT_SIZE = "default (patchtst.toml [model]: patches 16/8, 3 layers)"
SMALL_SIZE = "small (patches 16/16, 2 layers, d_ff 64, dropout 0.2)"


def group_quick(args: argparse.Namespace) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    ensure_teacher(args)
    small = json.loads((teacher_dir(args) / "run.json").read_text())
    small_rec = {
        "val_mse": round(small["val"]["mse"], 5),
        "test_mse": round(small["test"]["mse"], 5),
        "epochs": small["summary"]["epochs"],
        "best_epoch": small["summary"]["best_epoch"],
        "seconds": round(small["summary"]["train_seconds"], 1),
        "run": str(teacher_dir(args)),
    }
    default_model = load_toml(CONFIG_DIR / "patchtst.toml")["model"]
    default_rec = quick_patchtst(args, {k: default_model[k] for k in SMALL_PATCHTST}, "default")
    # Teacher: a PatchTST (either size) vs the three masked-pretraining teachers, quick budgets.
    records.append(quick_record("teacher", DEFAULT_TEACHER, default_rec, args))
    records.append(quick_record("teacher", SMALL_TEACHER, small_rec, args))
    members, seconds = [], 0.0
    for method in ("simmtm", "himtm", "dmae"):
        rec = pretrained_teacher(
            args,
            method,
            "quick",
            {},
            pretrain={**PRETRAIN_COMMON, **PRETRAIN_BUDGET[method], "epochs": 1},
            finetune={**FINETUNE_BUDGET, "epochs": 1},
        )
        seconds += rec["seconds"]
        members.append(Path(rec["run"]))
        records.append(quick_record("teacher (members)", f"{method} 1+1 epochs", rec, args))
    ens = ensemble_scores(args, members)
    records.append(
        quick_record(
            "teacher",
            "simmtm+himtm+dmae mean, 1+1 epochs each (pretrained = all three)",
            {**ens, "seconds": round(seconds, 1)},
            args,
        )
    )
    # PatchTST size at the quick training budget.
    records.append(quick_record("patchtst size", DEFAULT_SIZE, default_rec, args))
    records.append(quick_record("patchtst size", SMALL_SIZE, small_rec, args))
    # The plain student's epochs (what the quick pipeline trained alone when distill was missing).
    for epochs, patience in ((2, 2), (10, 3)):
        out = args.runs / f"{args.dataset}-mlp-e{epochs}-L{TEACHER_LOOKBACK}-H{args.horizon}"
        cfg = build_run_config(
            "mlp",
            data={"dataset": args.dataset, "lookback": TEACHER_LOOKBACK, "horizon": args.horizon},
            train={"epochs": epochs, "patience": patience, **train_overrides(args, epochs=False)},
            out_dir=str(out),
        )
        result, secs = timed(lambda cfg=cfg: run_train(cfg))  # type: ignore[misc]
        records.append(
            quick_record(
                "mlp epochs",
                f"epochs={epochs}, patience={patience}",
                fit_record(result, secs, run=str(out)),
                args,
            )
        )
    return records


GROUPS: dict[str, Callable[[argparse.Namespace], list[dict[str, Any]]]] = {
    "distill": group_distill,
    "norm": group_norm,
    "quick": group_quick,
}


# --------------------------------------------------------------------------- results


def load_records(path: Path) -> list[dict[str, Any]]:
    return json.loads(path.read_text()) if path.exists() else []


def merge(records: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    keys = {tuple(r[k] for k in KEY) for r in new}
    kept = [r for r in records if tuple(r[k] for k in KEY) not in keys]
    return [*kept, *new]


def mark_chosen(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``chosen``: the lowest validation MSE within each (group, setting); test is not read.
    Settings named ``... (members)`` list the parts of a candidate and choose nothing."""
    out = [dict(r) for r in records]
    for key in {(r["group"], r["setting"]) for r in out}:
        rows = [r for r in out if (r["group"], r["setting"]) == key]
        if key[1].endswith("(members)"):
            for r in rows:
                r["chosen"] = False
            continue
        winner = min(rows, key=lambda r: r["val_mse"])
        for r in rows:
            r["chosen"] = r is winner and len(rows) > 1
    return out


def write_markdown(records: list[dict[str, Any]], path: Path) -> None:
    lines = [
        "# Settings chosen on the validation split",
        "",
        "Reproduce: `python bench/validation_choices.py --groups distill,norm,quick --dataset "
        "ETTh1 --horizon 96 --threads 1 --no-progress` (budgets in the script's docstring).",
        "Within each setting the candidate with the lowest **validation** MSE is chosen (bold);",
        "test MSE is reported beside it and plays no part in the choice. One seed per candidate.",
        "",
        "| group | setting | candidate | val MSE | test MSE | epochs (best) | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in records:
        cand = f"**{r['candidate']}**" if r.get("chosen") else r["candidate"]
        epochs = f"{r['epochs']} ({r['best_epoch']})" if "epochs" in r else ""
        lines.append(
            f"| {r['group']} | {r['setting']} | {cand} | {r['val_mse']:.4f} | "
            f"{r['test_mse']:.4f} | {epochs} | {r['seconds']} |"
        )
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--groups", default="distill,norm,quick")
    p.add_argument("--dataset", default="ETTh1")
    p.add_argument("--horizon", type=int, default=96)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--norm-modes",
        default="pretrained,scratch",
        help="norm group: pretrained (+ fine-tuned) and/or scratch (the same network untrained)",
    )
    p.add_argument("--runs", type=Path, default=REPO / "runs" / "validation_choices")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    groups = args.groups.split(",")
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        p.error(f"unknown group(s) {unknown}; known: {sorted(GROUPS)}")
    torch.set_num_threads(args.threads)
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / "validation_choices.json"
    for group in groups:
        new = GROUPS[group](args)
        # Groups may run in separate processes at once: merge under a lock.
        with (args.results / "validation_choices.lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            records = mark_chosen(merge(load_records(out), new))
            out.write_text(json.dumps(records, indent=2) + "\n")
            write_markdown(records, args.results / "validation_choices.md")
        for r in new:
            print(json.dumps(r), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
