"""The Arrow batch against raw ONNX Runtime, interleaved: `python bench/latency.py arrow`.

    python bench/latency.py arrow [--registry DIR] [--model etth1-h96] [--rounds 7]
                                  [--round-s 4]

The service (uvicorn, pinned to core 0 like bench/latency.py's) gets the 1000-series batch as an
Arrow IPC stream (long form: `unique_id` and 7 float32 value columns, answered in Arrow), one
request at a time from this process on core 1; raw ONNX Runtime runs the same 1000 windows in
this process, one thread on core 0 (bench/latency.py's `raw_ort`). The two alternate for
`--rounds` rounds of `--round-s` seconds each, so a neighbour that loads the machine for a while
slows both sides of a round alike; each round's ratio is raw ORT's median time over the Arrow
request's median time (series/s over series/s at concurrency 1), and the median of the rounds is
the record `{"ratio": "batch_arrow/raw_ort", "concurrency": 1, "value"}`, merged into
bench/results/latency.json with the per-round figures (the other records are kept). Without
--registry the bundled models are imported into a temporary registry.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import latency
import numpy as np

ROOT = latency.ROOT


def arrow_times(port: int, path: str, body: bytes, seconds: float) -> list[float]:
    """Seconds per request, one request in flight on a kept-alive connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    headers = {"Content-Type": latency.ARROW, "Accept": latency.ARROW}
    times: list[float] = []
    stop = time.perf_counter() + seconds
    try:
        while time.perf_counter() < stop or len(times) < 3:
            t0 = time.perf_counter()
            conn.request("POST", path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
            times.append(time.perf_counter() - t0)
            if response.status != 200:
                raise RuntimeError(f"{response.status}: {data[:300]!r}")
    finally:
        conn.close()
    return times


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--registry", type=Path, default=None)
    p.add_argument("--model", default="etth1-h96")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--round-s", type=float, default=4.0)
    p.add_argument("--server-core", type=int, default=0)
    p.add_argument("--client-core", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="latency-arrow-"))
    registry = args.registry
    if registry is None:
        sys.path.insert(0, str(ROOT))
        from models_registry.bundle import BUNDLED_DIR, import_models
        from models_registry.store import FilesystemStore

        registry = tmp / "registry"
        import_models(BUNDLED_DIR, FilesystemStore(registry))
    lookback, horizon, onnx_bytes = latency.registry_model(registry, args.model)
    paths, windows = latency.bodies(args.model, lookback, tmp)
    body = paths["batch_arrow"].read_bytes()

    port = latency.free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DISTILCAST_REGISTRY_ROOT": str(registry),
           "DISTILCAST_SHADOW_FRACTION": "0", "DISTILCAST_DEFAULT_MODEL": args.model,
           "DISTILCAST_MAX_IN_FLIGHT_BYTES": str(512 * 1024 * 1024)}
    env.pop("DISTILCAST_REDIS_URL", None)
    cmd = [sys.executable, "-m", "uvicorn", "service.app:app_factory", "--factory", "--host",
           "127.0.0.1", "--port", str(port), "--log-level", "warning", "--no-access-log"]
    server = latency.Server(latency.pinned(args.server_core, cmd), env,
                            f"http://127.0.0.1:{port}/readyz")
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.client_core})
    route = f"/v1/forecast/batch?model={args.model}&mode=fast"
    rounds: list[dict[str, Any]] = []
    try:
        latency.check_once(f"http://127.0.0.1:{port}{route}", paths["batch_arrow"])
        arrow_times(port, route, body, 1.0)  # warm-up
        for r in range(args.rounds):
            served = arrow_times(port, route, body, args.round_s)
            raw = latency.raw_ort(onnx_bytes, windows, args.round_s, args.server_core)
            served_ms = 1000 * statistics.median(served)
            rounds.append({"batch_arrow_p50_ms": round(served_ms, 3),
                           "raw_ort_p50_ms": round(raw["p50_ms"], 3),
                           "ratio": round(raw["p50_ms"] / served_ms, 3)})
            print(json.dumps({"round": r, **rounds[-1]}), flush=True)
    finally:
        server.stop()

    value = statistics.median(x["ratio"] for x in rounds)
    arrow_ms = statistics.median(x["batch_arrow_p50_ms"] for x in rounds)
    raw_ms = statistics.median(x["raw_ort_p50_ms"] for x in rounds)
    rec = {
        "ratio": "batch_arrow/raw_ort", "concurrency": 1, "value": round(value, 3),
        "method": "interleaved rounds (bench/latency_arrow.py), median of the rounds' ratios",
        "batch_arrow_p50_ms": round(arrow_ms, 3), "raw_ort_p50_ms": round(raw_ms, 3),
        "rounds": rounds,
        "meta": {"model": args.model, "lookback": lookback, "horizon": horizon,
                 "series": len(windows),
                 "registry": "bundled" if args.registry is None else str(args.registry),
                 "round_s": args.round_s, "server_core": args.server_core,
                 "client_core": args.client_core,
                 "spread": [float(np.min([x["ratio"] for x in rounds])),
                            float(np.max([x["ratio"] for x in rounds]))]},
    }
    out = args.out / "latency.json"
    data = json.loads(out.read_text()) if out.exists() else {"meta": {}, "records": []}
    data["records"] = [r for r in data["records"]
                       if not (r.get("ratio") == "batch_arrow/raw_ort"
                               and r.get("concurrency") == 1)] + [rec]
    args.out.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n")
    latency.rewrite_md(args.out)
    print(json.dumps({k: rec[k] for k in ("ratio", "concurrency", "value")}))
