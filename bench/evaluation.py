"""Backtest and live accuracy, measured.

    python bench/evaluation.py [--redis redis://127.0.0.1:6379/15] [--rounds 5]

1. Backtest check: the bundled students (ETTh1-h96, ETTh2-h96) served by the real app over HTTP;
   `POST /v1/backtest` on the data file up to the test split's end with h=96, step 1 and as many
   windows as the test split holds (every window the training code scores on the test split).
   The overall MSE and MAE must equal the manifest's `test_mse_raw` / `test_mae_raw` (up to
   float32 summation order): the rolling-origin windows are the evaluation windows.
2. Remember cost: `service.core.accuracy.records` + `remember` for one 1000-series batch answer
   (h=96, 7 channels, hourly times, no intervals), in process and in Redis (median of `--rounds`);
   what a timed batch adds to its worker's event loop just after the answer.

Writes bench/results/evaluation.json and evaluation.md.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import platform
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import uvicorn

from models_registry.bundle import import_models
from models_registry.store import FilesystemStore
from service.app import create_app
from service.config import Settings
from service.core.accuracy import InProcessMemory, RedisMemory, records
from service.core.timeaxis import from_start
from service.core.types import ForecastResult, SeriesForecast

ROOT = Path(__file__).resolve().parent.parent
BUNDLE = ROOT / "models_registry" / "bundled"
MODELS = ("etth1-h96", "etth2-h96")


def load_csv(path: Path, features: list[str]) -> tuple[list[str], np.ndarray]:
    with path.open() as f:
        rows = list(csv.DictReader(f))
    stamps = [r["date"] for r in rows]
    values = np.array([[float(r[c]) for c in features] for r in rows], dtype=np.float32)
    return stamps, values


def backtest_check(registry: Path) -> list[dict[str, Any]]:
    settings = Settings(registry_root=registry, redis_url=None, configure_logging=False,
                        shadow_fraction=0.0, alias_refresh_s=0)
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    out = []
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as client:
            for name in MODELS:
                manifest = client.get(f"/v1/models/{name}").json()["card"]
                dataset = manifest["dataset"]
                lo, hi = dataset["split_borders"]["test"]
                lookback, h = manifest["lookback"], manifest["horizon"]
                stamps, values = load_csv(ROOT / "data" / dataset["file"], dataset["features"])
                n_windows = hi - lo - lookback - h + 1
                body = {"model": name, "h": h, "n_windows": n_windows, "step": 1,
                        "series": [{"id": dataset["name"], "values": values[:hi].tolist(),
                                    "timestamps": stamps[:hi]}]}
                t0 = time.perf_counter()
                r = client.post("/v1/backtest", json=body)
                seconds = time.perf_counter() - t0
                if r.status_code != 200:
                    raise RuntimeError(f"{name}: {r.status_code} {r.text[:500]}")
                answer = r.json()
                overall = answer["metrics"]["fast"]["overall"]
                metrics = manifest["metrics"]
                out.append({
                    "model": name, "windows": n_windows, "h": h, "lookback": lookback,
                    "first_cutoff": answer["windows"][0]["cutoff"],
                    "backtest_mse": overall["mse"],
                    "manifest_test_mse_raw": metrics["test_mse_raw"],
                    "backtest_mae": overall["mae"],
                    "manifest_test_mae_raw": metrics["test_mae_raw"],
                    "mse_rel_diff": abs(overall["mse"] / metrics["test_mse_raw"] - 1),
                    "mae_rel_diff": abs(overall["mae"] / metrics["test_mae_raw"] - 1),
                    "request_seconds": round(seconds, 2),
                })
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    return out


def batch_result(n: int = 1000, h: int = 96, channels: int = 7) -> ForecastResult:
    stamps = from_start("2024-01-01T00:00:00", "h", 720, "start", "freq").future(h)
    rng = np.random.default_rng(0)
    return ForecastResult("etth1-h96", 1, "fast", "CPUExecutionProvider", h, [
        SeriesForecast(i, rng.normal(size=(h, channels)).astype(np.float32), stamps, None)
        for i in range(n)])


async def remember_cost(redis_url: str | None, rounds: int) -> dict[str, Any]:
    result = batch_result()
    out: dict[str, Any] = {"series": 1000, "h": 96, "channels": 7}
    times: dict[str, list[float]] = {"records_ms": [], "in_process_ms": [], "redis_ms": []}
    for i in range(rounds):
        t0 = time.perf_counter()
        recs = records(result, 3600.0)
        times["records_ms"].append((time.perf_counter() - t0) * 1000)
        memory = InProcessMemory(20_000_000)
        t0 = time.perf_counter()
        await memory.remember(recs)
        times["in_process_ms"].append((time.perf_counter() - t0) * 1000)
        if redis_url:
            prefix = f"bench-{uuid.uuid4().hex[:8]}-{i}:"
            store = RedisMemory(redis_url, prefix, 20_000_000)
            try:
                t0 = time.perf_counter()
                await store.remember(recs)
                times["redis_ms"].append((time.perf_counter() - t0) * 1000)
                keys = [k async for k in store.client.scan_iter(f"{prefix}*")]
                for j in range(0, len(keys), 500):
                    await store.client.delete(*keys[j : j + 500])
            finally:
                await store.close()
    for key, values in times.items():
        if values:
            out[key] = round(statistics.median(values), 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/15",
                        help="Redis for the remember cost ('' to skip)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = FilesystemStore(Path(tmp) / "registry")
        import_models(BUNDLE, store)
        checks = backtest_check(store.root)
    cost = asyncio.run(remember_cost(args.redis or None, args.rounds))
    results = {"backtest_vs_manifest": checks, "remember_cost": cost,
               "machine": {"python": platform.python_version(), "arch": platform.machine(),
                           "cpus": os.cpu_count()}}
    out_dir = ROOT / "bench" / "results"
    (out_dir / "evaluation.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = ["# Backtest against the manifests, and the live-accuracy remember cost", "",
             "Command: `python bench/evaluation.py`", "",
             "| model | windows | backtest MSE | manifest test_mse_raw | backtest MAE | "
             "manifest test_mae_raw |", "|---|---|---|---|---|---|"]
    for c in checks:
        lines.append(f"| {c['model']} | {c['windows']} | {c['backtest_mse']:.6f} | "
                     f"{c['manifest_test_mse_raw']:.6f} | {c['backtest_mae']:.6f} | "
                     f"{c['manifest_test_mae_raw']:.6f} |")
    lines += ["", "Remembering one 1000-series answer (h=96, 7 channels), median of "
              f"{args.rounds}: " + ", ".join(f"{k} {v}" for k, v in cost.items()
                                             if k.endswith("_ms")), ""]
    (out_dir / "evaluation.md").write_text("\n".join(lines))
    print("\n".join(lines))  # noqa: T201


if __name__ == "__main__":
    main()
