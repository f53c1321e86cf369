"""Several writers at once: processes registering, threads moving aliases under readers."""

from __future__ import annotations

import json
import multiprocessing as mp
import threading
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path

from models_registry.store import FilesystemStore
from tests.models_registry.conftest import ManifestFactory, build_manifest

PER_PROCESS = 10
PROCESSES = 2


def _register_many(root: str, worker: int, barrier: Barrier, results: Queue[list[int]]) -> None:
    store = FilesystemStore(root)
    barrier.wait(timeout=30)  # start together, to actually contend
    versions = []
    for i in range(PER_PROCESS):
        # large enough that writes take a moment; distinct so every artifact is checkable
        payload = bytes([worker, i]) * 20_000
        m = store.register(build_manifest(code_version=f"w{worker}-{i}"), payload)
        versions.append(m.version)
    results.put(versions)


def test_two_processes_register_concurrently(tmp_path: Path) -> None:
    root = tmp_path / "registry"
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(PROCESSES)
    queue: Queue[list[int]] = ctx.Queue()
    procs = [
        ctx.Process(target=_register_many, args=(str(root), w, barrier, queue))
        for w in range(PROCESSES)
    ]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    all_versions = sorted(v for vs in results for v in vs)
    assert all_versions == list(range(1, PROCESSES * PER_PROCESS + 1))  # distinct, no gaps

    store = FilesystemStore(root)
    seen = set()
    for version in all_versions:
        m = store.manifest("student-etth1", version)  # complete and parseable
        assert m.code_version is not None
        worker, i = (int(x) for x in m.code_version[1:].split("-"))
        data = store.onnx_bytes("student-etth1", version)  # hash verified
        assert data == bytes([worker, i]) * 20_000
        seen.add(m.code_version)
    assert len(seen) == PROCESSES * PER_PROCESS
    leftovers = [p.name for p in (root / "student-etth1").iterdir() if p.name.startswith(".tmp")]
    assert leftovers == []
    assert store.verify() == []


def test_alias_writes_are_atomic_for_readers(
    store: FilesystemStore, make_manifest: ManifestFactory
) -> None:
    for i in range(3):
        store.register(make_manifest(), bytes([i]))
    path = store.root / "student-etth1" / "aliases.json"
    store.set_alias("student-etth1", "production", 1)
    stop = threading.Event()
    bad: list[str] = []
    reads = [0]

    def read_loop() -> None:
        while not stop.is_set():
            try:
                data = json.loads(path.read_bytes())
            except ValueError as exc:  # a torn write would show up here
                bad.append(str(exc))
                continue
            reads[0] += 1
            if set(data) != {"production"} and set(data) != {"production", "staging"}:
                bad.append(repr(data))

    def write_loop(alias: str) -> None:
        for n in range(40):
            store.set_alias("student-etth1", alias, n % 3 + 1)

    reader = threading.Thread(target=read_loop)
    reader.start()
    writers = [threading.Thread(target=write_loop, args=(a,)) for a in ("production", "staging")]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    stop.set()
    reader.join()
    assert bad == []
    assert reads[0] > 0  # the reader did read while the writers wrote
    # both writers' last updates survive: updates are serialised, not lost
    assert store.aliases("student-etth1") == {"production": 1, "staging": 1}
    # and the file itself (not only the API's reading of it) is complete JSON holding exactly them
    assert json.loads(path.read_bytes()) == {"production": 1, "staging": 1}
