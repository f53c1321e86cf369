"""The README's forecast figure, from the bundled models and the bundled ETTh1 data.

    .venv/bin/python bench/plot_readme.py [--url URL] [--out docs/img/forecast.png]

Without --url it imports the bundled registry export into a temporary folder and serves it in
this process (uvicorn on a free loopback port), so the figure needs nothing running. The last
`--hold-out` hours of ETTh1 (all 7 columns) are kept back as the actuals; the client asks for the
fast (student) and the accurate (teacher ensemble) forecast of them with 80/95% intervals and
plots the history's last week of `OT`, both forecasts and what happened.
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import matplotlib
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distilcast_client import Client, plot  # noqa: E402


@contextmanager
def bundled_service() -> Iterator[str]:
    import uvicorn

    from models_registry.bundle import BUNDLED_DIR, import_models
    from models_registry.store import FilesystemStore
    from service.app import create_app
    from service.config import Settings

    with tempfile.TemporaryDirectory() as tmp:
        import_models(BUNDLED_DIR, FilesystemStore(Path(tmp) / "registry"))
        app = create_app(Settings(registry_root=Path(tmp) / "registry", shadow_fraction=0.0))
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        try:
            yield f"http://127.0.0.1:{sock.getsockname()[1]}"
        finally:
            server.should_exit = True
            thread.join(timeout=15)
            sock.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=None)
    p.add_argument("--model", default="etth1-h96")
    p.add_argument("--hold-out", type=int, default=96)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "forecast.png")
    args = p.parse_args()
    matplotlib.use("Agg")

    data = pd.read_csv(ROOT / "data" / "ETTh1.csv", parse_dates=["date"])
    # The bundled students read all 7 channels together; the figure shows OT.
    df = data.rename(columns={"date": "ds"}).assign(unique_id="ETTh1")
    history, actuals = df.iloc[: -args.hold_out], df.iloc[-args.hold_out :]
    with (bundled_service() if args.url is None else _given(args.url)) as url, Client(url) as c:
        fast = c.forecast(history.tail(720), h=args.hold_out, level=[80, 95], model=args.model)
        accurate = c.forecast(history.tail(720), h=args.hold_out, level=[80], mode="accurate",
                              model=args.model)
    fig = plot(history, [fast, accurate], actuals=actuals, tail=168, target_cols=["OT"])
    fig.axes[0].set_title(f"ETTh1 oil temperature (OT): the last week, then {args.hold_out} h "
                          "forecast by the bundled student (fast) and teacher ensemble (accurate)",
                          loc="left", fontsize=10)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


@contextmanager
def _given(url: str) -> Iterator[str]:
    yield url


if __name__ == "__main__":
    main()
