"""The batch job: plan (no Ray: input, model and output checked up front), then run on Ray Data.

    read (Parquet/CSV, distributed) -> [wide: melt to long]
    -> drop rows no window needs, then co-locate each series' rows (shuffle); both skipped
       when the Parquet row groups' id statistics prove each read holds whole series, as for
       a file written sorted by id
    -> windows (vectorised per block)
    -> map_batches over an actor pool (Scorer): scores the block and writes its forecasts as one
       Parquet file of the output where it was scored; returns only the block's report
    -> the driver collects the reports: counts, and failures -> the errors file

Local Ray by default (`ray.init(num_cpus=...)`); with `address` the same plan runs on a cluster,
with this checkout's `service` and `models_registry` shipped as py_modules. There the image needs
the service's dependencies, every node must read the registry directory (as service replicas
do) and the input, and write the output (a shared volume, or s3://... paths); the errors file
is written by the driver.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from models_registry.store import FilesystemStore
from service.batch import JobError
from service.batch.inputs import (
    ID,
    InputSpec,
    Layout,
    build_windows,
    colocated_row_groups,
    csv_column_types,
    inspect_input,
    melt_wide,
    parquet_row_groups,
    read_row_groups,
    tail_rows,
)
from service.batch.scoring import Scorer, ScoreSpec, failure_schema
from service.batch.target import JobMode, Target, check_request, pin_model
from service.core.engine import CPU, EngineOptions

if TYPE_CHECKING:
    from ray.data import Dataset

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
PARTITION_BYTES = 64 * 1024 * 1024
"""Input bytes per co-location partition (one window-building task each)."""


@dataclass(frozen=True, slots=True)
class JobConfig:
    model: str
    mode: JobMode
    input: str
    output: str
    errors: str | None = None
    """Default: `<output stem>-errors.parquet` beside the output."""
    registry: str = "./var/registry"
    layout: Layout | None = None
    """None: long when the input has `id_col`, else wide."""
    id_col: str = ID
    time_col: str | None = None
    value_cols: tuple[str, ...] = ()
    horizon: int | None = None
    levels: tuple[float, ...] = ()
    address: str | None = None
    num_cpus: int | None = None
    """Local Ray only; default: the machine's cores, at least the actors' CPUs + 2."""
    object_store_mb: int | None = None
    actors: int = 1
    batch_size: int = 4096
    cpus_per_actor: float = 1.0
    gpus_per_actor: float | None = None
    """None: one GPU per actor for the teacher ensemble when the cluster has GPUs, else none."""
    partitions: int | None = None
    overwrite: bool = False
    progress: bool = True


@dataclass(frozen=True, slots=True)
class JobPlan:
    config: JobConfig
    input: InputSpec
    target: Target
    horizon: int
    errors: str
    partitions: int


@dataclass(frozen=True, slots=True)
class JobSummary:
    model: str
    mode: JobMode
    scored: int
    failed: int
    seconds: float
    actors: int
    providers: list[str] = field(default_factory=list)
    output: str = ""
    errors: str = ""

    @property
    def series(self) -> int:
        return self.scored + self.failed

    @property
    def series_per_s(self) -> float:
        return self.series / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        providers = ",".join(p.removesuffix("ExecutionProvider") for p in self.providers) or "-"
        return (
            f"{self.model} ({self.mode}, {self.actors} actor(s), {providers}): "
            f"{self.scored} series scored, {self.failed} failed, {self.seconds:.1f} s, "
            f"{self.series_per_s:.0f} series/s -> {self.output} (failures: {self.errors})"
        )


def _default_errors(output: str) -> str:
    out = output.rstrip("/")
    stem = out[: -len(".parquet")] if out.endswith(".parquet") else out
    return f"{stem}-errors.parquet"


def _check_output(path: str, overwrite: bool, what: str) -> None:
    if "://" in path:
        return
    p = Path(path)
    if p.exists() and not overwrite and (p.is_file() or any(p.iterdir())):
        raise JobError(f"{what} {path} already exists: pass --overwrite to replace it")
    if not p.parent.exists():
        raise JobError(f"{what} {path}: directory {p.parent} does not exist")


def _absolute(path: str) -> str:
    """Local paths as absolute ones: Ray workers need not share the driver's working directory."""
    return path if "://" in path else str(Path(path).expanduser().resolve())


def plan_job(config: JobConfig) -> JobPlan:
    """Everything that can be checked before Ray starts; JobError says what is wrong."""
    config = replace(config, input=_absolute(config.input), output=_absolute(config.output),
                     errors=_absolute(config.errors) if config.errors else None,
                     registry=_absolute(config.registry))
    if config.actors < 1:
        raise JobError("--actors must be at least 1")
    if config.batch_size < 1:
        raise JobError("--batch-size must be at least 1")
    if config.cpus_per_actor <= 0:
        raise JobError("--cpus-per-actor must be positive")
    spec = inspect_input(config.input, layout=config.layout, id_col=config.id_col,
                         time_col=config.time_col, value_cols=config.value_cols)
    target = pin_model(FilesystemStore(config.registry), config.model, config.mode)
    horizon = check_request(target, config.horizon, config.levels)
    channels = target.manifest.channels
    if channels is not None and channels != len(spec.channels):
        log.warning("%s expects %d channels, the input has %d: every series will fail",
                    target.label, channels, len(spec.channels))
    errors = config.errors or _default_errors(config.output)
    _check_output(config.output, config.overwrite, "output")
    _check_output(errors, config.overwrite, "errors file")
    if Path(errors).suffix.lower() not in (".parquet", ".csv"):
        raise JobError(f"errors file {errors}: name it *.parquet or *.csv")
    partitions = config.partitions or max(
        2 * config.actors, math.ceil(spec.size_bytes / PARTITION_BYTES)
    )
    return JobPlan(config, spec, target, horizon, errors, partitions)


# -- Ray ------------------------------------------------------------------------------------------


def _code_paths() -> list[str]:
    import models_registry
    import service

    return [str(Path(m.__file__).parent) for m in (service, models_registry) if m.__file__]


def _start_ray(config: JobConfig) -> bool:
    """Connect to (or start) Ray unless this process already did; True when started here."""
    import ray

    if ray.is_initialized():
        return False
    if config.address:
        ray.init(address=config.address, runtime_env={"py_modules": _code_paths()},
                 log_to_driver=True)
        return True
    # Two logical CPUs beside the actors: with one, a write task waiting on backpressure can
    # hold it while the shuffle's reduce waits for a CPU, and the job never ends (seen with 2
    # actors on 3 CPUs). Logical CPUs only schedule: the read/shuffle/write tasks are short.
    wanted = math.ceil(config.actors * config.cpus_per_actor) + 2
    num_cpus = config.num_cpus or max(os.cpu_count() or 1, wanted)
    object_store = config.object_store_mb * 1024 * 1024 if config.object_store_mb else None
    ray.init(num_cpus=num_cpus, include_dashboard=False, object_store_memory=object_store)
    return True


def _read(spec: InputSpec) -> tuple[Dataset, bool]:
    """The input as a dataset, and whether its blocks already hold whole series (see
    `colocated_row_groups`: no shuffle needed)."""
    import ray.data

    pieces = parquet_row_groups(spec) if spec.file_format == "parquet" else []
    if pieces:
        reads = colocated_row_groups(pieces, spec)
        read = partial(read_row_groups, spec=spec)
        items = reads if reads is not None else pieces
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            read, batch_size=1, batch_format="pyarrow")
        return ds, reads is not None
    if spec.file_format == "parquet":
        return ray.data.read_parquet(spec.path).select_columns(spec.read_columns), False
    options = pacsv.ConvertOptions(column_types=csv_column_types(spec),
                                   include_columns=spec.read_columns)
    return ray.data.read_csv(spec.path, convert_options=options), False


def _colocate(ds: Dataset, key: str, partitions: int) -> Dataset:
    """Every row of a series in one block, as `GroupedData.map_groups` arranges before it runs
    its function on whole blocks (batch_size=None): a hash repartition on the key, or a sort
    under the sort-based shuffle strategies. Unlike map_groups, the windows are then built
    for a whole block at once rather than one Python call per series."""
    from ray.data.context import ShuffleStrategy

    if ds.context.shuffle_strategy in (ShuffleStrategy.HASH_SHUFFLE, ShuffleStrategy.SHUFFLE_V2,
                                       ShuffleStrategy.GPU_SHUFFLE):
        return ds.repartition(partitions, keys=[key])
    return ds.sort(key)


def _gpus_per_actor(config: JobConfig, target: Target) -> float:
    import ray

    if config.gpus_per_actor is not None:
        return config.gpus_per_actor
    has_gpu = ray.cluster_resources().get("GPU", 0) > 0
    return 1.0 if target.is_ensemble and has_gpu else 0.0


def score_spec(plan: JobPlan, gpus: float = 0.0) -> ScoreSpec:
    config, spec = plan.config, plan.input
    providers = (CUDA, CPU) if gpus > 0 else (CPU,)
    threads = max(1, round(config.cpus_per_actor))
    return ScoreSpec(
        registry_root=config.registry,
        name=plan.target.name,
        version=plan.target.version,
        mode=plan.target.mode,
        horizon=plan.horizon,
        levels=config.levels,
        channels=spec.channels,
        id_type=spec.id_type,
        time_type=spec.time_type,
        engine=EngineOptions(providers=providers, intra_threads=threads, inter_threads=1),
        batch_size=config.batch_size,
    )


def build_dataset(plan: JobPlan) -> Dataset:
    """The lazy pipeline of block reports (`report_schema`); nothing runs until it is iterated,
    and the forecasts are written to the output as it runs."""
    import ray.data

    config, spec = plan.config, plan.input
    gpus = _gpus_per_actor(config, plan.target)
    ds, colocated = _read(spec)
    if spec.layout == "wide":
        melt = partial(melt_wide, time_col=spec.time_col, value_cols=spec.value_cols)
        ds = ds.map_batches(melt, batch_size=None, batch_format="pyarrow")
        id_col, value_cols = ID, spec.channels
    else:
        id_col, value_cols = spec.id_col, spec.value_cols
    lookback = plan.target.manifest.lookback
    if colocated:
        # build_windows keeps each series' last rows itself: nothing to trim before it.
        log.info("%s: row groups hold whole series (sorted by %s): no shuffle", spec.path, id_col)
    else:
        # A combiner: the shuffle moves about `lookback` rows per series and block, not all.
        trim = partial(tail_rows, id_col=id_col, time_col=spec.time_col, value_cols=value_cols,
                       lookback=lookback)
        ds = ds.map_batches(trim, batch_size=None, batch_format="pyarrow")
        ds = _colocate(ds, id_col, plan.partitions)
    windows_of = partial(build_windows, id_col=id_col, time_col=spec.time_col,
                         value_cols=value_cols, time_type=spec.time_type, id_type=spec.id_type,
                         lookback=lookback)
    # Whole blocks (batch_size=None): a series is never split between two calls.
    windows = ds.map_batches(windows_of, batch_size=None, batch_format="pyarrow")
    return windows.map_batches(
        Scorer,
        # Whole blocks here too, cut into --batch-size calls by the Scorer: Ray fuses the steps
        # above into this one, and a row batch size would then be counted in the first step's
        # rows (one per Parquet piece), handing every piece to a single actor task.
        batch_size=None,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=config.actors),
        num_cpus=config.cpus_per_actor,
        num_gpus=gpus or None,
        fn_constructor_kwargs={"spec": score_spec(plan, gpus), "output": config.output},
    )


def _write_errors(path: str, failures: list[pa.Table], id_type: pa.DataType) -> int:
    # Reports come through the dataset: a block Ray retried (its actor died) counts once.
    table = pa.concat_tables(failures) if failures else failure_schema(id_type).empty_table()
    table = table.sort_by([(ID, "ascending")])
    if path.lower().endswith(".csv"):
        pacsv.write_csv(table, path)
    else:
        pq.write_table(table, path)
    rows: int = table.num_rows
    return rows


def _prepare_output(path: str, overwrite: bool) -> None:
    """An empty output directory (what was there is removed with --overwrite; plan_job has
    refused a non-empty one without it)."""
    import pyarrow.fs as pafs

    if "://" in path:
        fs, root = pafs.FileSystem.from_uri(path)
    else:
        fs, root = pafs.LocalFileSystem(), path
    info = fs.get_file_info(root)
    if overwrite and info.type == pafs.FileType.File:
        fs.delete_file(root)
    elif overwrite and info.type == pafs.FileType.Directory:
        fs.delete_dir_contents(root)
    fs.create_dir(root, recursive=True)


def run_job(plan: JobPlan) -> JobSummary:
    """Run a planned job on Ray. A series that cannot be scored goes to the errors file with its
    reason instead of failing the job; failures of Ray itself or of model loading do raise."""
    import ray
    from ray.data import DataContext

    config = plan.config
    started = _start_ray(config)
    scored, failures, providers = 0, list[pa.Table](), set[str]()
    try:
        DataContext.get_current().enable_progress_bars = config.progress
        _prepare_output(config.output, config.overwrite)
        ds = build_dataset(plan)
        t0 = time.perf_counter()
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            report: pa.Table = batch  # (iter_batches is typed for every batch format)
            block = pc.is_null(report["reason"])
            scored += int(pc.sum(report["scored"]).as_py() or 0)
            providers.update(p for p in report.filter(block)["provider"].to_pylist() if p)
            failed = report.filter(pc.invert(block))
            if failed.num_rows:
                failures.append(failed.select([ID, "reason"]))
        seconds = time.perf_counter() - t0
    finally:
        if started:
            ray.shutdown()
    out = Path(config.output)
    if "://" not in config.output and not any(out.glob("*.parquet")):
        # Every series failed: still leave a readable (empty) dataset with the output schema.
        pq.write_table(score_spec(plan).output_schema().empty_table(), out / "empty.parquet")
    failed_n = _write_errors(plan.errors, failures, plan.input.id_type)
    return JobSummary(plan.target.label, plan.target.mode, scored, failed_n, seconds,
                      config.actors, sorted(providers), config.output, plan.errors)
