"""Seconds from `bash scripts/serve.sh` to `/readyz` 200 on a fresh registry (the bundled models).

    python bench/serve_ready.py [--rounds 3] [--target 15]

What a fresh clone does after `scripts/bootstrap.sh` has set up `.venv` (run first, not timed):
each round starts `scripts/serve.sh` with `DISTILCAST_REGISTRY_ROOT` on a new, empty folder and
its own port, so the clock covers serve.sh's bootstrap check, the bundle import
(`scripts/import_bundle.sh`), `build_default_model.sh` finding the default model already there
(no training), the service start and its loading the models, until `GET /readyz` answers 200
(polled every 50 ms). The round then checks that no training ran (no `runs/` folder was
created for it) and that the default model's card carries lineage, and stops the service.

Writes bench/results/serve_ready.json and serve_ready.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MODEL = "etth1-h96"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def one_round(limit: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="serve-ready-") as tmp:
        registry = Path(tmp) / "registry"
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILCAST_")}
        env.update(DISTILCAST_REGISTRY_ROOT=str(registry), DISTILCAST_PORT=str(port),
                   DISTILCAST_HOST="127.0.0.1")
        log = open(Path(tmp) / "serve.log", "wb")  # closed in the finally below
        t0 = time.perf_counter()
        proc = subprocess.Popen(["bash", "scripts/serve.sh"], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        ready_s = None
        try:
            while time.perf_counter() - t0 < limit:
                if proc.poll() is not None:
                    break
                try:
                    status, _ = get(f"http://127.0.0.1:{port}/readyz")
                except OSError:
                    status = 0
                if status == 200:
                    ready_s = time.perf_counter() - t0
                    break
                time.sleep(0.05)
            card: dict[str, Any] = {}
            if ready_s is not None:
                status, body = get(f"http://127.0.0.1:{port}/v1/models/{MODEL}")
                card = json.loads(body).get("card", {}) if status == 200 else {}
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            log.close()
        text = (Path(tmp) / "serve.log").read_text(errors="replace")
        lineage = card.get("lineage") or {}
        return {
            "ready_s": None if ready_s is None else round(ready_s, 2),
            "imported": "model(s) added" in text,
            "trained": "build_default_model: building" in text,
            "card_lineage": bool(lineage.get("git_commit") and lineage.get("data_sha256")),
            "card_test_mse": (card.get("metrics") or {}).get("test_mse"),
            "exit_code": proc.returncode,
            "log_tail": text[-600:] if ready_s is None else "",
        }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--target", type=float, default=15.0, help="seconds (issue 17)")
    p.add_argument("--limit", type=float, default=120.0, help="give up on a round after this")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args()
    subprocess.run(["bash", "scripts/bootstrap.sh"], cwd=ROOT, check=True)  # not timed
    rounds = [one_round(args.limit) for _ in range(args.rounds)]
    times = [r["ready_s"] for r in rounds if r["ready_s"] is not None]
    passed = (
        len(times) == len(rounds)
        and max(times) <= args.target
        and all(r["imported"] and not r["trained"] and r["card_lineage"] for r in rounds)
    )
    result = {
        "what": "seconds from `bash scripts/serve.sh` (after bootstrap) to /readyz 200, "
        "fresh registry each round",
        "command": f"python bench/serve_ready.py --rounds {args.rounds}",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_avg_at_start": os.getloadavg()},
        "target_s": args.target,
        "rounds": rounds,
        "median_s": statistics.median(times) if times else None,
        "max_s": max(times) if times else None,
        "passed": passed,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve_ready.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# serve.sh on a fresh registry: seconds to /readyz 200",
        "",
        f"`{result['command']}`; {os.cpu_count()} CPUs, load average at start "
        f"{result['machine']['load_avg_at_start'][0]:.2f}. Each round: a new empty registry, "
        "`scripts/serve.sh` imports the bundle (no training) and starts the service.",
        "",
        "| round | ready (s) | imported | trained | card has lineage |",
        "|---|---|---|---|---|",
    ]
    for i, r in enumerate(rounds, 1):
        lines.append(f"| {i} | {r['ready_s']} | {r['imported']} | {r['trained']} | "
                     f"{r['card_lineage']} |")
    lines += ["", f"Median {result['median_s']} s, max {result['max_s']} s; target <= "
              f"{args.target:g} s: {'passed' if passed else 'FAILED'}.", ""]
    (args.out / "serve_ready.md").write_text("\n".join(lines))
    print(json.dumps({k: result[k] for k in ("median_s", "max_s", "passed")}))


if __name__ == "__main__":
    main()
