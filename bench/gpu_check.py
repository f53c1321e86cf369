"""GPU check of the serving core: CUDA vs CPU parity, latency and batcher throughput (issue 19).

    bash bench/gpu_check.sh            # on a machine with an NVIDIA GPU: venv, then this script

Loads bundled models (``models_registry/bundled/<name>/<version>/``: manifest + ONNX, sha256
checked) through the service's own core: ``OrtEngine`` sessions and ``ServedModel.run`` (an
ensemble runs its members and averages them, as the accurate path does). Inputs are real test
windows of the manifest's dataset (``data/<file>``, test split borders from the manifest), spread
evenly over the split. For each model:

1. parity: the provider under test against the CPU provider on the same windows, at batch 1 and
   at batch ``max(--batches)``; max abs difference must be <= ``--atol``;
2. placement: every session under test must report the provider under test first
   (``session.get_providers()[0]``); a silent CPU fallback is a failure, never a GPU figure;
3. latency: p50/p99 of ``ServedModel.run`` per batch size and provider, after warm-up;
4. throughput of the service's ``DynamicBatcher`` on the provider under test: concurrent
   in-process callers each submitting one window at a time (windows/s, mean rows per call).

Writes ``{"meta": {...}, "records": [...]}`` to ``--out`` (default ``bench/results/gpu.json``).
Exit codes: 0 all passed; 1 parity failed or a caller saw an error (the JSON is still written);
2 the provider under test is not available here (nothing written); 3 a session under test was
placed on another provider (nothing written).

``--providers-under-test CPUExecutionProvider`` compares CPU with CPU; it exists so the tests can
run the whole check without a GPU, and ``gpu_check.sh`` never passes it.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import datetime as dt
import gzip
import hashlib
import json
import platform
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from models_registry.manifest import Manifest
from service.core.batcher import DynamicBatcher
from service.core.engine import CPU, EngineOptions, OrtEngine
from service.core.models import ServedModel
from service.core.pool import PoolOptions

REPO = Path(__file__).resolve().parents[1]
CUDA = "CUDAExecutionProvider"
NEED_GPU = "gpu_check: an NVIDIA GPU with a working CUDA provider is needed"


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_manifest(bundle: Path, name: str, version: int) -> Manifest:
    path = bundle / name / str(version) / "manifest.json"
    return Manifest.model_validate_json(path.read_bytes())


def onnx_bytes(bundle: Path, manifest: Manifest) -> bytes:
    data = (bundle / manifest.name / str(manifest.version) / "model.onnx").read_bytes()
    if manifest.sha256 and hashlib.sha256(data).hexdigest() != manifest.sha256:
        raise SystemExit(f"gpu_check: {manifest.name}@{manifest.version}: sha256 mismatch")
    return data


def latest_version(bundle: Path, name: str) -> int:
    return max(int(p.name) for p in (bundle / name).iterdir() if p.name.isdigit())


def read_series(path: Path, features: list[str]) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="") as f:
        rows = list(csv.DictReader(f))
    return np.array([[float(r[c]) for c in features] for r in rows], dtype=np.float32)


def test_windows(manifest: Manifest, data_dir: Path, n: int) -> np.ndarray:
    """n windows [n, L, C] of the test split (lookback inside the split), spread evenly."""
    ds = manifest.dataset
    if ds is None or ds.file is None or not isinstance(ds.features, list):
        raise SystemExit(f"gpu_check: {manifest.name} names no dataset file and feature list")
    series = read_series(data_dir / ds.file, ds.features)
    start, end = ds.split_borders["test"]
    lookback = manifest.lookback
    starts = np.linspace(start, end - lookback, n).round().astype(int)
    return np.stack([series[s : s + lookback] for s in starts])  # [n, L, C]


def build(bundle: Path, name: str, provider: str, threads: int) -> ServedModel:
    manifest = load_manifest(bundle, name, latest_version(bundle, name))
    refs = manifest.members if manifest.kind == "ensemble" else [manifest.ref]
    options = EngineOptions(providers=(provider,), intra_threads=threads, inter_threads=1)
    engines = []
    for ref in refs:
        member = load_manifest(bundle, ref.name, ref.version)
        engine = OrtEngine(onnx_bytes(bundle, member), options, label=f"{ref} {provider}")
        if engine.provider != provider:
            log(
                f"FAIL placement: {engine.label} runs on {engine.provider}, not {provider} "
                f"(ONNX Runtime's log above says why; onnxruntime-gpu {ort.__version__} from "
                "PyPI is a CUDA 13 build, which needs an NVIDIA driver >= 580)"
            )
            raise SystemExit(3)
        engines.append(engine)
    pool = PoolOptions(engine=options)

    def factory(served: ServedModel) -> DynamicBatcher:
        return pool.batcher(served.run, executor=None)

    return ServedModel(manifest, engines, factory)


def raw_forecast(
    bundle: Path, manifest: Manifest, provider: str, options: dict[str, str], x: np.ndarray
) -> np.ndarray:
    """The members' mean forecast from plain sessions with explicit provider options."""
    refs = manifest.members if manifest.kind == "ensemble" else [manifest.ref]
    outs = []
    for ref in refs:
        data = onnx_bytes(bundle, load_manifest(bundle, ref.name, ref.version))
        wanted: list[str | tuple[str, dict[str, str]]] = [(provider, options)]
        if provider != CPU:
            wanted.append(CPU)
        sess = ort.InferenceSession(data, providers=wanted)
        if sess.get_providers()[0] != provider:
            log(f"FAIL placement: {ref} with {options} runs on {sess.get_providers()[0]}")
            raise SystemExit(3)
        outs.append(np.asarray(sess.run(None, {sess.get_inputs()[0].name: x})[0]))
    return np.asarray(np.mean(outs, axis=0, dtype=np.float32))


def latency(served: ServedModel, x: np.ndarray, repeats: int, budget_s: float) -> dict[str, Any]:
    for _ in range(5):
        served.run(x)
    times: list[float] = []
    stop = time.perf_counter() + budget_s
    while len(times) < repeats and (len(times) < 5 or time.perf_counter() < stop):
        t0 = time.perf_counter()
        served.run(x)
        times.append(time.perf_counter() - t0)
    ms = np.array(times) * 1e3
    return {
        "n": len(times),
        "p50_ms": round(float(np.percentile(ms, 50)), 4),
        "p99_ms": round(float(np.percentile(ms, 99)), 4),
    }


async def batcher_throughput(
    served: ServedModel, windows: np.ndarray, concurrency: int, seconds: float
) -> dict[str, Any]:
    """Callers each submit one window at a time through the service's DynamicBatcher."""
    pool = PoolOptions(engine=EngineOptions())
    calls: list[int] = []
    waiting = 0
    errors: list[str] = []
    executor = ThreadPoolExecutor(1, thread_name_prefix="gpu-check-batcher")
    batcher = pool.batcher(
        served.run,
        executor=executor,
        on_batch=lambda rows, _s, _w: calls.append(rows),
        load_hint=lambda: waiting,
    )
    for rows in (1, 8):  # seed the cost model as ServedModel.warmup does
        x = windows[:rows]
        batcher.timed_run(x)
        batcher.cost.observe(rows, batcher.timed_run(x)[1])
    deadline = time.perf_counter() + seconds
    done = 0

    async def caller(i: int) -> None:
        nonlocal waiting, done
        k = i
        while time.perf_counter() < deadline:
            x = windows[k % len(windows)][None]  # [1, L, C]
            k += concurrency
            waiting += 1
            try:
                y, _ = await batcher.submit(x)
            except Exception as exc:  # every outcome but a forecast counts as a failure
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            finally:
                waiting -= 1
            if y.shape != (1, served.horizon, x.shape[2]) or not np.isfinite(y).all():
                errors.append(f"bad output {y.shape}")
                continue
            done += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(caller(i) for i in range(concurrency)))
    elapsed = time.perf_counter() - t0
    await batcher.close()
    executor.shutdown()
    return {
        "concurrency": concurrency,
        "seconds": round(elapsed, 3),
        "windows": done,
        "windows_per_s": round(done / elapsed, 1),
        "calls": len(calls),
        "mean_rows_per_call": round(float(np.mean(calls)), 2) if calls else 0.0,
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
    }


def gpu_info() -> list[dict[str, str]]:
    if shutil.which("nvidia-smi") is None:
        return []
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    ).stdout
    fields = ("name", "driver", "memory")
    return [
        dict(zip(fields, (v.strip() for v in line.split(",")), strict=False))
        for line in out.splitlines()
        if line.strip()
    ]


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    p.add_argument("--models", default="etth1-h96,etth1-h96-ensemble")
    p.add_argument("--bundle", type=Path, default=REPO / "models_registry" / "bundled")
    p.add_argument("--data-dir", type=Path, default=REPO / "data")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "gpu.json")
    p.add_argument(
        "--providers-under-test",
        default=CUDA,
        help="test-only override (CPUExecutionProvider compares CPU with CPU)",
    )
    p.add_argument("--batches", default="1,256")
    p.add_argument("--atol", type=float, default=1e-4)
    p.add_argument("--repeats", type=int, default=200, help="timed calls per case (at most)")
    p.add_argument("--case-seconds", type=float, default=5.0, help="time cap per latency case")
    p.add_argument("--cpu-threads", type=int, default=0, help="CPU sessions' intra-op threads")
    p.add_argument("--concurrency", default="1,32,128")
    p.add_argument("--batcher-seconds", type=float, default=3.0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    under_test: str = args.providers_under_test
    available = ort.get_available_providers()
    if under_test not in available:
        print(
            f"{NEED_GPU}: {under_test} is not available in onnxruntime {ort.__version__} "
            f"(available: {', '.join(available)}); nothing written",
            file=sys.stderr,
        )
        return 2
    if under_test == CUDA and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()  # the CUDA and cuDNN libraries pip installed beside onnxruntime-gpu
    batches = [int(b) for b in args.batches.split(",")]
    for gpu_row in gpu_info():
        log(f"GPU {gpu_row}")
    started = time.perf_counter()
    records: list[dict[str, Any]] = []
    failed = False
    for name in args.models.split(","):
        log(f"{name}: loading on {under_test} and {CPU}")
        gpu = build(args.bundle, name, under_test, args.cpu_threads)
        cpu = build(args.bundle, name, CPU, args.cpu_threads)
        windows = test_windows(gpu.manifest, args.data_dir, max(batches))
        common = {
            "model": f"{gpu.name}@{gpu.version}",
            "kind": gpu.kind,
            "lookback": gpu.lookback,
            "horizon": gpu.horizon,
            "sessions_on": sorted({e.provider for e in gpu.engines}),
        }
        for batch in sorted({1, max(batches)}):
            x = windows[:batch]
            y_gpu, y_cpu = gpu.run(x.copy()), cpu.run(x.copy())
            err = float(np.abs(y_gpu - y_cpu).max())
            ok = bool(np.isfinite(y_gpu).all()) and err <= args.atol
            failed |= not ok
            records.append(
                {
                    **common,
                    "check": "parity",
                    "batch": batch,
                    "providers": [under_test, CPU],
                    "max_abs_err": err,
                    "max_abs_output": float(np.abs(y_cpu).max()),
                    "atol": args.atol,
                    "passed": ok,
                }
            )
            log(
                f"{name}: parity batch {batch}: max abs err {err:.3g} "
                f"({'ok' if ok else 'FAIL'}, atol {args.atol:g})"
            )
        # Diagnostic, not gating: the CUDA provider computes float32 matmuls in TF32 on Ampere
        # and later unless told not to, and the service's sessions leave it at its default.
        fp32 = {"use_tf32": "0"} if under_test == CUDA else {}
        x = windows[: max(batches)]
        err = float(
            np.abs(
                raw_forecast(args.bundle, gpu.manifest, under_test, fp32, x) - cpu.run(x.copy())
            ).max()
        )
        records.append(
            {
                **common,
                "check": "parity_full_fp32",
                "batch": len(x),
                "provider_options": fp32,
                "max_abs_err": err,
            }
        )
        log(f"{name}: parity batch {len(x)} with {fp32 or 'default options'}: {err:.3g}")
        for served, provider in ((gpu, under_test), (cpu, CPU)):
            for batch in batches:
                lat = latency(served, windows[:batch], args.repeats, args.case_seconds)
                records.append(
                    {**common, "check": "latency", "provider": provider, "batch": batch, **lat}
                )
                log(
                    f"{name}: {provider} batch {batch}: p50 {lat['p50_ms']} ms, "
                    f"p99 {lat['p99_ms']} ms ({lat['n']} calls)"
                )
        for c in (int(v) for v in args.concurrency.split(",") if v):
            res = asyncio.run(batcher_throughput(gpu, windows, c, args.batcher_seconds))
            failed |= res["errors"] > 0
            records.append({**common, "check": "batcher", "provider": under_test, **res})
            log(
                f"{name}: batcher c={c}: {res['windows_per_s']} windows/s, "
                f"{res['mean_rows_per_call']} rows/call, {res['errors']} errors"
            )
    meta = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "gpus": gpu_info(),
        "onnxruntime": ort.__version__,
        "available_providers": available,
        "provider_under_test": under_test,
        "python": platform.python_version(),
        "cpu_threads": args.cpu_threads,
        "inputs": "real test-split windows of the manifest's dataset, spread evenly",
        "latency": f"ServedModel.run after 5 warm-up calls; up to {args.repeats} calls or "
        f"{args.case_seconds} s per case",
        "batcher": f"DynamicBatcher with the service's default limits; one window per request; "
        f"{args.batcher_seconds} s per concurrency",
        "passed": not failed,
        "seconds": round(time.perf_counter() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "records": records}, indent=2) + "\n")
    log(f"wrote {args.out} in {meta['seconds']} s: {'passed' if not failed else 'FAILED'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
