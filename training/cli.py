"""``python -m training``: the one place where flags, TOML tables and config dataclasses meet.

The data, optimisation and distillation flags are generated from the fields of ``DataConfig``,
``TrainConfig`` and ``DistillConfig`` (a flag's default is "keep the TOML's value, else the
dataclass's"), so every command takes the same ones and they cannot drift from the configs.
Each command turns its flags into config dataclasses and calls one ``run_*`` function; the last
line printed to stdout is a JSON object with the result, so scripts can parse it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from models_registry.defaults import DEFAULT_ROOT, ROOT_ENV
from training.data import DataConfig, DataError
from training.distributed import DistributedConfig
from training.loop import TrainConfig

DESCRIPTION = """Train, pretrain, fine-tune, distil, export and publish Distilcast forecasters.

Commands: train (supervised), pretrain (masked pretraining of a teacher's encoder), finetune
(a teacher, from a pretrained encoder or from scratch), distill (TimeDistill student), export
(a run folder to ONNX into the registry), pipeline (the whole chain, stage by stage), crossval
(rolling-origin backtest of a run folder).
Run `python -m training COMMAND --help` for a command's flags. Every run folder resumes with
--resume; the last stdout line of every command is a JSON object with its result."""

# Short help for generated flags; a field without an entry shows only its default.
HELP: dict[str, str] = {
    "dataset": "catalogue name (ETTh1, ETTh2, ETTm1, exchange_rate, ili) or a CSV path",
    "data_dir": "folder holding the catalogue's files",
    "lookback": "input length L",
    "horizon": "forecast length H",
    "features": "M: every column in and out; S: --target only",
    "target": "target column for --features S",
    "date_column": "timestamp column (default: 'date' or 'ds', else the first column of "
    "timestamps)",
    "id_column": "series id column of a long file: one model over every series (default: "
    "'unique_id' when the file has one, else the file is wide: one series)",
    "epochs": "maximum epochs (early stopping may end sooner)",
    "patience": "epochs without a better validation score before stopping",
    "min_epochs": "no early stop before this many epochs",
    "threads": "torch intra-op threads (inter-op: 1)",
    "device": "where it trains: cpu, cuda, cuda:N or auto (a GPU when torch sees one)",
    "max_train_batches": "cap on batches per epoch (quick runs and tests only)",
    "val_max_windows": "pretraining: validation windows the pretext loss is scored on",
    "encoder_lr_scale": "fine-tuning: encoder lr = this x the head's",
    "head_warmup_epochs": "fine-tuning: epochs with the encoder frozen",
    "stop_after_epochs": "stop (resumably) after this many epochs in this invocation",
    "time_limit_s": "stop (resumably) after the epoch during which this many seconds passed",
    "progress": "progress bars on stderr",
    "teachers": "comma list of teacher names (<teacher-dir>/<dataset>-<name>-L<Lt>-H<H>) or run "
    "folders; several = ensemble",
    "teacher_dir": "where named teachers live",
    "teacher_lookback": "Lt in teacher names",
    "alpha": "weight of the prediction terms (default: the dataset's)",
    "beta": "weight of the feature terms (default: the dataset's)",
    "feature_terms": "the feature terms (--no-feature-terms: ablation)",
    "period": "the multi-period terms (--no-period: ablation)",
    "scale": "the multi-scale terms (--no-scale: ablation)",
    "weighting": "ensemble target: plain mean (served) or weights 1/val MSE",
    "cache": "cache the teachers' outputs once (memory, then a memory-mapped file)",
    "cache_max_mb": "MB of features per teacher kept in memory; beyond it memory-mapped on disk",
    "kl_reduction": "period KL: sum over frequencies (ours) or mean over elements (the authors')",
    "workers": "data-parallel workers under Ray Train (default: 1, this process only)",
    "address": "Ray cluster for --workers (auto, ray://head:10001; default: a local one)",
    "use_gpu": "one GPU per worker (NCCL); default gloo on CPU",
    "cpus_per_worker": "CPUs Ray reserves per worker",
    "storage": "where Ray keeps checkpoints: a path every node sees, or s3://, gs:// (default: "
    "<out>/ray)",
    "max_failures": "worker restarts Ray may make (-1: no limit)",
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _field_type(tp: Any) -> Any:
    """``X | None`` -> ``X``."""
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip())


def add_dataclass_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type[Any],
    exclude: Sequence[str] = (),
) -> None:
    """One flag per field of ``cls`` (``--field-name``); unset flags stay ``None``."""
    hints = get_type_hints(cls)
    for f in fields(cls):
        if f.name in exclude:
            continue
        tp = _field_type(hints[f.name])
        default = f.default if f.default is not MISSING else None
        text = HELP.get(f.name, "")
        if "default:" in text:  # the help states its own default
            shown = text
        else:
            shown = f"{text} (default: {default})" if text else f"default: {default}"
        kwargs: dict[str, Any] = {"default": None, "dest": f.name, "help": shown}
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif get_origin(tp) is Literal:
            kwargs["choices"] = list(get_args(tp))
        elif get_origin(tp) is tuple:
            kwargs["type"] = _comma_list
        elif tp in (int, float, str):
            kwargs["type"] = tp
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: no flag for type {tp!r}")
        parser.add_argument(_flag(f.name), **kwargs)


def dataclass_values(ns: argparse.Namespace, cls: type[Any]) -> dict[str, Any]:
    """The fields of ``cls`` given on the command line (unset flags are left out)."""
    return {
        f.name: getattr(ns, f.name) for f in fields(cls) if getattr(ns, f.name, None) is not None
    }


def add_data_flags(p: argparse.ArgumentParser, horizon: bool = True) -> None:
    add_dataclass_flags(p.add_argument_group("data"), DataConfig, () if horizon else ("horizon",))


def add_train_flags(p: argparse.ArgumentParser) -> None:
    add_dataclass_flags(p.add_argument_group("optimisation"), TrainConfig)


def add_run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None, help="TOML with [data] [model] [train]")
    p.add_argument("--out", default=None, help="run folder (default: runs/<dataset>-...)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")


# -- commands ------------------------------------------------------------------------------------


def cmd_train(a: argparse.Namespace) -> dict[str, Any]:
    from training.config import build_run_config
    from training.train import run_train

    cfg = build_run_config(
        a.model,
        a.config,
        dataclass_values(a, DataConfig),
        dataclass_values(a, TrainConfig),
        out_dir=a.out,
    )
    dist = dataclass_values(a, DistributedConfig)
    if dist.get("workers", 1) > 1 or len(dist) > ("workers" in dist):
        from training.distributed import run_distributed

        dist.setdefault("workers", 1)
        result = run_distributed(cfg, resume=a.resume, **dist)
    else:
        result = run_train(cfg, resume=a.resume)
    return {
        "model": cfg.model,
        "dataset": cfg.data.dataset,
        "lookback": cfg.data.lookback,
        "horizon": cfg.data.horizon,
        **result.summary(),
        "checkpoint": str(result.out_dir / "best.safetensors"),
    }


def cmd_pretrain(a: argparse.Namespace) -> dict[str, Any]:
    from training.pretrain import build_pretrain_config, run_pretrain

    cfg = build_pretrain_config(
        a.method,
        a.config,
        dataclass_values(a, DataConfig),
        dataclass_values(a, TrainConfig),
        out_dir=a.out,
        resume=a.resume,
    )
    result = run_pretrain(cfg)
    return {
        "method": cfg.method,
        "dataset": cfg.data.dataset,
        "lookback": cfg.data.lookback,
        **result.summary(),
    }


def cmd_finetune(a: argparse.Namespace) -> dict[str, Any]:
    from training.config import build_run_config
    from training.pretrain import FinetuneRunConfig, run_finetune

    run = build_run_config(
        a.method,
        a.config,
        dataclass_values(a, DataConfig),
        dataclass_values(a, TrainConfig),
        out_dir=a.out,
    )
    result = run_finetune(FinetuneRunConfig(run, a.init_from, a.allow_channel_change, a.resume))
    return {
        "model": a.method,
        "dataset": run.data.dataset,
        "lookback": run.data.lookback,
        "horizon": run.data.horizon,
        "pretrained_from": a.init_from,
        **result.summary(),
        "checkpoint": str(result.out_dir / "best.safetensors"),
    }


def cmd_distill(a: argparse.Namespace) -> dict[str, Any]:
    from training.distill import DistillConfig, build_distill_config, run_distill

    cfg = build_distill_config(
        a.config,
        dataclass_values(a, DataConfig),
        dataclass_values(a, TrainConfig),
        dataclass_values(a, DistillConfig),
        out_dir=a.out,
        resume=a.resume,
    )
    result = run_distill(cfg)
    d = cfg.run.data
    return {
        "dataset": d.dataset,
        "lookback": d.lookback,
        "horizon": d.horizon,
        **result.summary(),
        "checkpoint": str(result.fit.out_dir / "best.safetensors"),
    }


def cmd_export(a: argparse.Namespace) -> dict[str, Any]:
    from training.publish import publish_run

    manifest = publish_run(
        Path(a.run),
        a.name,
        registry=a.registry,
        alias=a.alias,
        teachers=list(_comma_list(a.teachers or "")),
        parity_windows=a.parity_windows,
    )
    return {
        "name": manifest.name,
        "version": manifest.version,
        "alias": a.alias,
        "kind": manifest.kind,
        "architecture": manifest.architecture,
        "channels": manifest.channels,
        "parity_max_abs_err": manifest.parity_max_abs_err,
        "sha256": manifest.sha256,
        **{k: v for k, v in manifest.metrics.items() if k in ("val_mse", "test_mse", "test_mae")},
    }


def cmd_pipeline(a: argparse.Namespace) -> dict[str, Any]:
    from training.pipeline import PipelineConfig, run_pipeline

    cfg = PipelineConfig(
        data=dataclass_values(a, DataConfig),
        train=dataclass_values(a, TrainConfig),
        name=a.name,
        registry=a.registry,
        quick=a.quick,
        plan_file=a.config,
        work_dir=a.work_dir,
        alias=a.alias,
        parity_windows=a.parity_windows,
        resume=a.resume,
    )
    return run_pipeline(cfg)


def cmd_crossval(a: argparse.Namespace) -> dict[str, Any]:
    from training.crossval import CrossvalConfig, write_crossval

    return write_crossval(
        CrossvalConfig(
            run=a.run, h=a.h, n_windows=a.n_windows, step=a.step, dataset=a.dataset, out=a.out
        )
    )


# -- parser --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from training.distill import DistillConfig
    from training.export import PARITY_WINDOWS
    from training.models import MODELS
    from training.pretrain import METHODS

    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="python -m training", description=DESCRIPTION, formatter_class=fmt
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="supervised training of one model on one dataset")
    p.add_argument("--model", required=True, choices=sorted(MODELS))
    add_data_flags(p)
    add_train_flags(p)
    add_run_flags(p)
    add_dataclass_flags(
        p.add_argument_group("many workers (Ray Train; docs/training.md)"), DistributedConfig
    )
    p.set_defaults(handler=cmd_train)

    p = sub.add_parser("pretrain", help="masked pretraining of a teacher's encoder")
    p.add_argument("--method", required=True, choices=sorted(METHODS))
    add_data_flags(p, horizon=False)
    add_train_flags(p)
    add_run_flags(p)
    p.set_defaults(handler=cmd_pretrain)

    p = sub.add_parser("finetune", help="fine-tune a teacher to forecast (pretrained or scratch)")
    p.add_argument("--method", required=True, choices=sorted(METHODS))
    p.add_argument(
        "--from",
        dest="init_from",
        default=None,
        help="pretraining folder or its encoder.safetensors (without: train from scratch)",
    )
    p.add_argument(
        "--allow-channel-change",
        action="store_true",
        help="accept a checkpoint pretrained on another channel count",
    )
    add_data_flags(p)
    add_train_flags(p)
    add_run_flags(p)
    p.set_defaults(handler=cmd_finetune)

    p = sub.add_parser("distill", help="TimeDistill: train the MLP student against teacher(s)")
    add_data_flags(p)
    add_train_flags(p)
    add_dataclass_flags(p.add_argument_group("distillation"), DistillConfig)
    add_run_flags(p)
    p.set_defaults(handler=cmd_distill)

    registry_help = f"registry root (default: ${ROOT_ENV}, else {DEFAULT_ROOT})"
    p = sub.add_parser("export", help="export a run folder to ONNX and register it")
    p.add_argument("--run", required=True, help="run folder (run.json + best.safetensors)")
    p.add_argument("--name", required=True, help="registry name, e.g. etth1-h96")
    p.add_argument("--registry", default=None, help=registry_help)
    p.add_argument("--alias", default=None, help="point this alias at the new version")
    p.add_argument("--teachers", default=None, help="comma-separated NAME@VERSION of teachers")
    p.add_argument(
        "--parity-windows", type=int, default=PARITY_WINDOWS, help="test windows for parity"
    )
    p.set_defaults(handler=cmd_export)

    p = sub.add_parser(
        "pipeline", help="teachers -> student -> ONNX -> registry -> promote, stage by stage"
    )
    add_data_flags(p)
    add_dataclass_flags(p.add_argument_group("optimisation (every training stage)"), TrainConfig)
    p.add_argument("--quick", action="store_true", help="tiny budgets (minutes on 2 CPU cores)")
    p.add_argument("--registry", default=None, help=registry_help)
    p.add_argument("--name", default=None, help="registry name (default: <dataset>-h<horizon>)")
    p.add_argument(
        "--alias",
        default=None,
        help="alias to set (default: production if the name has none yet, else staging)",
    )
    p.add_argument("--config", default=None, help="plan TOML (default: configs/pipeline*.toml)")
    p.add_argument("--work-dir", default=None, help="run folders (default: runs/pipeline/NAME)")
    p.add_argument("--parity-windows", type=int, default=PARITY_WINDOWS)
    p.add_argument(
        "--resume", action="store_true", help="skip finished stages, continue unfinished runs"
    )
    p.set_defaults(handler=cmd_pipeline)

    p = sub.add_parser(
        "crossval",
        help="rolling-origin backtest of a run folder (like POST /v1/backtest, offline)",
    )
    p.add_argument("--run", required=True, help="run folder (run.json + best.safetensors)")
    p.add_argument("--h", type=int, default=None, help="steps per window (default: the horizon)")
    p.add_argument("--n-windows", type=int, default=1, help="windows per series (default: 1)")
    p.add_argument("--step", type=int, default=None, help="rows between origins (default: h)")
    p.add_argument(
        "--dataset", default=None, help="another CSV with the run's columns (default: the run's)"
    )
    p.add_argument(
        "--out", default=None, help="folder for crossval.csv/.json (default: RUN/crossval)"
    )
    p.set_defaults(handler=cmd_crossval)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from training.pipeline import StageFailed

    handler: Callable[[argparse.Namespace], dict[str, Any]] = args.handler
    try:
        result = handler(args)
    except StageFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (DataError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "interrupted; the last finished epoch is saved (rerun with --resume)", file=sys.stderr
        )
        return 130
    print(json.dumps(result))
    return 0
