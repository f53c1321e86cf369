"""Teacher recipes for ``bench/accuracy.py``: masked pretraining + fine-tuning, scratch, ensemble.

Records (per dataset and horizon):

* ``simmtm``, ``himtm``, ``dmae``: pretrain the encoder on the train split's look-back windows
  (once per dataset: both horizons share ``runs/bench/<dataset>-<method>-L<L>-pretrain``), then
  fine-tune to forecast in ``runs/bench/<dataset>-<method>-L<L>-H<H>``;
* ``<method>-scratch``: the same network and the same fine-tuning schedule from random weights,
  in ``runs/bench/<dataset>-<method>-scratch-L<L>-H<H>``;
* ``ensemble``: the mean forecast of the three pretrained teachers (loaded from their runs).

Settings come from ``training/configs/<method>.toml`` (``[pretrain]`` and ``[train]``); the bench's
``--epochs`` overrides the fine-tuning epochs only. ``train_seconds`` of a pretrained teacher is
its pretraining plus its fine-tuning (the pretraining is counted in both horizons' records).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from runargs import train_overrides

from training.checkpoints import load_forecaster
from training.config import build_run_config
from training.data import DataConfig, prepare
from training.engine import metrics, predict
from training.pretrain import (
    META_FILE,
    METHODS,
    CheckpointError,
    FinetuneRunConfig,
    build_pretrain_config,
    pretrain_matches,
    run_finetune,
    run_pretrain,
)

log = logging.getLogger("bench.teachers")

Recipe = Callable[[argparse.Namespace, str, int], dict[str, Any]]


def _pretrain(args: argparse.Namespace, dataset: str, method: str) -> tuple[Path, float, int]:
    """The method's pretraining folder for this dataset: reused when finished with the same
    settings, resumed when interrupted, run afresh otherwise. Returns (folder, seconds, epochs)."""
    pretrain = train_overrides(args, epochs=False)  # --epochs is the fine-tuning's
    out = args.runs / f"{dataset}-{method}-L{args.lookback}-pretrain"
    settings: dict[str, Any] = {
        "data": {"dataset": dataset, "lookback": args.lookback},
        "pretrain": pretrain,
        "out_dir": str(out),
    }
    cfg = build_pretrain_config(method, **settings, resume=True)
    if pretrain_matches(cfg):
        log.info("reusing the finished pretraining in %s", out)
    else:
        try:
            run_pretrain(cfg)
        except CheckpointError as exc:  # a stale folder from other settings
            log.warning("%s; pretraining afresh", exc)
            run_pretrain(build_pretrain_config(method, **settings))
    meta = json.loads((out / META_FILE).read_text())
    return out, float(meta["seconds"]), len(meta["history"])


def _finetune(
    args: argparse.Namespace, dataset: str, horizon: int, method: str, init_from: Path | None
) -> dict[str, Any]:
    train = train_overrides(args)
    tag = "" if init_from else "-scratch"
    run = build_run_config(
        method,
        data={"dataset": dataset, "lookback": args.lookback, "horizon": horizon},
        train=train,
        out_dir=str(args.runs / f"{dataset}-{method}{tag}-L{args.lookback}-H{horizon}"),
    )
    result = run_finetune(FinetuneRunConfig(run, str(init_from) if init_from else None))
    params = json.loads((result.out_dir / "run.json").read_text())["params"]
    return {
        **result.test_record(),
        "params": params,
        "finetune_seconds": round(result.train_seconds, 1),
        "epochs": result.epochs_run,
        "best_epoch": result.best_epoch,
    }


def pretrained(method: str) -> Recipe:
    def run(args: argparse.Namespace, dataset: str, horizon: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        folder, pre_seconds, pre_epochs = _pretrain(args, dataset, method)
        record = _finetune(args, dataset, horizon, method, folder)
        return {
            **record,
            "train_seconds": round(pre_seconds + record["finetune_seconds"], 1),
            "pretrain_seconds": round(pre_seconds, 1),
            "pretrain_epochs": pre_epochs,
            "wall_seconds": round(time.perf_counter() - t0, 1),
        }

    return run


def scratch(method: str) -> Recipe:
    def run(args: argparse.Namespace, dataset: str, horizon: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        record = _finetune(args, dataset, horizon, method, None)
        return {
            **record,
            "train_seconds": record["finetune_seconds"],
            "pretrain_seconds": 0.0,
            "wall_seconds": round(time.perf_counter() - t0, 1),
        }

    return run


def ensemble(args: argparse.Namespace, dataset: str, horizon: int) -> dict[str, Any]:
    """Mean forecast of the three pretrained + fine-tuned teachers (trained first if missing)."""
    t0 = time.perf_counter()
    data = prepare(DataConfig(dataset, lookback=args.lookback, horizon=horizon))
    test = data.splits["test"]
    preds, members = [], []
    params = 0
    pre_seconds = ft_seconds = 0.0
    for method in sorted(METHODS):
        run_dir = args.runs / f"{dataset}-{method}-L{args.lookback}-H{horizon}"
        if not (run_dir / "best.safetensors").exists():
            log.info("ensemble member %s missing: training it", run_dir)
            pretrained(method)(args, dataset, horizon)
        model, run = load_forecaster(run_dir)
        pred, true = predict(model, test)
        preds.append(pred)
        members.append({"model": method, "mse": round(run["test"]["mse"], 5)})
        params += int(run["params"])
        pre_seconds += float(run.get("pretrain_seconds") or 0.0)
        ft_seconds += float(run["summary"]["train_seconds"])
    m = metrics(torch.stack(preds).mean(dim=0), true, data.scaler)
    return {
        "mse": round(m["mse"], 5),
        "mae": round(m["mae"], 5),
        "mse_raw": round(m["mse_raw"], 5),
        "mae_raw": round(m["mae_raw"], 5),
        "params": params,
        "train_seconds": round(pre_seconds + ft_seconds, 1),
        "pretrain_seconds": round(pre_seconds, 1),
        "finetune_seconds": round(ft_seconds, 1),
        "epochs": 0,
        "members": members,
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }


RECIPES: dict[str, Recipe] = {
    **{method: pretrained(method) for method in sorted(METHODS)},
    **{f"{method}-scratch": scratch(method) for method in sorted(METHODS)},
    "ensemble": ensemble,
}


def markdown_notes(records: list[dict[str, Any]]) -> list[str]:
    """A section of ``accuracy.md``: did pretraining help; does the ensemble beat its members."""
    by_key = {(r["dataset"], r["horizon"], r["model"]): r for r in records}
    rows = []
    for (dataset, horizon, model), r in sorted(by_key.items()):
        base = by_key.get((dataset, horizon, f"{model}-scratch"))
        if model not in METHODS or base is None:
            continue
        change = (r["mse"] - base["mse"]) / base["mse"] * 100
        verdict = "helped" if r["mse"] < base["mse"] else "**did not help**"
        rows.append(
            f"| {dataset} | {horizon} | {model} | {r['mse']:.4f} | {base['mse']:.4f} | "
            f"{change:+.1f}% | {verdict} | {r.get('pretrain_seconds', '')} | "
            f"{r.get('finetune_seconds', '')} |"
        )
    ens_rows, ens_mse, best_mse = [], [], []
    for (dataset, horizon, model), r in sorted(by_key.items()):
        if model != "ensemble":
            continue
        member = [by_key[(dataset, horizon, m)] for m in METHODS if (dataset, horizon, m) in by_key]
        if not member:
            continue
        best = min(member, key=lambda x: x["mse"])
        ens_mse.append(r["mse"])
        best_mse.append(best["mse"])
        verdict = "better" if r["mse"] <= best["mse"] else "**worse**"
        ens_rows.append(
            f"| {dataset} | {horizon} | {r['mse']:.4f} | {best['model']} {best['mse']:.4f} | "
            f"{verdict} |"
        )
    if not rows and not ens_rows:
        return []
    lines = ["", "## Masked pretraining vs the same network from scratch", ""]
    if rows:
        lines += [
            "Same architecture and fine-tuning schedule; the only difference is the encoder's "
            "starting point. Negative change = pretraining lowered the test MSE.",
            "",
            "| dataset | H | method | pretrained MSE | scratch MSE | change | pretraining | "
            "pretrain s | finetune s |",
            "|---|---|---|---|---|---|---|---|---|",
            *rows,
        ]
        helped = sum("| helped |" in row for row in rows)
        lines += ["", f"Pretraining helped in {helped} of {len(rows)} cases."]
    if ens_rows:
        lines += [
            "",
            "| dataset | H | ensemble MSE | best member | ensemble vs best |",
            "|---|---|---|---|---|",
            *ens_rows,
            "",
            f"Mean over these {len(ens_rows)} cases: ensemble "
            f"{sum(ens_mse) / len(ens_mse):.4f}, best member {sum(best_mse) / len(best_mse):.4f}.",
        ]
    return lines
