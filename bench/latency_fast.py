"""The fast path against the JSON-over-HTTP floor, interleaved: `python bench/latency.py fast`.

    python bench/latency.py fast [--registry DIR] [--model etth1-h96] [--rounds 5]
                                 [--round-s 3] [--concurrency 1 8]

Both servers run at once, pinned to core 0 like bench/latency.py's: the minimal orjson+numpy
ASGI echo (`echo_min`) and the service (`fast`: POST /v1/forecast, mode fast), each sent the same
one-series body (lookback x 7 real ETTh1 rows) by wrk on core 1. They alternate for `--rounds`
rounds of `--round-s` seconds per concurrency, so a neighbour that loads the shared machine for
a while slows both sides of a round alike; each round's ratio is fast's p50 over echo_min's, and
the median of the rounds is the record `{"ratio": "fast/echo_min", "concurrency", "value"}`
(target <= 1.5), merged into bench/results/latency.json with the per-round figures (the other
records are kept). At concurrency 1 each round also times the model alone (`raw_ort_1`: one
window in process, one thread on core 0), recorded as `raw_ort_1/echo_min`: the share of the
floor the model's own compute takes, below which no serving work can bring `fast/echo_min`
(fast is at least the echo's parse + this). Without --registry the bundled models are imported
into a temporary registry. Pause other CPU-heavy work meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import latency

ROOT = latency.ROOT


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--registry", type=Path, default=None)
    p.add_argument("--model", default="etth1-h96")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--round-s", type=float, default=3.0)
    p.add_argument("--warmup", type=float, default=0.5)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    p.add_argument("--server-core", type=int, default=0)
    p.add_argument("--client-core", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="latency-fast-"))
    registry = args.registry
    if registry is None:
        sys.path.insert(0, str(ROOT))
        from models_registry.bundle import BUNDLED_DIR, import_models
        from models_registry.store import FilesystemStore

        registry = tmp / "registry"
        import_models(BUNDLED_DIR, FilesystemStore(registry))
    lookback, horizon, onnx_bytes = latency.registry_model(registry, args.model)
    paths, windows = latency.bodies(args.model, lookback, tmp)
    body = paths["fast"]
    lua = tmp / "post.lua"
    lua.write_text(latency.WRK_LUA)

    base_env = {**os.environ, "ECHO_HORIZON": str(horizon), "PYTHONPATH": str(ROOT)}
    echo_port, fast_port = latency.free_port(), latency.free_port()
    echo_url = f"http://127.0.0.1:{echo_port}{latency.FAST_ROUTE}"
    fast_url = f"http://127.0.0.1:{fast_port}{latency.FAST_ROUTE}"
    env = {**base_env, "DISTILCAST_REGISTRY_ROOT": str(registry),
           "DISTILCAST_SHADOW_FRACTION": "0", "DISTILCAST_DEFAULT_MODEL": args.model}
    env.pop("DISTILCAST_REDIS_URL", None)
    cmd = [sys.executable, "-m", "uvicorn", "service.app:app_factory", "--factory", "--host",
           "127.0.0.1", "--port", str(fast_port), "--log-level", "warning", "--no-access-log"]
    servers = [
        latency.Server(
            latency.pinned(args.server_core, [sys.executable, latency.__file__, "serve",
                                              "echo_min", str(echo_port)]),
            base_env, latency._probe(echo_url)),
    ]
    rounds: dict[int, list[dict[str, Any]]] = {c: [] for c in args.concurrency}
    try:
        servers.append(latency.Server(latency.pinned(args.server_core, cmd), env,
                                      f"http://127.0.0.1:{fast_port}/readyz"))
        for r in range(args.rounds):
            for conc in args.concurrency:
                m_echo = latency.measure(echo_url, body, conc, args.round_s, args.warmup,
                                         args.client_core, lua)
                m_fast = latency.measure(fast_url, body, conc, args.round_s, args.warmup,
                                         args.client_core, lua)
                row: dict[str, Any] = {
                    "echo_min_p50_ms": round(m_echo["p50_ms"], 4),
                    "fast_p50_ms": round(m_fast["p50_ms"], 4),
                    "ratio": round(m_fast["p50_ms"] / m_echo["p50_ms"], 3),
                }
                if conc == 1:
                    raw = latency.raw_ort(onnx_bytes, windows[-1:], args.round_s,
                                          args.server_core)
                    row["raw_ort_1_p50_ms"] = round(raw["p50_ms"], 4)
                    row["raw_ort_1_ratio"] = round(raw["p50_ms"] / m_echo["p50_ms"], 3)
                rounds[conc].append(row)
                print(json.dumps({"round": r, "concurrency": conc, **row}), flush=True)
    finally:
        for server in servers:
            server.stop()

    meta = {"model": args.model, "lookback": lookback, "horizon": horizon,
            "registry": "bundled" if args.registry is None else str(args.registry),
            "round_s": args.round_s, "server_core": args.server_core,
            "client_core": args.client_core,
            "load_generator": "wrk" if shutil.which("wrk") else "asyncio client"}
    method = "interleaved rounds (bench/latency_fast.py), median of the rounds' ratios"
    new: list[dict[str, Any]] = []
    for conc, rows in rounds.items():
        ratios = [x["ratio"] for x in rows]
        new.append({
            "ratio": "fast/echo_min", "concurrency": conc,
            "value": round(statistics.median(ratios), 3), "method": method,
            "echo_min_p50_ms": round(statistics.median(x["echo_min_p50_ms"] for x in rows), 4),
            "fast_p50_ms": round(statistics.median(x["fast_p50_ms"] for x in rows), 4),
            "rounds": rows, "meta": {**meta, "spread": [min(ratios), max(ratios)]},
        })
        if conc == 1:
            shares = [x["raw_ort_1_ratio"] for x in rows]
            new.append({
                "ratio": "raw_ort_1/echo_min", "concurrency": 1,
                "value": round(statistics.median(shares), 3), "method": method,
                "raw_ort_1_p50_ms": round(statistics.median(x["raw_ort_1_p50_ms"] for x in rows),
                                          4),
                "meta": {**meta, "spread": [min(shares), max(shares)]},
            })
    out = args.out / "latency.json"
    data = json.loads(out.read_text()) if out.exists() else {"meta": {}, "records": []}
    replaced = {(r["ratio"], r["concurrency"]) for r in new}
    data["records"] = [r for r in data["records"]
                       if (r.get("ratio"), r.get("concurrency")) not in replaced] + new
    args.out.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n")
    latency.rewrite_md(args.out)
    for rec in new:
        print(json.dumps({k: rec[k] for k in ("ratio", "concurrency", "value")}))
