"""Speed benchmark: parameters and CPU inference latency of student, teachers and ensemble.

    python bench/speed.py --dataset ETTh1 --horizon 96 --teachers simmtm,himtm,dmae

Every model is exported to ONNX (``training.export.export_onnx``, the graph the registry serves:
dynamic batch and channel axes) and run by the service's own engine
(``service.core.engine.OrtEngine``: ONNX Runtime, sequential execution, full graph optimisation,
no spinning) on the CPU with 1 intra-op and 1 inter-op thread, at batch 1 and batch 256 on real
test windows. All measurements are taken in one run, in rounds: each round calls every model a
block of times in a row (20 at batch 1, 2 at batch 256), so each is timed warm, as a server running
it repeatedly sees it, while load from other processes on a shared machine falls on all of them
alike; a model's latency is the median over its calls.

The ensemble is timed as the accurate path serves it: its members run one after the other on the
same request (each on the last L_t steps of the window), then their forecasts are averaged; one
timed call covers all of that. Several students can be timed in the same run (default: the
distilled ensemble students at L = 336, the pipeline's lookback, and at L = 720, the paper's);
the first gives the ``ensemble/student`` ratio, the others ``ensemble/<student>``. These are the
benchmark's run folders (``runs/bench``), exported here.

``--registry DIR`` times what a registry serves instead: ``--model``'s production student and the
members of its ``-ensemble`` group, their ONNX files as stored (raw values in, raw out), on the
raw test windows of the manifests' dataset::

    python bench/speed.py --registry models_registry/bundled     # what scripts/serve.sh serves

Writes ``bench/results/speed.json``: ``{"meta": {...}, "records": [...]}`` with records
``{"model", "params", "batch", "latency_ms"}`` and ``{"ratio": "ensemble/student", "batch",
"value"}``, and ``bench/results/speed.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from service.core.engine import CPU, EngineOptions, OrtEngine  # noqa: E402
from training.checkpoints import load_forecaster  # noqa: E402
from training.data import DataConfig, PreparedData, prepare  # noqa: E402
from training.distill import build_distill_config  # noqa: E402
from training.distill_teachers import resolve_teacher_dir  # noqa: E402
from training.engine import count_params  # noqa: E402
from training.export import export_onnx  # noqa: E402
from training.models import Forecaster, build_model  # noqa: E402

log = logging.getLogger("bench.speed")
RESULTS = REPO / "bench" / "results"
# The service's engine and session options, CPU only, one thread.
CPU_ONE_THREAD = EngineOptions(providers=(CPU,), intra_threads=1, inter_threads=1)


@dataclass
class Member:
    """A timed model: a torch forecaster exported here, or a registry's ONNX file as served."""

    name: str
    model: Forecaster | None
    source: str
    engine: OrtEngine | None = None
    parity: float | None = None
    served: tuple[int, int] | None = None
    """(lookback, parameters) of a registry model (no torch model)."""

    @property
    def lookback(self) -> int:
        if self.model is None:
            assert self.served is not None
            return self.served[0]
        return self.model.lookback

    @property
    def params(self) -> int:
        if self.model is None:
            assert self.served is not None
            return self.served[1]
        return count_params(self.model)

    def run(self, x: np.ndarray) -> np.ndarray:
        assert self.engine is not None
        # x: [B, L_student, C]; the member reads its own last L_t steps.
        window = np.ascontiguousarray(x[:, -self.lookback :])  # [B, L_t, C]
        return self.engine.run(window)  # [B, H, C]


def load_student(spec: str, dataset: str, horizon: int) -> Member:
    """A distilled student's run folder, named ``<run name>-L<lookback>``.

    ``mlp:L`` instead times an untrained student of the distillation config's shape at lookback L
    (latency does not depend on the weights); it is named ``student-untrained-L<L>``.
    """
    if spec.startswith("mlp:"):
        lookback = int(spec.removeprefix("mlp:"))
        cfg = build_distill_config(
            data={"dataset": dataset, "horizon": horizon, "lookback": lookback}
        ).run
        model = build_model("mlp", lookback=lookback, horizon=horizon, **cfg.model_settings)
        return Member(f"student-untrained-L{lookback}", model.eval(), f"untrained mlp L={lookback}")
    model, run = load_forecaster(Path(spec))
    return Member(f"{run.get('name', run['model'])}-L{model.lookback}", model, spec)


def timed_rounds(
    fns: dict[str, Callable[[], Any]], min_calls: int, max_seconds: float, block: int
) -> dict[str, list[float]]:
    """Per-call times (ms): rounds of ``block`` consecutive calls of each function in turn.

    Consecutive calls measure a model the way a server running it repeatedly sees it (its
    weights stay in cache); the rounds spread any load from other processes over all models.
    Runs until every function has ``min_calls`` calls, then on while half of ``max_seconds``
    allows (up to 10x), stopping at ``max_seconds`` once 5 rounds are done.
    """
    for fn in fns.values():  # warm-up: allocations, thread pools, caches
        for _ in range(3):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    start = time.perf_counter()
    rounds = 0
    while rounds * block < min_calls or (
        time.perf_counter() - start < max_seconds / 2 and rounds * block < 10 * min_calls
    ):
        for name, fn in fns.items():
            for _ in range(block):
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) * 1e3)
        rounds += 1
        if rounds >= 5 and time.perf_counter() - start > max_seconds:
            break
    return times


def trained_members(
    args: argparse.Namespace, windows: int
) -> tuple[list[Member], list[Member], PreparedData, np.ndarray]:
    """The benchmark's run folders, exported here; inputs are the first ``windows`` z-scored
    test windows."""
    dcfg = build_distill_config(
        data={"dataset": args.dataset, "horizon": args.horizon},
        distill={"teacher_dir": args.teacher_dir, "teacher_lookback": args.teacher_lookback},
    )
    specs = (
        args.students.split(",")
        if args.students
        else [
            str(Path(args.teacher_dir) / f"{args.dataset}-student-ensemble-L{lb}-H{args.horizon}")
            for lb in (336, 720)
        ]
    )
    students = [load_student(spec.strip(), args.dataset, args.horizon) for spec in specs]
    teachers = []
    for spec in (s.strip() for s in args.teachers.split(",") if s.strip()):
        run_dir = resolve_teacher_dir(spec, args.dataset, args.horizon, dcfg.distill)
        model, run = load_forecaster(run_dir)
        name = spec if not Path(spec).is_dir() else str(run.get("name", run["model"]))
        teachers.append(Member(name, model, str(run_dir)))

    members = [*students, *teachers]
    lookback = max(m.lookback for m in members)
    data = prepare(DataConfig(args.dataset, lookback=lookback, horizon=args.horizon))
    test = data.splits["test"]
    x_all, _ = test.batch(torch.arange(windows))  # [B, L, C] z-scored test windows
    x_all_np = x_all.numpy()

    for m in members:
        assert m.model is not None
        m.engine = OrtEngine(export_onnx(m.model, m.lookback, data.channels), CPU_ONE_THREAD)
        with torch.no_grad():
            ref = m.model(x_all[:8, -m.lookback :]).numpy()
        m.parity = float(np.abs(m.run(x_all_np[:8]) - ref).max())
        log.info("%s: %d parameters, ONNX parity %.2e", m.name, m.params, m.parity)

    return students, teachers, data, x_all_np


def registry_members(
    args: argparse.Namespace, windows: int
) -> tuple[list[Member], list[Member], PreparedData, np.ndarray]:
    """A registry's production student ``--model`` and its group's members, their ONNX files as
    the service loads them; inputs are the first ``windows`` raw test windows (the served graphs
    take raw values)."""
    import onnx

    from models_registry.store import FilesystemStore

    store = FilesystemStore(args.registry)

    def member(name: str, version: int) -> Member:
        m = store.manifest(name, version)
        onnx_bytes = store.onnx_bytes(name, version)
        params = sum(
            int(np.prod(i.dims)) for i in onnx.load_from_string(onnx_bytes).graph.initializer
        )
        engine = OrtEngine(onnx_bytes, CPU_ONE_THREAD)
        return Member(name, None, f"{args.registry}/{name}/{version}", engine, None,
                      (m.lookback, params))  # fmt: skip

    student_m = store.manifest(*store.resolve(f"{args.model}@production"))
    group = store.manifest(*store.resolve(f"{args.model}-ensemble@production"))
    students = [member(student_m.name, student_m.version)]
    teachers = [member(r.name, r.version) for r in group.members]
    assert student_m.dataset is not None
    args.dataset, args.horizon = student_m.dataset.name, student_m.horizon
    lookback = max(m.lookback for m in (*students, *teachers))
    data = prepare(DataConfig(args.dataset, lookback=lookback, horizon=args.horizon))
    x_all, _ = data.splits["test"].batch(torch.arange(windows))
    x_raw = x_all.numpy() * data.scaler.std + data.scaler.mean
    return students, teachers, data, np.ascontiguousarray(x_raw, dtype=np.float32)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", default="ETTh1")
    p.add_argument("--horizon", type=int, default=96)
    p.add_argument("--teachers", default="simmtm,himtm,dmae", help="names or run folders")
    p.add_argument("--teacher-dir", default=str(REPO / "runs" / "bench"))
    p.add_argument("--teacher-lookback", type=int, default=336)
    p.add_argument(
        "--students",
        default=None,
        help="student run folders, the first gives the ratio 'ensemble/student'; "
        "default <teacher-dir>/<dataset>-student-ensemble-L{336,720}-H<h>; mlp:L = untrained",
    )
    p.add_argument(
        "--registry",
        type=Path,
        default=None,
        help="time a registry's ONNX files as served instead: --model's production student and "
        "its '-ensemble' group (e.g. models_registry/bundled)",
    )
    p.add_argument("--model", default="etth1-h96", help="with --registry")
    p.add_argument("--batches", default="1,256")
    p.add_argument("--min-calls", type=int, default=100, help="at batch 1; /10 at larger batches")
    p.add_argument("--max-seconds", type=float, default=120.0, help="per batch size")
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(1)

    batches = [int(b) for b in args.batches.split(",")]
    members_of = registry_members if args.registry is not None else trained_members
    students, teachers, data, x_all_np = members_of(args, max(batches))
    student = students[0]
    members = [*students, *teachers]

    def ensemble_run(x: np.ndarray) -> np.ndarray:
        return np.mean([t.run(x) for t in teachers], axis=0)  # [B, H, C]

    params = {m.name: m.params for m in members}
    params["ensemble"] = sum(params[t.name] for t in teachers)
    records: list[dict[str, Any]] = []
    calls: dict[str, int] = {}
    for batch in batches:
        x = np.ascontiguousarray(x_all_np[:batch])
        fns: dict[str, Callable[[], Any]] = {m.name: (lambda m=m, x=x: m.run(x)) for m in members}
        fns["ensemble"] = lambda x=x: ensemble_run(x)
        min_calls = args.min_calls if batch == 1 else max(args.min_calls // 10, 5)
        block = 20 if batch == 1 else 2
        times = timed_rounds(fns, min_calls, args.max_seconds, block)
        calls[str(batch)] = len(times["ensemble"])
        median = {k: statistics.median(v) for k, v in times.items()}
        for name, ms in median.items():
            records.append(
                {"model": name, "params": params[name], "batch": batch, "latency_ms": round(ms, 4)}
            )
        for st in students:
            label = "ensemble/student" if st is student else f"ensemble/{st.name}"
            ratio = median["ensemble"] / median[st.name]
            records.append({"ratio": label, "batch": batch, "value": round(ratio, 2)})
        log.info("batch %d: %s", batch, {k: round(v, 3) for k, v in median.items()})

    meta = {
        "dataset": args.dataset,
        "horizon": args.horizon,
        "channels": data.channels,
        "students": [
            {"name": st.name, "source": st.source, "lookback": st.lookback} for st in students
        ],
        "ratio_student": student.name,  # the one behind the 'ensemble/student' ratio
        "teachers": [
            {"name": t.name, "source": t.source, "lookback": t.lookback} for t in teachers
        ],
        "ensemble": "members run sequentially in one call, forecasts averaged",
        "onnx_parity_max_abs_err": {m.name: m.parity for m in members},
        "exporter": (
            f"the registry's ONNX files as served ({args.registry}, {args.model})"
            if args.registry is not None
            else "training.export.export_onnx (dynamo, dynamic batch and channels)"
        ),
        "registry": None if args.registry is None else str(args.registry),
        "onnxruntime": ort.__version__,
        "threads": {"intra_op": 1, "inter_op": 1},
        "calls_per_model": calls,
        "statistic": "median",
        "rounds": "blocks of 20 consecutive calls per model at batch 1, 2 at batch 256",
        "machine": f"{platform.machine()} {platform.processor() or platform.platform()}",
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "speed.json").write_text(
        json.dumps({"meta": meta, "records": records}, indent=2) + "\n"
    )
    write_markdown(meta, records, args.results / "speed.md")
    for r in records:
        print(json.dumps(r))
    return 0


def write_markdown(meta: dict[str, Any], records: list[dict[str, Any]], path: Path) -> None:
    lines = [
        "# CPU inference speed (ONNX Runtime, 1 thread)",
        "",
        f"{meta['dataset']}, H={meta['horizon']}, {meta['channels']} channels; median of "
        + ", ".join(f"{n} calls at batch {b}" for b, n in meta["calls_per_model"].items())
        + f" per model, in rounds of consecutive calls per model; ONNX Runtime "
        f"{meta['onnxruntime']}, 1 intra-op thread. Ensemble = {meta['ensemble']}. "
        f"Student of the ratio 'ensemble/student': {meta['ratio_student']} "
        + (
            f"and the ensemble as served from `{meta['registry']}` (raw-scale ONNX graphs; "
            "parameters counted from their initialisers). Reproduce: `python bench/speed.py "
            f"--registry {meta['registry']}`"
            if meta.get("registry")
            else "(`runs/bench`, not the bundled models). Reproduce: `python bench/speed.py`"
        )
        + " (see `bench/README.md`).",
        "",
        "| model | L | params | batch | latency ms |",
        "|---|---|---|---|---|",
    ]
    lookbacks = {m["name"]: m["lookback"] for m in (*meta["students"], *meta["teachers"])}
    for r in (r for r in records if "model" in r):
        lookback = lookbacks.get(r["model"], "")
        lines.append(
            f"| {r['model']} | {lookback} | {r['params']:,} | {r['batch']} | "
            f"{r['latency_ms']:.3f} |"
        )
    lines += ["", "| ratio | batch | value |", "|---|---|---|"]
    lines += [
        f"| {r['ratio']} | {r['batch']} | {r['value']:.1f} |" for r in records if "ratio" in r
    ]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
