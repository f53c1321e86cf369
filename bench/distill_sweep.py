"""Distillation weights chosen on validation: the ensemble student over an (alpha, beta) grid.

    python bench/distill_sweep.py --dataset ETTh1 --horizon 96 --lookbacks 336,720 \\
        --grid 2:2,2:0.5,1:1,0.5:0.5

TimeDistill's per-dataset alpha/beta (METHODS.md: ETTh1 2/2, ...) were tuned for an iTransformer
teacher; ours are the masked-pretraining ensemble. This trains ``student-ensemble`` (the
distillation settings of ``training/configs/distill.toml``, teachers from ``--runs``) for every
lookback and (alpha, beta) of the grid, and marks the one with the lowest *validation* MSE: the
test MSE is reported for every point but never used to choose. Writes
``bench/results/distill_sweep.json`` (``{"meta", "records"}``, one record per point with
``lookback, alpha, beta, val_mse, mse, mae, train_seconds, selected``) and ``distill_sweep.md``.
The teachers are run once per process and reused by every point (``training.distill`` memoises
their passes).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from runargs import train_overrides  # noqa: E402

from training.distill import DATASET_DEFAULTS, build_distill_config, run_distill  # noqa: E402

OURS = Path(__file__).resolve().parents[1] / "training" / "configs" / "distill-ours.toml"
"""Our form of the objective and student: these figures were measured with it."""

RESULTS = REPO / "bench" / "results"


def parse_grid(text: str) -> list[tuple[float, float]]:
    points = []
    for item in text.split(","):
        alpha, sep, beta = item.partition(":")
        if not sep:
            raise argparse.ArgumentTypeError(f"grid point {item!r} is not ALPHA:BETA")
        points.append((float(alpha), float(beta)))
    return points


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", default="ETTh1")
    p.add_argument("--horizon", type=int, default=96)
    p.add_argument("--lookbacks", default="336,720")
    p.add_argument("--grid", type=parse_grid, default=parse_grid("2:2,2:0.5,1:1,0.5:0.5"))
    p.add_argument("--teachers", default="simmtm,himtm,dmae")
    p.add_argument("--runs", type=Path, default=REPO / "runs" / "bench")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    teachers = tuple(t.strip() for t in args.teachers.split(",") if t.strip())
    train = train_overrides(args)
    records: list[dict[str, Any]] = []
    for lookback in (int(v) for v in args.lookbacks.split(",")):
        for alpha, beta in args.grid:
            name = f"{args.dataset}-student-L{lookback}-H{args.horizon}-a{alpha:g}-b{beta:g}"
            cfg = build_distill_config(
                OURS,
                data={"dataset": args.dataset, "lookback": lookback, "horizon": args.horizon},
                train=train,
                distill={
                    "teachers": teachers,
                    "teacher_dir": str(args.runs),
                    "alpha": alpha,
                    "beta": beta,
                },
                out_dir=str(args.runs / "sweep" / name),
            )
            result = run_distill(cfg)
            record = {
                "dataset": args.dataset,
                "horizon": args.horizon,
                "lookback": lookback,
                "alpha": alpha,
                "beta": beta,
                "val_mse": round(result.fit.val["mse"], 5),
                **result.fit.test_record(),
                "train_seconds": round(result.fit.train_seconds, 1),
                "epochs": result.fit.epochs_run,
                "best_epoch": result.fit.best_epoch,
                "teacher_target_mse": round(result.target["test"]["mse"], 5)
                if result.target
                else None,
            }
            records.append(record)
            print(json.dumps(record), flush=True)
    best = min(records, key=lambda r: r["val_mse"])
    for r in records:
        r["selected"] = r is best
    default = DATASET_DEFAULTS.get(args.dataset.lower())
    meta = {
        "dataset": args.dataset,
        "horizon": args.horizon,
        "teachers": list(teachers),
        "paper_default_alpha_beta": list(default) if default else None,
        "selection": "lowest validation MSE; test MSE reported, never used to choose",
        "settings": "training/configs/distill.toml ([train], [distill]) with alpha/beta set",
    }
    args.results.mkdir(parents=True, exist_ok=True)
    out = {"meta": meta, "records": records}
    (args.results / "distill_sweep.json").write_text(json.dumps(out, indent=2) + "\n")
    write_markdown(meta, records, args.results / "distill_sweep.md")
    return 0


def write_markdown(meta: dict[str, Any], records: list[dict[str, Any]], path: Path) -> None:
    lines = [
        f"# Ensemble student: (alpha, beta) chosen on validation, {meta['dataset']} "
        f"H={meta['horizon']}",
        "",
        f"Teachers {', '.join(meta['teachers'])}; paper default (alpha, beta) = "
        f"{meta['paper_default_alpha_beta']}. Selection: {meta['selection']}. "
        "Reproduce: `python bench/distill_sweep.py` (see `bench/README.md`).",
        "",
        "| L | alpha | beta | val MSE | test MSE | test MAE | train s | selected |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(
            f"| {r['lookback']} | {r['alpha']:g} | {r['beta']:g} | {r['val_mse']:.4f} | "
            f"{r['mse']:.4f} | {r['mae']:.4f} | {r['train_seconds']} | "
            f"{'**yes**' if r['selected'] else ''} |"
        )
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
