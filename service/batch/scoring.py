"""Scoring windows inside Ray Data actors with the service's own inference core.

Each actor builds the service's `ModelPool` over a `PinnedRegistry` (so it loads exactly the
pinned version: one ONNX Runtime session, or one per ensemble member) and a `Predictor`, and sends
every batch of windows through it: a batch of lookback-long windows in one
`Predictor.forecast_block` call, any other series by series through
`Predictor.forecast(..., partial=True)`. Either way the same window checks (lookback, channel
count), the same session call, ensemble mean and conformal intervals as POST
/v1/forecast/batch. Only the time axis is computed here, vectorised (last + k * step).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from models_registry.store import FilesystemStore
from service.batch.inputs import DS, ID, time_storage
from service.batch.target import JobMode, PinnedRegistry
from service.core.engine import EngineOptions
from service.core.errors import InvalidInput
from service.core.pool import ModelPool, PoolOptions
from service.core.predictor import Predictor, nonfinite_error
from service.core.types import ForecastRequest, SeriesFailure, SeriesForecast, SeriesInput

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ScoreSpec:
    """What every actor needs to know (small and picklable: it travels to each actor)."""

    registry_root: str
    name: str
    version: int
    mode: JobMode
    horizon: int
    levels: tuple[float, ...]
    channels: tuple[str, ...]
    id_type: pa.DataType
    time_type: pa.DataType
    engine: EngineOptions
    batch_size: int = 4096
    """Windows per inference call (a block is scored in slices of this many)."""

    @property
    def labels(self) -> list[str]:
        """Interval keys as the Predictor writes them ("80", "97.5")."""
        return [f"{level:g}" for level in self.levels]

    def output_schema(self) -> pa.Schema:
        fields = [pa.field(ID, self.id_type), pa.field(DS, self.time_type)]
        fields += [pa.field(c, pa.float32()) for c in self.channels]
        for c in self.channels:
            for label in self.labels:
                fields += [pa.field(f"{c}-lo-{label}", pa.float32()),
                           pa.field(f"{c}-hi-{label}", pa.float32())]
        return pa.schema(fields)


def failure_schema(id_type: pa.DataType) -> pa.Schema:
    return pa.schema([(ID, id_type), ("reason", pa.string())])


def report_schema(id_type: pa.DataType) -> pa.Schema:
    """What a Scorer call returns to the driver: one row per failed series (its id and reason,
    `scored` 0) and one row for the block (`reason` null: how many series it scored, and on
    which execution provider). The forecasts themselves go to the output, not to the driver."""
    return pa.schema([(ID, id_type), ("reason", pa.string()), ("scored", pa.int64()),
                      ("provider", pa.string())])


class OutputSink:
    """Writes a block's forecasts as one Parquet file of the output directory (a local path or
    a pyarrow filesystem URI such as s3://bucket/prefix), where the block was scored.

    The file is named after the block's first series, which no other block holds: a block
    scored again (its actor died, Ray retried it) replaces its own file instead of adding a
    second copy. Local files appear whole: written under a dot-name, then renamed."""

    def __init__(self, output: str) -> None:
        import pyarrow.fs as pafs

        self.remote = "://" in output
        if self.remote:
            self.fs, self.root = pafs.FileSystem.from_uri(output)
        else:
            self.fs, self.root = pafs.LocalFileSystem(), output
        self.fs.create_dir(self.root, recursive=True)

    @staticmethod
    def name(first_id: object, series: int) -> str:
        key = hashlib.sha256(repr((first_id, series)).encode()).hexdigest()[:24]
        return f"part-{key}.parquet"

    def write(self, table: pa.Table, first_id: object, series: int) -> str:
        import pyarrow.parquet as pq

        # Dictionary pages for the id only (each repeats for a whole horizon): trying them on
        # float and time columns, which hardly repeat, made the write 3.5x slower.
        options = {"use_dictionary": [ID]}
        name = self.name(first_id, series)
        final = f"{self.root.rstrip('/')}/{name}"
        if self.remote:  # an object store's put is atomic
            pq.write_table(table, final, filesystem=self.fs, **options)
            return final
        tmp = f"{self.root.rstrip('/')}/.{name}.{os.getpid()}.tmp"
        pq.write_table(table, tmp, filesystem=self.fs, **options)
        os.replace(tmp, final)
        return final


class Scorer:
    """A Ray Data `map_batches` callable class: one per actor, model loaded once.

    With an `output`, each call writes the block's forecasts there (`OutputSink`) and returns
    its report (`report_schema`): forecasts never travel through the object store or a separate
    write task. Without one, it returns the forecast rows (in-process use)."""

    def __init__(self, spec: ScoreSpec, output: str | None = None) -> None:
        self.spec = spec
        self.sink = OutputSink(output) if output is not None else None
        self.loop = asyncio.new_event_loop()
        registry = PinnedRegistry(FilesystemStore(spec.registry_root), {spec.name: spec.version})
        # One big call per batch, always on this thread (no executor, no batching delay).
        options = PoolOptions(engine=spec.engine, batch_max_size=1 << 20,
                              batch_max_delay_s=0.0, inline_max_s=math.inf)
        self.pool = ModelPool(registry, options)
        self.loop.run_until_complete(self.pool.sync_name(spec.name))
        served = self.pool.get((spec.name, spec.version))
        if served is None:
            reason = self.pool.failed.get((spec.name, spec.version), "not loaded")
            raise RuntimeError(f"cannot load {spec.name}@{spec.version}: {reason}")
        self.provider = served.provider
        self.predictor = Predictor(self.pool, shadow_fraction=0.0)
        self.model = f"{spec.name}@{spec.version}"
        self.lookback = served.lookback
        self.storage = time_storage(spec.time_type)
        log.info("scoring with %s on %s", self.model, self.provider)

    def __call__(self, batch: pa.Table) -> pa.Table:
        size = max(1, self.spec.batch_size)
        parts = [self.score(batch.slice(a, size)) for a in range(0, batch.num_rows, size)]
        out = pa.concat_tables([o for o, _ in parts]) if parts else (
            self.spec.output_schema().empty_table())
        if self.sink is None:
            return out
        failures = pa.concat_tables([f for _, f in parts]) if parts else (
            failure_schema(self.spec.id_type).empty_table())
        scored = out.num_rows // self.spec.horizon
        if scored:
            self.sink.write(out, batch.column(ID)[0].as_py(), batch.num_rows)
        schema = report_schema(self.spec.id_type)
        k = failures.num_rows
        return pa.table({
            ID: pa.concat_arrays([failures.column(ID).combine_chunks(),
                                  pa.nulls(1, self.spec.id_type)]),
            "reason": pa.concat_arrays([failures.column("reason").combine_chunks(),
                                        pa.nulls(1, pa.string())]),
            "scored": pa.array([0] * k + [scored], pa.int64()),
            "provider": pa.array([None] * k + [self.provider], pa.string()),
        }, schema=schema)

    def _requests(self, batch: pa.Table) -> list[SeriesInput | SeriesFailure]:
        c = len(self.spec.channels)
        values = batch.column("values").combine_chunks()
        offsets = values.offsets.to_numpy()
        flat = values.values.to_numpy(zero_copy_only=False)
        reasons = batch.column("reason").to_pylist()
        series: list[SeriesInput | SeriesFailure] = []
        for i, reason in enumerate(reasons):
            if reason is not None:
                series.append(SeriesFailure(i, InvalidInput(reason)))
                continue
            window = flat[offsets[i] : offsets[i + 1]].reshape(-1, c)
            series.append(SeriesInput(i, window, False, i))
        return series

    def _block(self, batch: pa.Table) -> tuple[np.ndarray, list[int], list[int], list[str]] | None:
        """The scorable windows as one [k, lookback, C] array (a view of the block when no row
        carries a reason), their rows, and the rows that already carry a reason, with it; None
        when some window without a reason is not exactly the model's lookback (the per-series
        path then explains it)."""
        c, lookback = len(self.spec.channels), self.lookback
        values = batch.column("values").combine_chunks()
        offsets = values.offsets.to_numpy()
        reasons = batch.column("reason")
        if reasons.null_count == len(reasons):
            ok, failed, why = list(range(batch.num_rows)), [], []
        else:
            listed = reasons.to_pylist()
            ok = [i for i, r in enumerate(listed) if r is None]
            failed = [i for i, r in enumerate(listed) if r is not None]
            why = [listed[i] for i in failed]
        sizes = np.diff(offsets)[ok]
        if not bool((sizes == lookback * c).all()):
            return None
        flat = values.values.to_numpy(zero_copy_only=False)
        if len(ok) == batch.num_rows:  # the usual block: windows back to back
            x = flat[offsets[0] : offsets[0] + len(ok) * lookback * c]
        else:
            x = np.concatenate([flat[offsets[i] : offsets[i + 1]] for i in ok]) if ok else flat[:0]
        return x.reshape(len(ok), lookback, c), ok, failed, why

    def score(self, batch: pa.Table) -> tuple[pa.Table, pa.Table]:
        """Windows -> (forecast rows in long form, failures): a block of lookback-long windows
        in one `Predictor.forecast_block` call, anything else series by series."""
        block = self._block(batch)
        if block is None:
            return self._score_series(batch)
        spec = self.spec
        x, ok, failed, reasons = block
        try:
            result = self.loop.run_until_complete(self.predictor.forecast_block(
                x, model=self.model, mode=spec.mode, horizon=spec.horizon,
                levels=list(spec.levels)))
        except InvalidInput:  # a check every window fails (channels): say it per series
            return self._score_series(batch)
        if not bool(result.finite.all()):
            bad = np.flatnonzero(~result.finite)
            message = nonfinite_error(result.label, "values").message
            for b in bad.tolist():
                failed.append(ok[b])
                reasons.append(message)
            keep = np.flatnonzero(result.finite)
            ok = [ok[b] for b in keep.tolist()]
            values = result.values[keep]
            bands = {k: (lo[keep], hi[keep]) for k, (lo, hi) in result.bands.items()}
        else:
            values, bands = result.values, result.bands
        order = np.argsort(failed, kind="stable").tolist()
        failures = self._failures(batch, [failed[i] for i in order], [reasons[i] for i in order])
        return self._table(batch, values, bands, ok, result.horizon), failures

    def _score_series(self, batch: pa.Table) -> tuple[pa.Table, pa.Table]:
        """`score` series by series, through `Predictor.forecast` (explains short windows)."""
        spec = self.spec
        req = ForecastRequest(self._requests(batch), model=self.model, mode=spec.mode,
                              horizon=spec.horizon, levels=list(spec.levels))
        result = self.loop.run_until_complete(self.predictor.forecast(req, partial=True))
        ok: list[int] = []
        forecasts: list[SeriesForecast] = []
        failed: list[int] = []
        reasons: list[str] = []
        for i, r in enumerate(result.results):
            if isinstance(r, SeriesForecast):
                ok.append(i)
                forecasts.append(r)
            else:
                failed.append(i)
                reasons.append(r.error.message)
        failures = self._failures(batch, failed, reasons)
        if not forecasts:
            return self.spec.output_schema().empty_table(), failures
        values = np.stack([f.values for f in forecasts])  # [k, h, C]
        bands = {}
        for label in spec.labels:
            pairs = [f.intervals[label] for f in forecasts if f.intervals is not None]
            bands[label] = (np.stack([lo for lo, _ in pairs]), np.stack([hi for _, hi in pairs]))
        return self._table(batch, values, bands, ok, result.horizon), failures

    def _failures(self, batch: pa.Table, rows: list[int], reasons: list[str]) -> pa.Table:
        """The failures table (`failure_schema`): the ids of batch `rows`, with their reasons."""
        return pa.table({ID: batch.column(ID).take(pa.array(rows, pa.int64())),
                         "reason": pa.array(reasons, pa.string())},
                        schema=failure_schema(self.spec.id_type))

    def _table(self, batch: pa.Table, values: np.ndarray,
               bands: dict[str, tuple[np.ndarray, np.ndarray]], ok: list[int], h: int
               ) -> pa.Table:
        """Forecast rows in long form: `values` and each level's bands are [k, h, C] for the
        batch rows `ok`."""
        spec = self.spec
        schema = spec.output_schema()
        if not ok:
            return schema.empty_table()
        last = batch.column("last").to_numpy()[ok]
        step = batch.column("step").to_numpy()[ok]
        ticks = (last[:, None] + step[:, None] * np.arange(1, h + 1)).reshape(-1)  # [k * h]
        cols: dict[str, pa.Array | pa.ChunkedArray] = {
            ID: batch.column(ID).take(pa.array(np.repeat(np.asarray(ok, np.int64), h))),
            DS: pa.array(ticks, pa.int64()).cast(self.storage).cast(spec.time_type),
        }
        for j, c in enumerate(spec.channels):
            cols[c] = pa.array(values[:, :, j].reshape(-1), pa.float32())
        for label in spec.labels:
            lo, hi = bands[label]  # [k, h, C]
            for j, c in enumerate(spec.channels):
                cols[f"{c}-lo-{label}"] = pa.array(lo[:, :, j].reshape(-1), pa.float32())
                cols[f"{c}-hi-{label}"] = pa.array(hi[:, :, j].reshape(-1), pa.float32())
        return pa.table([cols[f.name] for f in schema], schema=schema)
