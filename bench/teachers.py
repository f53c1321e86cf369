"""Teachers at the papers' budgets: masked pretraining, then fine-tuning, one resumable run each.

Every (method, dataset) pretraining and every (cell, init, seed) fine-tuning is its own run
folder under ``--work`` (default ``bench/checkpoints``, committed: the encoders and the resume
state of unfinished runs are small and let a later session continue where this one stopped).
Runs resume (``last.pt``); a finished run is skipped. Each finished fine-tuning appends one record
to ``bench/results/teachers.json``.

    python bench/teachers.py pretrain --datasets ETTh1,ETTh2 --methods himtm,dmae,simmtm \\
        --threads 2 --time-limit 3600

``--time-limit`` stops between epochs once that many seconds have passed (the run stays
resumable), so a job never outlives the session that started it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from training.config import default_config_path  # noqa: E402
from training.pretrain import build_pretrain_config, run_pretrain  # noqa: E402

log = logging.getLogger("bench.teachers")
WORK = REPO / "bench" / "checkpoints"
DATA_DIR = REPO.parent / "shared" / "data"


def config_for(method: str, dataset: str) -> Path:
    """The method's TOML, or its per-dataset one (``simmtm-etth2.toml``) when there is one."""
    specific = default_config_path(f"{method}-{dataset.lower()}")
    return specific if specific.exists() else default_config_path(method)


def pretrain_dir(work: Path, method: str, dataset: str, lookback: int) -> Path:
    return work / f"{dataset}-{method}-L{lookback}-pretrain"


def cmd_pretrain(a: argparse.Namespace) -> list[dict[str, Any]]:
    started = time.monotonic()
    done = []
    for dataset in a.datasets.split(","):
        for method in a.methods.split(","):
            left = None if a.time_limit is None else a.time_limit - (time.monotonic() - started)
            if left is not None and left <= 0:
                log.info("time limit reached before %s %s", method, dataset)
                return done
            out = pretrain_dir(a.work, method, dataset, a.lookback)
            cfg = build_pretrain_config(
                method,
                config_for(method, dataset),
                data={"dataset": dataset, "data_dir": str(a.data_dir), "lookback": a.lookback},
                pretrain={
                    "threads": a.threads,
                    "progress": not a.no_progress,
                    "time_limit_s": left,
                },
                out_dir=str(out),
                resume=True,
            )
            result = run_pretrain(cfg)
            summary = {"method": method, "dataset": dataset, **result.summary()}
            log.info("%s", json.dumps(summary))
            done.append(summary)
            if not result.loop.finished:
                return done
    return done


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    pre = sub.add_parser("pretrain", help="masked pretraining of each method on each dataset")
    pre.add_argument("--methods", default="himtm,dmae,simmtm")
    for q in (pre,):
        q.add_argument("--datasets", default="ETTh1,ETTh2")
        q.add_argument("--lookback", type=int, default=336)
        q.add_argument("--data-dir", type=Path, default=DATA_DIR)
        q.add_argument("--work", type=Path, default=WORK)
        q.add_argument("--threads", type=int, default=2)
        q.add_argument("--time-limit", type=float, default=None, help="seconds for this invocation")
        q.add_argument("--no-progress", action="store_true")
    pre.set_defaults(handler=cmd_pretrain)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    a.handler(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
