"""Accuracy benchmark: train and evaluate named models on named datasets and horizons.

    python bench/accuracy.py --models mlp,patchtst --datasets ETTh1,ETTh2 --horizons 96

Writes ``bench/results/accuracy.json`` (a list of records, merged by (dataset, model, lookback,
horizon) with what is already there, so runs can be split) and ``bench/results/accuracy.md``,
which puts the published figures from METHODS.md beside ours. Test metrics follow the standard
protocol: z-scored with train statistics, every test window, no dropped last batch.
"""

from __future__ import annotations

import argparse
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

from runargs import train_overrides  # noqa: E402

from training.config import build_run_config  # noqa: E402
from training.engine import count_params  # noqa: E402
from training.models import MODELS  # noqa: E402
from training.train import run_train  # noqa: E402

RESULTS = REPO / "bench" / "results"
KEY = ("dataset", "model", "lookback", "horizon")

# Test MSE / MAE published in the papers (METHODS.md), labelled as such in the table. Peers we
# run ourselves appear only where a bench measures them in the same run, never typed in here.
PUBLISHED: dict[tuple[str, int], list[tuple[str, float, float]]] = {
    ("ETTh1", 96): [
        ("PatchTST/64 (L=512, published)", 0.370, 0.400),
        ("DLinear (L=336, published)", 0.375, 0.399),
    ],
    ("ETTh2", 96): [
        ("PatchTST/64 (L=512, published)", 0.274, 0.337),
        ("DLinear (L=336, published)", 0.289, 0.353),
    ],
}

Recipe = Callable[[argparse.Namespace, str, int], dict[str, Any]]


def supervised(model: str) -> Recipe:
    """Plain supervised training of one model in the dict with its TOML defaults."""

    def run(args: argparse.Namespace, dataset: str, horizon: int) -> dict[str, Any]:
        train = train_overrides(args)
        cfg = build_run_config(
            model,
            data={"dataset": dataset, "lookback": args.lookback, "horizon": horizon},
            train=train,
            out_dir=str(args.runs / f"{dataset}-{model}-L{args.lookback}-H{horizon}"),
        )
        t0 = time.perf_counter()
        result = run_train(cfg)
        from training.models import build_model

        params = count_params(
            build_model(model, lookback=args.lookback, horizon=horizon, **cfg.model_settings)
        )
        return {
            **result.test_record(),
            "params": params,
            "train_seconds": round(result.train_seconds, 1),
            "wall_seconds": round(time.perf_counter() - t0, 1),
            "epochs": result.epochs_run,
            "best_epoch": result.best_epoch,
        }

    return run


RECIPES: dict[str, Recipe] = {name: supervised(name) for name in MODELS}

# Other recipe families (teachers, distilled students) live in their own modules beside this one,
# each exposing ``RECIPES: dict[str, Recipe]`` with the record names the issues fix, and
# optionally ``markdown_notes(records) -> list[str]``: lines appended to ``accuracy.md``.
NOTES: list[Callable[[list[dict[str, Any]]], list[str]]] = []
for _module in ("accuracy_teachers", "accuracy_distill"):
    try:
        _mod = __import__(_module)
    except ModuleNotFoundError as _exc:
        if _exc.name != _module:
            raise
        continue
    RECIPES.update(_mod.RECIPES)
    if hasattr(_mod, "markdown_notes"):
        NOTES.append(_mod.markdown_notes)


def load_records(path: Path) -> list[dict[str, Any]]:
    return json.loads(path.read_text()) if path.exists() else []


def merge(records: list[dict[str, Any]], new: dict[str, Any]) -> list[dict[str, Any]]:
    kept = [r for r in records if tuple(r.get(k) for k in KEY) != tuple(new[k] for k in KEY)]
    return sorted([*kept, new], key=lambda r: (r["dataset"], r["horizon"], r["model"]))


def write_markdown(records: list[dict[str, Any]], path: Path) -> None:
    lines = [
        "# Accuracy (test split, z-scored, standard protocol): quick budget",
        "",
        "Reproduce: `python bench/accuracy.py` (see `bench/README.md` for the exact runs).",
        "",
        "**Quick (toy-scale) budget, one seed.** The teacher, ensemble and student rows here were",
        "trained when pretraining was capped at 30 batches per epoch for 6-10 epochs and",
        "fine-tuning at 200 steps or fewer (`pretrain_epochs`, `epochs` in `accuracy.json`); they",
        "are kept as the quick pipeline's reference, not as the methods' results. Teachers at the",
        "papers' budgets, three seeds each, are in `teachers.md` (`bench/teachers.py`).",
        "",
        "| dataset | H | model | L | MSE | MAE | params | train s | epochs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    groups = sorted({(r["dataset"], r["horizon"]) for r in records})
    for dataset, horizon in groups:
        for r in (r for r in records if (r["dataset"], r["horizon"]) == (dataset, horizon)):
            lines.append(
                f"| {dataset} | {horizon} | {r['model']} | {r['lookback']} | {r['mse']:.4f} | "
                f"{r['mae']:.4f} | {r['params']:,} | {r['train_seconds']} | {r['epochs']} |"
            )
        for name, mse, mae in PUBLISHED.get((dataset, horizon), []):
            lines.append(f"| {dataset} | {horizon} | *{name}* | | {mse:.3f} | {mae:.3f} | | | |")
    for notes in NOTES:
        lines += notes(records)
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default="mlp,patchtst")
    p.add_argument("--datasets", default="ETTh1,ETTh2")
    p.add_argument("--horizons", default="96")
    p.add_argument("--lookback", type=int, default=336)
    p.add_argument("--epochs", type=int, default=None, help="override the TOML epochs")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--runs", type=Path, default=REPO / "runs" / "bench")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    models = args.models.split(",")
    unknown = [m for m in models if m not in RECIPES]
    if unknown:
        p.error(f"unknown model(s) {unknown}; known: {sorted(RECIPES)}")
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / "accuracy.json"
    for dataset in args.datasets.split(","):
        for horizon in (int(h) for h in args.horizons.split(",")):
            for model in models:
                metrics = RECIPES[model](args, dataset, horizon)
                record = {
                    "dataset": dataset,
                    "model": model,
                    "lookback": args.lookback,
                    "horizon": horizon,
                    **metrics,
                }
                records = merge(load_records(out), record)
                out.write_text(json.dumps(records, indent=2) + "\n")
                write_markdown(records, args.results / "accuracy.md")
                print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
