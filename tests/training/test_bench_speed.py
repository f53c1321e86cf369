"""bench/speed.py --registry: the served ONNX files of a registry, timed side by side."""

from __future__ import annotations

import json
from pathlib import Path

from bench import speed
from models_registry.bundle import BUNDLED_DIR
from models_registry.store import FilesystemStore


def test_registry_mode_times_the_bundled_student_against_its_ensemble(tmp_path: Path) -> None:
    argv = ["--registry", str(BUNDLED_DIR), "--model", "etth2-h96", "--batches", "1,4",
            "--min-calls", "20", "--max-seconds", "2", "--results", str(tmp_path)]  # fmt: skip
    assert speed.main(argv) == 0
    out = json.loads((tmp_path / "speed.json").read_text())
    store = FilesystemStore(BUNDLED_DIR)
    group = store.manifest(*store.resolve("etth2-h96-ensemble@production"))
    meta = out["meta"]
    assert meta["dataset"] == "ETTh2" and meta["registry"] == str(BUNDLED_DIR)
    assert [t["name"] for t in meta["teachers"]] == [r.name for r in group.members]
    latency = {(r["model"], r["batch"]): r for r in out["records"] if "model" in r}
    for batch in (1, 4):
        members = sum(latency[(r.name, batch)]["params"] for r in group.members)
        assert latency[("ensemble", batch)]["params"] == members > 0
        assert latency[("etth2-h96", batch)]["params"] > 0
    ratios = {r["batch"]: r["value"] for r in out["records"] if "ratio" in r}
    assert set(ratios) == {1, 4} and all(v > 0 for v in ratios.values())
    assert "--registry" in (tmp_path / "speed.md").read_text()
