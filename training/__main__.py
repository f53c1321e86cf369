"""``python -m training <command>``: thin CLI over importable run functions.

Each subcommand turns its flags into config dataclasses and calls one ``run_*`` function; the
last line printed to stdout is a JSON object with the result, so scripts can parse it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from training.data import DataError


def add_data_args(p: argparse.ArgumentParser, horizon: bool = True) -> None:
    p.add_argument("--dataset", default="ETTh1", help="catalogue name (ETTh1, ...) or a CSV path")
    p.add_argument("--data-dir", default=None, help="folder holding the catalogue's files")
    p.add_argument("--lookback", type=int, default=None, help="input length L (default 336)")
    if horizon:
        p.add_argument("--horizon", type=int, default=None, help="forecast length H (default 96)")
    p.add_argument("--features", choices=["M", "S"], default=None, help="multi- or univariate")
    p.add_argument("--target", default=None, help="target column for --features S")
    p.add_argument("--date-column", default=None, help="name of the timestamp column")


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--patience", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--max-train-batches", type=int, default=None, help="cap batches per epoch")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--config", type=Path, default=None, help="TOML with [data] [model] [train]")
    p.add_argument("--out", default=None, help="output folder for checkpoints and run.json")


def data_overrides(a: argparse.Namespace) -> dict[str, Any]:
    keys = ("dataset", "data_dir", "lookback", "horizon", "features", "target", "date_column")
    return {k: getattr(a, k) for k in keys if getattr(a, k, None) is not None}


def train_overrides(a: argparse.Namespace) -> dict[str, Any]:
    keys = ("epochs", "batch_size", "lr", "patience", "seed", "threads", "max_train_batches")
    values = {k: getattr(a, k) for k in keys if getattr(a, k, None) is not None}
    if getattr(a, "no_progress", False):
        values["progress"] = False
    return values


def cmd_train(a: argparse.Namespace) -> dict[str, Any]:
    from training.config import build_run_config
    from training.train import run_train

    cfg = build_run_config(a.model, a.config, data_overrides(a), train_overrides(a), out_dir=a.out)
    result = run_train(cfg)
    return {
        "model": cfg.model,
        "dataset": cfg.data.dataset,
        "lookback": cfg.data.lookback,
        "horizon": cfg.data.horizon,
        **result.summary(),
        "checkpoint": str(result.out_dir / "best.safetensors"),
    }


def build_parser() -> argparse.ArgumentParser:
    from training.models import MODELS

    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="supervised training of one model on one dataset")
    p.add_argument("--model", required=True, choices=sorted(MODELS))
    add_data_args(p)
    add_train_args(p)
    p.set_defaults(handler=cmd_train)

    for module in CLI_MODULES:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:  # a real missing dependency, not a module yet to come
                raise
            continue
        mod.add_cli(sub)
    return parser


# Modules that add subcommands: each defines ``add_cli(subparsers)`` whose parsers set
# ``handler=fn(args) -> dict`` (the dict is printed as the final JSON line).
CLI_MODULES = (
    "training.pretrain",  # pretrain, finetune
    "training.distill",  # distill
    "training.export",  # export
    "training.pipeline",  # pipeline
)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        result = args.handler(args)
    except (DataError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "interrupted; the last finished epoch is saved (resume with the same --out)",
            file=sys.stderr,
        )
        return 130
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
