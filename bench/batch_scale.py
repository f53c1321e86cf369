"""Series per second of the fast path: the Ray Data batch job against POST /v1/forecast/batch.

    python bench/batch_scale.py [--registry var/registry] [--model etth1-h96] [--series 300000]

One run, same series for every case (univariate windows of exactly the model's lookback, cut
from ETTh1 at random offsets and channels, with their real hourly timestamps). --repeats rounds
of (raw_ort, ray_1_actor, ray_2_actors) back to back: each case keeps its fastest run, each
ratio is the median of its rounds' ratios (the machine is shared; rounds minutes apart drift).
The informative cases (the endpoint, the shuffle) take the first --side-series series:

  ray_1_actor   python -m service.batch_job's pipeline on a local Ray, one scoring actor:
                Parquet (long layout, written sorted by id, as most exports are) in -> windows
                -> score -> Parquet out; the row groups' id statistics prove each read holds
                whole series, so there is no shuffle
  ray_2_actors  the same with two actors
  ray_1_actor_time_major  one actor on the same rows sorted by time: every row group holds
                every series, so the job co-locates rows with a shuffle first (informative)
  batch_endpoint  the service under uvicorn (one process), a client posting columnar msgpack
                bodies (float32 bins, starts + freq, so the answer has timestamps too) of
                --chunk series from --clients threads; answers decoded to arrays

`seconds` is wall time from the input to the forecasts: the job's from calling it (Ray already
started: its start-up is recorded apart as ray_init_s) to the Parquet written; the endpoint's from
the first request to the last answer. The job's forecasts are checked against the endpoint's
(`identical`). Writes bench/results/batch_scale.json and batch_scale.md (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models_registry.store import ONNX_FILE, FilesystemStore  # noqa: E402
from service.batch import JobError  # noqa: E402
from service.batch.target import Target, pin_model  # noqa: E402

ETTH1 = ROOT / "data" / "ETTh1.csv"
CHANNELS = ["HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT"]


def load_model(registry: Path, model: str) -> Target:
    if not registry.is_dir():
        sys.exit(f"no registry at {registry}: build the default model first with "
                 "`python -m training pipeline --quick` (writes ./var/registry)")
    try:
        return pin_model(FilesystemStore(registry), model, "fast")
    except JobError as exc:
        sys.exit(f"{exc}\n(the default model comes from `python -m training pipeline --quick`)")


def make_series(n: int, lookback: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n windows [n, L] float64 and their timestamps [n, L] (datetime64[s])."""
    table = pacsv.read_csv(ETTH1, convert_options=pacsv.ConvertOptions(
        column_types={"date": pa.timestamp("s")}))
    data = np.stack([table[c].to_numpy() for c in CHANNELS])  # [7, T]
    dates = table["date"].to_numpy()  # [T]
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, data.shape[1] - lookback, n)
    channels = rng.integers(0, len(CHANNELS), n)
    rows = starts[:, None] + np.arange(lookback)  # [n, L]
    return data[channels[:, None], rows], dates[rows]


def write_input(path: Path, values: np.ndarray, stamps: np.ndarray) -> list[str]:
    n, lookback = values.shape
    ids = [f"s{i:07d}" for i in range(n)]
    id_array = pa.DictionaryArray.from_arrays(
        pa.array(np.repeat(np.arange(n, dtype=np.int32), lookback)), pa.array(ids)
    ).cast(pa.string())
    table = pa.table({"unique_id": id_array,
                      "ds": pa.array(stamps.reshape(-1), pa.timestamp("s")),
                      "y": values.reshape(-1)})
    pq.write_table(table, path, row_group_size=1_000_000)
    return ids


# -- the job --------------------------------------------------------------------------------------


class CpuMeter:
    """CPU seconds the job's processes spend, by role, from Linux's /proc: the scoring actors
    (`ray::MapWorker...`), this driver, and Ray's own processes (raylet, GCS, its helper
    actors). A thread samples every process's counters every 0.25 s and keeps each process's
    last value, so a worker that exits mid-run is counted up to its last sample."""

    def __init__(self) -> None:
        self._tick = os.sysconf("SC_CLK_TCK")
        self._start = self._sample()
        self._last: dict[int, tuple[str, float]] = {}
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> dict[int, tuple[str, float]]:
        me, out = os.getpid(), {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")[0].decode()
            except (OSError, IndexError, UnicodeDecodeError):
                continue
            pid = int(entry)
            role = ("driver" if pid == me else "actors" if cmd.startswith("ray::MapWorker")
                    else "ray" if "ray" in cmd else "")
            if role:
                out[pid] = (role, (int(stat[11]) + int(stat[12])) / self._tick)
        return out

    def _run(self) -> None:
        while not self._stop:
            self._last.update(self._sample())
            time.sleep(0.25)

    def stop(self) -> dict[str, float]:
        self._stop = True
        self._thread.join()
        self._last.update(self._sample())
        spent: dict[str, float] = {"actors": 0.0, "driver": 0.0, "ray": 0.0}
        for pid, (role, seconds) in self._last.items():
            before = self._start.get(pid)
            spent[role] += seconds - (before[1] if before is not None else 0.0)
        return {f"{role}_cpu_s": round(v, 2) for role, v in spent.items()}


def run_ray_cases(args: argparse.Namespace, src: Path, work: Path, series: int, side: int,
                  raw_ort: Callable[[], dict[str, Any]],
                  ) -> tuple[list[dict[str, Any]], dict[str, Path], float, dict[str, list[float]]]:
    """The Ray cases, and raw ONNX Runtime (`raw_ort`, the floor) run again before each
    repeat, so each ratio is taken between runs minutes apart at most."""
    import ray

    from service.batch.inputs import colocated_row_groups, inspect_input, parquet_row_groups
    from service.batch.job import JobConfig, plan_job, run_job

    t0 = time.perf_counter()
    # Logical CPUs: 2 actors + 2 for read/shuffle/write tasks (see service.batch.job._start_ray).
    ray.init(num_cpus=args.ray_cpus or max(os.cpu_count() or 1, 4), include_dashboard=False,
             log_to_driver=False)
    ray_init_s = time.perf_counter() - t0
    records: list[dict[str, Any]] = []
    outputs: dict[str, Path] = {}
    try:
        # Warm-up on a slice (not recorded): worker processes, imports, the first shuffle.
        warm = work / "warm.parquet"
        pq.write_table(pq.read_table(src).slice(0, min(series, 1000) * args.lookback), warm)
        plan = plan_job(JobConfig(model=args.model, mode="fast", input=str(warm),
                                  output=str(work / "warm-out"), registry=str(args.registry),
                                  actors=2, progress=False))
        run_job(plan)
        # The same rows in time-major order (as daily exports are): every row group holds
        # every series, so the job co-locates them with a shuffle (informative case).
        time_major = work / "time-major.parquet"
        table = pq.read_table(src).slice(0, side * args.lookback)
        pq.write_table(table.sort_by([("ds", "ascending"), ("unique_id", "ascending")]),
                       time_major, row_group_size=1_000_000)
        del table
        # The two scaling cases alternate, --repeats times each, and keep their fastest run:
        # the machine is shared, and a run right after the other case can pay for Ray
        # replacing the previous job's worker processes.
        cases = [("raw_ort", src, 0), ("ray_1_actor", src, 1),
                 ("ray_2_actors", src, 2)] * args.repeats
        cases.append(("ray_1_actor_time_major", time_major, 1))
        runs: dict[str, list[tuple[float, float]]] = {}
        cpus: dict[str, list[dict[str, float]]] = {}
        raw_runs: list[dict[str, Any]] = []
        n_actors = {case: actors for case, _, actors in cases}
        inputs = {case: path for case, path, _ in cases}
        n_series = {case: side if path == time_major else series for case, path in inputs.items()}
        for case, path, actors in cases:
            if case == "raw_ort":
                raw_runs.append(raw_ort())
                continue
            n = n_series[case]
            out = work / case
            plan = plan_job(JobConfig(model=args.model, mode="fast", input=str(path),
                                      output=str(out), registry=str(args.registry),
                                      actors=actors, batch_size=args.batch_size,
                                      progress=False, overwrite=True))
            meter = CpuMeter()
            t0 = time.perf_counter()
            summary = run_job(plan)
            seconds = time.perf_counter() - t0
            cpu = meter.stop()
            assert summary.failed == 0, f"{summary.failed} series failed"
            assert summary.scored == n, f"{summary.scored} of {n} series scored"
            runs.setdefault(case, []).append((seconds, summary.seconds))
            cpus.setdefault(case, []).append(cpu)
            outputs[case] = out
            print(json.dumps({"case": case, "series": n, "seconds": round(seconds, 3), **cpu}),
                  flush=True)
        for case, times in runs.items():
            best = min(times)
            spec = inspect_input(str(inputs[case]))
            shuffled = colocated_row_groups(parquet_row_groups(spec), spec) is None
            # CPU seconds of the fastest run, by role (CpuMeter), and every run's.
            records.append(record(case, n_series[case], best[0], actors=n_actors[case],
                                  shuffle=shuffled, pipeline_s=round(best[1], 3),
                                  runs_s=[round(t, 3) for t, _ in times],
                                  **cpus[case][times.index(best)], cpu_runs=cpus[case]))
        fastest = min(raw_runs, key=lambda r: float(r["seconds"]))
        records.append({**fastest, "runs_s": [r["seconds"] for r in raw_runs]})
        # Ratios within each repeat (raw, 1 actor, 2 actors back to back).
        one = [t for t, _ in runs["ray_1_actor"]]
        two = [t for t, _ in runs["ray_2_actors"]]
        ratios = {
            "ray_1_actor/raw_ort": [float(r["seconds"]) / t for r, t in zip(raw_runs, one,
                                                                          strict=True)],
            "ray_2_actors/ray_1_actor": [a / b for a, b in zip(one, two, strict=True)],
        }
    finally:
        ray.shutdown()
    return records, outputs, ray_init_s, ratios


# -- the floor and the job's stages, in this process -----------------------------------------------


def run_raw_ort(args: argparse.Namespace, registry: Path, target: Target, values: np.ndarray
                ) -> tuple[dict[str, Any], np.ndarray]:
    """The floor: the model's ONNX file in one ONNX Runtime session (1 thread), fed the same
    windows as float32 arrays in batches of --batch-size; nothing else."""
    import onnxruntime as ort

    m = target.manifest
    onnx = registry / target.name / str(target.version) / ONNX_FILE
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(str(onnx), opts, providers=["CPUExecutionProvider"])
    x = values.astype(np.float32)[:, :, None]
    session.run(None, {m.input_name: x[: args.batch_size]})  # warm-up
    out = np.empty((len(x), m.horizon), np.float32)
    t0 = time.perf_counter()
    for a in range(0, len(x), args.batch_size):
        out[a : a + args.batch_size] = session.run(
            None, {m.input_name: x[a : a + args.batch_size]})[0][:, :, 0]
    seconds = time.perf_counter() - t0
    rec = record("raw_ort", len(x), seconds, threads=1, batch_size=args.batch_size)
    print(json.dumps({"case": "raw_ort", "series": len(x), "seconds": rec["seconds"]}),
          flush=True)
    return rec, out


def profile_stages(args: argparse.Namespace, src: Path, work: Path, series: int
                   ) -> list[dict[str, Any]]:
    """The job's steps on each of its reads in turn, in this process (one thread, no Ray),
    timed per step over all the reads: where a job's CPU time goes before Ray adds start-up,
    scheduling and moving blocks between processes."""
    from service.batch.inputs import (
        build_windows,
        colocated_row_groups,
        parquet_row_groups,
        read_row_groups,
    )
    from service.batch.job import JobConfig, plan_job, score_spec
    from service.batch.scoring import OutputSink, Scorer

    plan = plan_job(JobConfig(model=args.model, mode="fast", input=str(src),
                              output=str(work / "profile-out"), registry=str(args.registry),
                              progress=False))
    spec, lookback = plan.input, plan.target.manifest.lookback
    kw = {"id_col": spec.id_col, "time_col": spec.time_col, "value_cols": spec.value_cols}
    scorer = Scorer(score_spec(plan))
    sink = OutputSink(str(work / "profile-out"))
    reads = colocated_row_groups(parquet_row_groups(spec), spec)
    assert reads is not None, "the input is written sorted by id"
    spent = dict.fromkeys(("read", "build_windows", "score", "write"), 0.0)

    def step(name: str, fn: Any) -> Any:
        t0 = time.perf_counter()
        result = fn()
        spent[name] += time.perf_counter() - t0
        return result

    for piece in reads:
        block = step("read", lambda p=piece: read_row_groups(pa.Table.from_pylist([p]),
                                                            spec=spec))
        windows = step("build_windows", lambda b=block: build_windows(
            b, time_type=spec.time_type, id_type=spec.id_type, lookback=lookback, **kw))
        scored = step("score", lambda w=windows: scorer(w))
        step("write", lambda w=windows, f=scored: sink.write(f, w["unique_id"][0].as_py(),
                                                            w.num_rows))
    rows = [record(f"stage_{name}", series, seconds) for name, seconds in spent.items()]
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows


# -- the endpoint ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(registry: Path, model: str, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DISTILCAST_REGISTRY_ROOT": str(registry),
           "DISTILCAST_SHADOW_FRACTION": "0", "DISTILCAST_DEFAULT_MODEL": model,
           "DISTILCAST_ALIAS_REFRESH_S": "0"}
    env.pop("DISTILCAST_REDIS_URL", None)
    cmd = [sys.executable, "-m", "uvicorn", "service.app:app_factory", "--factory", "--host",
           "127.0.0.1", "--port", str(port), "--log-level", "warning", "--no-access-log"]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.terminate()
    raise RuntimeError("the service did not become ready")


def run_endpoint(args: argparse.Namespace, ids: list[str], values: np.ndarray,
                 stamps: np.ndarray, horizon: int) -> tuple[dict[str, Any], np.ndarray]:
    import httpx

    n = len(ids)
    starts = [datetime.fromisoformat(str(s)).isoformat() for s in stamps[:, 0].astype("M8[s]")]
    x = values.astype("<f4")
    bodies = []
    for a in range(0, n, args.chunk):
        b = min(n, a + args.chunk)
        bodies.append((a, msgspec.msgpack.encode({
            "model": args.model, "mode": "fast", "ids": ids[a:b],
            "sizes": [values.shape[1]] * (b - a), "values": x[a:b].tobytes(),
            "starts": starts[a:b], "freq": "h"})))
    port = free_port()
    server = start_server(args.registry, args.model, port)
    url = f"http://127.0.0.1:{port}/v1/forecast/batch"
    headers = {"Content-Type": "application/msgpack", "Accept": "application/msgpack"}
    forecasts = np.zeros((n, horizon), np.float32)

    def post(item: tuple[int, bytes], client: httpx.Client) -> None:
        a, body = item
        r = client.post(url, content=body, headers=headers)
        r.raise_for_status()
        for i, f in enumerate(msgspec.msgpack.decode(r.content)["forecasts"]):
            forecasts[a + i] = np.frombuffer(f["values"], "<f4")

    try:
        clients = [httpx.Client(timeout=300) for _ in range(args.clients)]
        post(bodies[0], clients[0])  # warm-up (not recorded)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            futures = [pool.submit(post, item, clients[k % args.clients])
                       for k, item in enumerate(bodies)]
            for f in futures:
                f.result()
        seconds = time.perf_counter() - t0
        for c in clients:
            c.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    rec = record("batch_endpoint", n, seconds, clients=args.clients, chunk=args.chunk)
    print(json.dumps(rec), flush=True)
    return rec, forecasts


# -- results --------------------------------------------------------------------------------------


def record(case: str, series: int, seconds: float, **extra: Any) -> dict[str, Any]:
    return {"case": case, "series": series, "seconds": round(seconds, 3),
            "series_per_s": round(series / seconds, 1), **extra}


def job_forecasts(out: Path, n: int, horizon: int) -> np.ndarray:
    table = pq.read_table(out, columns=["unique_id", "ds", "y"])
    table = table.sort_by([("unique_id", "ascending"), ("ds", "ascending")])
    return table["y"].to_numpy().reshape(n, horizon)


def write_md(path: Path, records: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    lines = [
        "# Batch scoring: Ray Data job vs the batch endpoint",
        "",
        f"Model `{meta['model']}` (fast path, lookback {meta['lookback']}, horizon "
        f"{meta['horizon']}); {meta['series']} univariate ETTh1 windows; {meta['machine']}; "
        f"load average at start {meta['load_average']}. Local Ray with {meta['ray_cpus']} "
        f"logical CPUs (start-up {meta['ray_init_s']} s, not counted). Forecasts identical "
        f"between the job and the endpoint: {meta['identical']}.",
        "",
        "| case | series | seconds | series/s |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {r['case']} | {r['series']} | {r['seconds']:.2f} | {r['series_per_s']:.0f} |"
              for r in records if "case" in r]
    lines += ["", "Taken with the machine otherwise idle (the background training paused with "
              "SIGSTOP for the run). Each actor is given 1 CPU of a local Ray with "
              f"{meta['ray_cpus']} logical CPUs and does a block's whole chain (read, windows, "
              "score, write its Parquet file): the driver and Ray's own processes share the same "
              "2 cores (Ray runs its workers at niceness 15: any other busy process starves "
              f"them). {meta['repeats']} rounds of raw_ort, ray_1_actor, ray_2_actors back to "
              "back; each case's fastest run is in the table (every run in `runs_s` of the "
              "JSON), each ratio is the median of its rounds' ratios. A job's time includes "
              "starting its actors (about 2 s)."]
    lines += ["", "| ratio | value (median of rounds) | each round | target |",
              "|---|---:|---|---:|"]
    lines += [f"| {r['ratio']} | {r['value']:.3f} | "
              f"{', '.join(f'{v:.3f}' for v in r['per_repeat'])} | {r['target']} |"
              for r in records if "ratio" in r]
    by_case = {r["case"]: r for r in records if "case" in r}
    one, two = by_case.get("ray_1_actor"), by_case.get("ray_2_actors")
    if one and two and "actors_cpu_s" in one and "actors_cpu_s" in two:
        cap = one["seconds"] / (two["actors_cpu_s"] / 2)
        lines += ["", "CPU seconds of each case's fastest run, by role (`CpuMeter`: Linux "
                  "/proc, sampled every 0.25 s): "
                  + "; ".join(f"{r['case']}: actors {r['actors_cpu_s']:.1f}, driver "
                              f"{r['driver_cpu_s']:.1f}, Ray's own processes {r['ray_cpu_s']:.1f}"
                              for r in (one, two))
                  + f". Two actors spend {two['actors_cpu_s'] / one['actors_cpu_s']:.2f}x the "
                  "actor CPU seconds of one for the same series; were both cores scoring all "
                  f"the time, ray_2_actors/ray_1_actor would be ~{cap:.2f}. The gap to that is "
                  "the time they are not (actor start-up, the last blocks, the driver's and "
                  "Ray's own share of the 2 cores)."]
    stages = sum(r["seconds"] for c, r in by_case.items() if c.startswith("stage_"))
    if stages and "ray_1_actor" in by_case:
        lines += ["", f"`stage_*`: each step of the job run in one process, one thread, no "
                  f"Ray, block by block: {stages:.2f} s in all, against "
                  f"{by_case['ray_1_actor']['seconds']:.2f} s for the job on Ray with one "
                  "actor (no shuffle; starting the actor included). With a shuffle (an "
                  "all-to-all: no window is scored before every row is read and "
                  "repartitioned) see ray_1_actor_time_major."]
    lines += ["", f"`python bench/batch_scale.py --registry {meta['registry']} --model "
              f"{meta['model_arg']} --series {meta['series']} --side-series {meta['side_series']} "
              f"--repeats {meta['repeats']}`", ""]
    path.write_text("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--registry", type=Path, default=ROOT / "var" / "registry")
    p.add_argument("--model", default="etth1-h96")
    p.add_argument("--series", type=int, default=300_000)
    p.add_argument("--batch-size", type=int, default=4096, help="series per actor call")
    p.add_argument("--chunk", type=int, default=10_000, help="series per endpoint request")
    p.add_argument("--clients", type=int, default=2, help="concurrent endpoint clients")
    p.add_argument("--ray-cpus", type=int, help="logical CPUs of the local Ray (default: >= 4)")
    p.add_argument("--repeats", type=int, default=3,
                   help="rounds of (raw ORT, 1 actor, 2 actors); ratios: median over rounds")
    p.add_argument("--side-series", type=int, default=100_000,
                   help="series for the endpoint and time-major cases (the first ones)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args()

    load_model(args.registry, args.model)  # a clear exit when the model is not there
    work = Path(tempfile.mkdtemp(prefix="batch-scale-"))
    # A copy: opening a registry writes its lock and store id, and the bundled export must stay
    # exactly as its SHA256SUMS lists it.
    source_registry = args.registry
    args.registry = work / "registry"
    shutil.copytree(source_registry, args.registry)
    target = load_model(args.registry, args.model)
    m = target.manifest
    if m.channels is not None:
        sys.exit(f"{target.label} reads {m.channels} channels together; this benchmark scores "
                 "univariate series, so it needs a channel-independent student (manifest "
                 "channels null), e.g. the quick pipeline's: python -m training pipeline --quick "
                 "--dataset ETTh1 --horizon 96 --seed 0 --registry /tmp/quick, then "
                 "--registry /tmp/quick")
    args.lookback = m.lookback
    fixture = bool(m.config.get("fixture")) or m.code_version == "fixture"
    if fixture and args.out.resolve() == (ROOT / "bench" / "results").resolve():
        sys.exit("this registry holds a test fixture model: pass --out elsewhere "
                 "(fixture numbers are not results)")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    try:
        values, stamps = make_series(args.series, m.lookback)
        src = work / "series.parquet"
        ids = write_input(src, values, stamps)
        side = min(args.side_series, args.series)
        endpoint, expected = run_endpoint(args, ids[:side], values[:side], stamps[:side],
                                          m.horizon)
        raw_forecasts: list[np.ndarray] = []

        def raw_ort() -> dict[str, Any]:
            rec, out = run_raw_ort(args, args.registry, target, values)
            raw_forecasts[:] = [out[:side]]
            return rec

        stages = profile_stages(args, src, work, args.series)
        records, outputs, ray_init_s, ratios = run_ray_cases(args, src, work, args.series, side,
                                                             raw_ort)
        # Ids sort in input order: the first `side` series of each output are the endpoint's.
        identical = all(
            np.array_equal(job_forecasts(out, side if case.endswith("time_major")
                                         else args.series, m.horizon)[:side], expected)
            for case, out in outputs.items()
        )
        # The service adds intervals and checks around the same session call: equal values.
        raw_matches = bool(np.allclose(raw_forecasts[0], expected, rtol=0, atol=1e-5))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    records += [endpoint, *stages]
    records += [
        {"ratio": name, "value": round(float(np.median(values_)), 3),
         "per_repeat": [round(v, 3) for v in values_], "target": target_}
        for (name, values_), target_ in zip(ratios.items(), (0.5, 1.7), strict=True)
    ]
    meta = {
        "model": target.label,
        "model_arg": args.model,
        "registry": str(source_registry),
        "fixture_model": fixture,
        "lookback": m.lookback,
        "horizon": m.horizon,
        "series": args.series,
        "batch_size": args.batch_size,
        "ray_cpus": args.ray_cpus or max(os.cpu_count() or 1, 4),
        "ray_init_s": round(ray_init_s, 2),
        "repeats": args.repeats,
        "side_series": min(args.side_series, args.series),
        "identical": identical,
        "raw_ort_matches_endpoint": raw_matches,
        "cpus_per_actor": 1.0,
        "load_average": round(load, 2) if load is not None else None,
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, {platform.python_version()}",
        "date": datetime.now().isoformat(timespec="seconds"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "batch_scale.json").write_text(
        json.dumps({"meta": meta, "records": records}, indent=2) + "\n")
    write_md(args.out / "batch_scale.md", records, meta)
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
