"""Scale-out batch scoring: `python -m service.batch_job --model NAME --mode fast ...`.

Reads series (Parquet or CSV, long or wide layout), scores them on Ray Data with the service's
inference core, writes forecasts as a Parquet dataset and per-series failures to an errors file.
See `service.batch` for the layouts and the pipeline.

    python -m service.batch_job --model etth1-h96 --mode fast \\
        --input series.parquet --output forecasts.parquet --level 80 --level 95

Exit status: 0 when the job ran (even if some series failed: see the errors file), 2 for input
the job cannot run on (missing file, unknown model, bad layout or option).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from service.batch import JobError


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _level(text: str) -> float:
    value = float(text)
    if not 0 < value < 100:
        raise argparse.ArgumentTypeError(f"a level is a percentage in (0, 100), got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m service.batch_job",
        description="Score many series on Ray Data with a registry model (fast: student, "
        "accurate: teacher ensemble); forecasts -> Parquet, failures -> errors file.",
        epilog="Long layout: one row per (unique_id, ds) with one column per channel. Wide "
        "layout: a ds (or date) column and one column per univariate series; forecasts come "
        "back long, value column y. Intervals: <col>-lo-<level> and <col>-hi-<level>.",
    )
    p.add_argument("--model", required=True, help="NAME, NAME@ALIAS or NAME@VERSION")
    p.add_argument("--mode", required=True, choices=("fast", "accurate"))
    p.add_argument("--input", required=True, help="Parquet or CSV file, or a directory of them")
    p.add_argument("--output", required=True, help="forecasts: a Parquet dataset directory")
    p.add_argument("--errors", help="per-series failures (.parquet or .csv; default: "
                   "<output>-errors.parquet)")
    p.add_argument("--registry", default="./var/registry", help="registry root directory")
    p.add_argument("--format", dest="layout", choices=("long", "wide"),
                   help="input layout (default: long when the input has the id column)")
    p.add_argument("--id-col", default="unique_id")
    p.add_argument("--time-col", help="default: ds, else date")
    p.add_argument("--value-col", action="append", default=[], dest="value_cols",
                   help="channel (long) or series (wide) column; repeat; default: all numeric")
    p.add_argument("--horizon", type=_positive_int, help="default: the model's horizon")
    p.add_argument("--level", type=_level, action="append", default=[], dest="levels",
                   help="interval level in percent; repeat for several")
    p.add_argument("--address", help="Ray cluster: ray://head:10001 (Ray Client, needs "
                   "ray[client]) or head:6379 (GCS); default: a local Ray")
    p.add_argument("--num-cpus", type=_positive_int, help="CPUs of the local Ray instance")
    p.add_argument("--object-store-mb", type=_positive_int, help="local Ray object store size")
    p.add_argument("--actors", type=_positive_int, default=1, help="scoring actors (sessions)")
    p.add_argument("--batch-size", type=_positive_int, default=4096, help="series per call")
    p.add_argument("--cpus-per-actor", type=float, default=1.0)
    p.add_argument("--gpus-per-actor", type=float,
                   help="default: 1 for the ensemble (accurate) when Ray has GPUs, else 0")
    p.add_argument("--partitions", type=_positive_int,
                   help="shuffle partitions (default: from the input size)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from service.batch.job import JobConfig, plan_job, run_job

    config = JobConfig(
        model=args.model, mode=args.mode, input=args.input, output=args.output,
        errors=args.errors, registry=args.registry, layout=args.layout, id_col=args.id_col,
        time_col=args.time_col, value_cols=tuple(args.value_cols), horizon=args.horizon,
        levels=tuple(args.levels), address=args.address, num_cpus=args.num_cpus,
        object_store_mb=args.object_store_mb, actors=args.actors, batch_size=args.batch_size,
        cpus_per_actor=args.cpus_per_actor, gpus_per_actor=args.gpus_per_actor,
        partitions=args.partitions, overwrite=args.overwrite, progress=args.progress,
    )
    try:
        plan = plan_job(config)
    except JobError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = run_job(plan)
    print(summary.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
