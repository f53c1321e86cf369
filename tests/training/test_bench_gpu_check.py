"""bench/gpu_check: refuses clearly without a GPU; its checks run for real, CPU against CPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import onnxruntime as ort
import pytest

from bench import gpu_check

REPO = Path(__file__).resolve().parents[2]
RESULT = REPO / "bench" / "results" / "gpu.json"
CPU = "CPUExecutionProvider"
QUICK = ["--batches", "1,8", "--repeats", "5", "--case-seconds", "0.2", "--cpu-threads", "1"]


def _cpu_against_cpu(out: Path, *extra: str) -> int:
    """The driver with CPU as the provider under test (a flag gpu_check.sh never passes)."""
    return gpu_check.main(["--providers-under-test", CPU, "--out", str(out), *QUICK, *extra])


def _stat(path: Path) -> tuple[int, int] | None:
    return (path.stat().st_mtime_ns, path.stat().st_size) if path.exists() else None


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has nvidia-smi")
def test_the_script_without_a_gpu_exits_2_before_any_venv_or_download(tmp_path: Path) -> None:
    before = _stat(RESULT)
    venv = tmp_path / "venv"
    env = {**os.environ, "GPU_VENV": str(venv)}
    proc = subprocess.run(
        ["bash", "bench/gpu_check.sh"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2, proc.stderr
    assert "an NVIDIA GPU is needed" in proc.stderr
    assert "installing" not in proc.stderr + proc.stdout
    assert not venv.exists()
    assert _stat(RESULT) == before


def test_an_install_that_fails_offline_says_why_and_writes_nothing(tmp_path: Path) -> None:
    """A GPU machine with no package index (as lent GPU machines are) and no wheels in
    GPU_WHEELS: the script stops with exit code 3 and says how to install offline. (A stand-in
    nvidia-smi listing one GPU gets it past the GPU check.)"""
    tools = tmp_path / "bin"
    tools.mkdir()
    smi = tools / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: stand-in (UUID: GPU-0)'\n")
    smi.chmod(0o755)
    wheels = tmp_path / "wheels"
    wheels.mkdir()  # empty: nothing to install from
    before = _stat(RESULT)
    env = {**os.environ, "PATH": f"{tools}:{os.environ['PATH']}",
           "GPU_VENV": str(tmp_path / "venv"), "GPU_WHEELS": str(wheels)}
    proc = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert "could not install onnxruntime-gpu" in proc.stderr and "GPU_WHEELS=DIR" in proc.stderr
    assert _stat(RESULT) == before


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA here")
def test_the_driver_refuses_an_unavailable_provider_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "gpu.json"
    assert gpu_check.main(["--out", str(out), *QUICK]) == 2
    assert "GPU" in capsys.readouterr().err and not out.exists()


def test_cpu_against_cpu_runs_every_check_on_the_bundled_models(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    rc = _cpu_against_cpu(out, "--concurrency", "1,4", "--batcher-seconds", "0.3")
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["meta"]["passed"] is True and doc["meta"]["provider_under_test"] == CPU
    recs = doc["records"]
    models = {"etth1-h96@1", "etth1-h96-ensemble@1"}
    parity = [r for r in recs if r["check"] == "parity"]
    assert {(r["model"], r["batch"]) for r in parity} == {(m, b) for m in models for b in (1, 8)}
    for r in parity:  # two sessions of one provider on the same windows agree exactly
        assert r["passed"] and r["max_abs_err"] == 0.0 and r["max_abs_output"] > 1.0
        assert r["sessions_on"] == [CPU]
    fp32 = [r for r in recs if r["check"] == "parity_full_fp32"]
    assert {r["model"] for r in fp32} == models
    assert all(r["max_abs_err"] <= 1e-5 and r["batch"] == 8 for r in fp32)
    lat = [r for r in recs if r["check"] == "latency"]
    assert len(lat) == 2 * 2 * 2  # models x (under test, reference) x batches
    for r in lat:
        assert r["n"] >= 5 and 0 < r["p50_ms"] <= r["p99_ms"]
    bat = [r for r in recs if r["check"] == "batcher"]
    assert {(r["model"], r["concurrency"]) for r in bat} == {(m, c) for m in models for c in (1, 4)}
    for r in bat:
        assert r["errors"] == 0 and r["windows"] > 0 and r["calls"] > 0
        assert r["windows"] >= r["calls"]  # a call carries one or more requests' windows


def test_a_parity_failure_exits_1_and_is_recorded(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    rc = _cpu_against_cpu(out, "--models", "etth1-h96", "--atol", "-1", "--concurrency", "")
    assert rc == 1
    doc = json.loads(out.read_text())
    assert doc["meta"]["passed"] is False
    assert [r["passed"] for r in doc["records"] if r["check"] == "parity"] == [False, False]
