"""docs/own-data.md end to end at a test-sized budget: a generated long CSV (``unique_id``, ``ds``,
two value columns, three series) -> ``python -m training pipeline --quick`` -> the registry ->
``python -m training crossval`` -> the service launched as ``scripts/serve.sh`` launches it
(``scripts/launch_service.sh``; serve.sh's bootstrap and bundle import are left out: they install
packages and would not touch a registry that holds a model) -> ``curl`` -> a forecast equal to the
offline backtest's. And the problems a user's own CSV runs into, each named by the CLI."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from distilcast_client import Client

from training.cli import main

REPO = Path(__file__).resolve().parents[2]
L, H = 48, 12
SERIES = {"north": 420, "south": 380, "east": 400}


def shops_csv(path: Path) -> Path:
    frames = []
    for k, (sid, n) in enumerate(SERIES.items()):
        t = np.arange(n)
        rng = np.random.default_rng(k)
        frames.append(
            pd.DataFrame(
                {
                    "unique_id": sid,
                    "ds": pd.date_range("2024-01-01", periods=n, freq="h"),
                    "load": (k + 1) * np.sin(2 * np.pi * t / 24) + 0.01 * t + rng.normal(0, 0.1, n),
                    "temp": 10 + 5 * np.cos(2 * np.pi * t / 24) + k,
                }
            )
        )
    pd.concat(frames).to_csv(path, index=False)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=900, **kw)  # type: ignore[call-overload,no-any-return]


def test_long_csv_to_pipeline_to_crossval_to_service_to_curl(tmp_path: Path) -> None:
    csv = shops_csv(tmp_path / "shops.csv")
    registry, work = tmp_path / "registry", tmp_path / "runs"
    py = sys.executable
    pipeline = [py, "-m", "training", "pipeline", "--dataset", str(csv), "--quick"]
    pipeline += ["--lookback", str(L), "--horizon", str(H), "--epochs", "1"]
    pipeline += ["--max-train-batches", "2", "--no-progress", "--parity-windows", "8"]
    pipeline += ["--registry", str(registry), "--work-dir", str(work)]
    proc = run(pipeline)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["name"] == "shops-h12" and result["student"]["alias"] == "production"
    assert "shops: 1200 rows x 2 channels in 3 series" in proc.stderr

    # The offline backtest of the student's run folder: the last 12 hours of each series.
    student = work / "mlp-distilled"
    proc = run([py, "-m", "training", "crossval", "--run", str(student), "--n-windows", "1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    cv = json.loads(proc.stdout.strip().splitlines()[-1])
    assert cv["series"] == 3 and cv["h"] == H and np.isfinite(cv["mse"])
    windows = pd.read_csv(cv["windows_csv"])

    port = free_port()
    env = {
        **os.environ,
        "DISTILCAST_REGISTRY_ROOT": str(registry),
        "DISTILCAST_DEFAULT_MODEL": "shops-h12",
        "PORT": str(port),
        "HOST": "127.0.0.1",
        "WORKERS": "1",
        "PYTHON": py,
    }
    server = subprocess.Popen(
        ["bash", "scripts/launch_service.sh"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            ready = run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"{base}/readyz"])
            if ready.stdout == "200":
                break
            assert server.poll() is None, server.stderr.read() if server.stderr else ""
            assert time.monotonic() < deadline, "the service did not become ready in 60 s"
            time.sleep(0.5)

        # The history up to the backtest's cutoff, as the doc's curl sends it.
        frame = pd.read_csv(csv)
        north = frame[frame.unique_id == "north"].reset_index(drop=True)
        history = north.iloc[len(north) - H - L : len(north) - H]
        body = {
            "model": "shops-h12",
            "series": [
                {
                    "id": "north",
                    "timestamps": history.ds.tolist(),
                    "values": history[["load", "temp"]].to_numpy().tolist(),
                }
            ],
            "level": [80],
        }
        (tmp_path / "body.json").write_text(json.dumps(body))
        proc = run(
            [
                "curl",
                "-s",
                "-X",
                "POST",
                f"{base}/v1/forecast",
                "-H",
                "content-type: application/json",
                "-d",
                f"@{tmp_path / 'body.json'}",
            ]
        )
        answer = json.loads(proc.stdout)
        assert answer["model"] == "shops-h12" and answer["version"] == 1, answer
        fc = answer["forecasts"][0]
        assert fc["id"] == "north" and np.asarray(fc["values"]).shape == (H, 2)
        assert pd.Timestamp(fc["timestamps"][0]) == pd.Timestamp(north.ds.iloc[len(north) - H])
        assert "80" in fc["intervals"]
        offline = windows[windows.unique_id == "north"].pivot(
            index="ds", columns="channel", values="forecast"
        )[["load", "temp"]]
        np.testing.assert_allclose(np.asarray(fc["values"]), offline.to_numpy(), atol=1e-3)

        # The Python client: the same forecast from a DataFrame, and the service's backtest of
        # every series equal to the offline one (same windows, cutoffs and forecasts).
        with Client(base) as client:
            got = client.forecast(history, level=[80])
            assert got.attrs["model"] == "shops-h12" and len(got) == H
            np.testing.assert_allclose(got[["load", "temp"]].to_numpy(), fc["values"], atol=1e-6)
            frame["ds"] = pd.to_datetime(frame.ds)
            served = client.backtest(frame, n_windows=1).frame
        served = served.melt(
            id_vars=["unique_id", "ds", "cutoff"],
            value_vars=["load-fast", "temp-fast"],
            var_name="channel",
            value_name="served",
        )
        served["channel"] = served.channel.str.removesuffix("-fast")
        offline_all = windows.assign(
            ds=pd.to_datetime(windows.ds), cutoff=pd.to_datetime(windows.cutoff)
        )
        both = offline_all.merge(served, on=["unique_id", "ds", "cutoff", "channel"])
        assert len(both) == len(offline_all) == 3 * H * 2
        np.testing.assert_allclose(both.served, both.forecast, atol=1e-3)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("store,load\nA,1\nA,2\n", "no timestamp column"),
        (
            "date,load,city\n2024-01-01,1,Oslo\n2024-01-02,2,Bergen\n",
            "column 'city' is not numeric",
        ),
        (
            "date,load\n2024-01-01,1\n2024-01-02,2\n2024-01-04,3\n2024-01-05,4\n",
            "gap between row 1",
        ),
        ("date,load\n2024-01-01,1\n2024-01-02,2\n2024-01-03,3\n", "3 rows are too few"),
    ],
)
def test_the_cli_names_the_problem_in_a_users_csv(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, problem: str
) -> None:
    csv = tmp_path / "mine.csv"
    csv.write_text(content)
    argv = ["pipeline", "--dataset", str(csv), "--quick", "--lookback", "4", "--horizon", "2"]
    argv += ["--registry", str(tmp_path / "registry"), "--work-dir", str(tmp_path / "runs")]
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert problem in err and str(csv) in err, err
    assert not (tmp_path / "registry").exists() or not any((tmp_path / "registry").iterdir())
