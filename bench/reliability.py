"""Reliability and security figures: the tests/reliability scenarios at full length.

    python bench/reliability.py [--length full|short|auto] [--only redis_outage,overload,...]

Each scenario starts the service with scripts/launch_service.sh on a loopback port, on its own
registry (and, for the Redis outage, its own redis-server), drives it, and leaves one record in
bench/results/reliability.json (a list) and a row in reliability.md:

  redis_outage       Redis killed for 10 s and restarted under load; a promotion afterwards
  promotions         10 alias promotions under load; versions against promotion windows
  corrupt_artifact   a corrupted version promoted (admin API, and past the registry's check)
  overload           ~4x measured capacity, inference-bound (heavy model, bounded batch queue)
  overload_parse     ~4x measured capacity, parse-bound (0.6 MB JSON bodies, in-flight budget)
  graceful_shutdown  SIGTERM to the launch script (2 uvicorn workers) under load
  hostile_input      hand-written cases + schemathesis (150 per operation and mode) + core fuzz
  security           admin tokens, traversal, symlink escape, import graph, image user
  redis_frozen       redis-server SIGSTOPped for 10 s under load (accepts, never answers), then
                     SIGCONT; a promotion afterwards
  slowloris          200 connections sending request heads at 1 byte/s during normal load vs
                     the same load without them; the server's head timeout closes them
  disk_full          register and promote on a full 2 MB tmpfs (root): 507, nothing partial
  two_workers        2 workers: promotions, Redis killed and restarted, SIGTERM drain; /metrics
                     sums both workers

Every record: scenario, requests, then every outcome judged against what the scenario expects:
answered (the expected answer, body checked), refused_503 (503 + Retry-After, only in overload and
after SIGTERM), refused_connect (connection refused, or closed before any byte of the request was
written on it: only after SIGTERM) and failed (anything else: 500s, other codes, truncated or
invalid bodies, lost requests, resets, timeouts), with failures by kind; status_codes,
p50/p99/max ms, rss_before_mb/rss_after_mb (the serving process), problems (empty when every
expectation held; a failed outcome is always one), passed (no problem and failed == 0), length,
seconds, and the scenario's own figures. `--length auto` runs full length unless the
1-minute load average is above 4 (two cores shared with training), and says which it ran.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.models_registry.conftest import RedisServer  # noqa: E402
from tests.reliability import scenarios  # noqa: E402
from tests.reliability.harness import FULL, SHORT, Lengths  # noqa: E402

RESULTS = ROOT / "bench" / "results"
LOAD_LIMIT = 4.0


def with_redis(scenario: Callable[[Path, Lengths, RedisServer], dict[str, Any]]
               ) -> Callable[[Path, Lengths], dict[str, Any]]:
    """The scenario with a redis-server of its own (killed, frozen or restarted by it)."""

    def run(work: Path, lengths: Lengths) -> dict[str, Any]:
        if shutil.which("redis-server") is None:
            raise SystemExit("redis-server is needed for the Redis scenarios")
        (work / "redis").mkdir()
        server = RedisServer(work / "redis")
        server.start()
        try:
            return scenario(work, lengths, server)
        finally:
            server.stop()

    return run


SCENARIOS: dict[str, Callable[[Path, Lengths], dict[str, Any]]] = {
    "redis_outage": with_redis(scenarios.redis_outage),
    "promotions": scenarios.promotions,
    "corrupt_artifact": scenarios.corrupt_artifact,
    "overload": lambda w, n: scenarios.overload(w, n, "inference"),
    "overload_parse": lambda w, n: scenarios.overload(w, n, "parse"),
    "graceful_shutdown": lambda w, n: scenarios.graceful_shutdown(w, n, workers=2),
    "hostile_input": lambda w, n: scenarios.hostile_input(w, n, derandomize=False),
    "security": scenarios.security_checks,
    "redis_frozen": with_redis(scenarios.redis_frozen),
    "slowloris": scenarios.slowloris,
    "disk_full": scenarios.disk_full,
    "two_workers": with_redis(scenarios.two_workers),
}

COLUMNS = ("scenario", "requests", "answered", "refused_503", "refused_connect", "failed",
           "status_codes", "p99_ms", "rss_before_mb", "rss_after_mb", "passed")


def markdown(records: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " | key figures |",
             "|" + "---|" * (len(COLUMNS) + 1)]
    for r in records:
        cells = [json.dumps(r.get(c)) if c == "status_codes" else str(r.get(c))
                 for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " | " + key_figures(r) + " |")
    lines.append("")
    for r in records:
        for p in r.get("problems", []):
            lines.append(f"- {r['scenario']}: {p}")
    return "\n".join(lines) + "\n"


def key_figures(r: dict[str, Any]) -> str:
    keys = {
        "redis_outage": ("outage_s", "requests_during_outage", "failed_during_outage",
                         "events_back_after_restart_s", "promotion_to_swap_s"),
        "promotions": ("promotions", "switches", "regressions", "outside_window"),
        "corrupt_artifact": ("loads_integrity_error_total", "versions_seen"),
        "overload": ("capacity_rps", "offered_rps", "attempts_made", "served_rps", "budget_s",
                     "max_ms", "rss_peak_mb", "rss_bound_mb"),
        "overload_parse": ("capacity_rps", "offered_rps", "attempts_made", "served_rps",
                           "budget_s", "max_ms", "rss_peak_mb", "rss_bound_mb"),
        "graceful_shutdown": ("workers", "in_flight_at_sigterm", "in_flight_completed",
                              "after_sigterm_codes", "shutdown_s", "exit_status"),
        "hostile_input": ("hand_written_cases", "schemathesis_cases",
                          "schemathesis_server_errors", "core_fuzz_cases"),
        "security": ("runtime_user",),
        "redis_frozen": ("frozen_s", "requests_while_frozen", "max_while_frozen_ms",
                         "redis_operation_timeout_ms", "promotion_to_swap_s"),
        "slowloris": ("slow_connections", "baseline_p99_ms", "with_slow_p99_ms", "p99_ratio",
                      "slow_closed_by_server", "slow_lifetime_s"),
        "disk_full": ("filesystem", "api_refusal", "versions_seen"),
        "two_workers": ("promotion_lag_s", "requests_during_redis_outage",
                        "metrics_forecasts_counted", "forecasts_answered",
                        "in_flight_at_sigterm", "exit_status"),
    }.get(r["scenario"], ())
    figures = {**r, "attempts_made": len(r.get("attempts", []))}
    return ", ".join(f"{k}={json.dumps(figures.get(k))}" for k in keys)


def passed(record: dict[str, Any]) -> bool:
    """No problem and no failed outcome (a record is never read as passing on one alone)."""
    return not record["problems"] and record["failed"] == 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--length", choices=("full", "short", "auto"), default="auto")
    ap.add_argument("--only", default="", help="comma-separated scenario names")
    ap.add_argument("--out", type=Path, default=RESULTS / "reliability.json")
    args = ap.parse_args()
    load_before = os.getloadavg()[0]
    length = args.length
    if length == "auto":
        length = "full" if load_before <= LOAD_LIMIT else "short"
        print(f"load average {load_before:.1f}: running {length} length")
    lengths = FULL if length == "full" else SHORT
    names = [n for n in args.only.split(",") if n] or list(SCENARIOS)
    unknown = set(names) - set(SCENARIOS)
    if unknown:
        ap.error(f"unknown scenarios: {sorted(unknown)}")
    records = []
    for name in names:
        with tempfile.TemporaryDirectory(prefix=f"reliability-{name}-") as tmp:
            started = time.monotonic()
            load = os.getloadavg()[0]
            record = SCENARIOS[name](Path(tmp), lengths)
            record.update({
                "passed": passed(record), "length": length,
                "seconds": round(time.monotonic() - started, 1),
                "load_avg_1m": round(load, 2), "cpus": os.cpu_count(),
                "python": platform.python_version(),
            })
        records.append(record)
        print(f"{name}: {'ok' if record['passed'] else 'PROBLEMS'} "
              f"({record['requests']} requests, {record['seconds']} s) "
              + "; ".join(record["problems"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.only and args.out.exists():  # keep the other scenarios' records
        ran = {r["scenario"] for r in records}
        kept = [r for r in json.loads(args.out.read_text()) if r["scenario"] not in ran]
        order = list(SCENARIOS)
        records = sorted(kept + records, key=lambda r: order.index(r["scenario"])
                         if r["scenario"] in order else len(order))
    args.out.write_text(json.dumps(records, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(
        f"# Reliability ({length} length; load average {load_before:.1f} on "
        f"{os.cpu_count()} CPUs at the start)\n\n" + markdown(records))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0 if all(r["passed"] for r in records) else 1


if __name__ == "__main__":
    raise SystemExit(main())
