"""`plot(history, forecasts, actuals=None)`: the history's tail, the forecast(s), their intervals
and the actuals when known, one panel per series and value column (matplotlib: the `plot`
extra, `pip install "distilcast-client[plot]"`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

ID, DS = "unique_id", "ds"
_COLORS = {"fast": "tab:blue", "accurate": "tab:orange"}


def _named(forecasts: pd.DataFrame | Sequence[pd.DataFrame] | Mapping[str, pd.DataFrame]
           ) -> dict[str, pd.DataFrame]:
    if isinstance(forecasts, pd.DataFrame):
        forecasts = [forecasts]
    if isinstance(forecasts, Mapping):
        return dict(forecasts)
    out: dict[str, pd.DataFrame] = {}
    for i, f in enumerate(forecasts):
        label = str(f.attrs.get("mode", f"forecast {i + 1}"))
        if "model" in f.attrs:
            label = f"{label} ({f.attrs['model']}@{f.attrs.get('version')})"
        out[label] = f
    return out


def plot(history: pd.DataFrame,
         forecasts: pd.DataFrame | Sequence[pd.DataFrame] | Mapping[str, pd.DataFrame],
         actuals: pd.DataFrame | None = None, *, ids: Sequence[Any] | None = None,
         target_cols: Sequence[str] | None = None, tail: int | None = 168,
         id_col: str = ID, time_col: str = DS, max_series: int = 4) -> Any:
    """A matplotlib Figure: for each series (the first `max_series`, or `ids`) and value column,
    the last `tail` points of history, each forecast (`client.forecast` frames; give the fast
    and the accurate answer to compare them) with its widest interval shaded, and actuals.

    `history` and `actuals` are long frames with `id_col`/`time_col`; forecast frames use the
    client's `unique_id`/`ds` columns."""
    try:
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the extra
        raise ImportError('plot needs matplotlib: pip install "distilcast-client[plot]"') from exc

    named = _named(forecasts)
    first = next(iter(named.values()))
    if target_cols is None:
        target_cols = [c for c in first.columns if c not in (ID, DS) and "-lo-" not in c
                       and "-hi-" not in c]
    if ids is None:
        ids = list(pd.unique(first[ID]))[:max_series]
    rows, cols = len(ids), len(target_cols)
    fig, axes = plt.subplots(rows * cols, 1, figsize=(10, 3.2 * rows * cols), squeeze=False,
                             layout="constrained")
    for r, sid in enumerate(ids):
        past = history[history[id_col] == sid].sort_values(time_col)
        if tail is not None:
            past = past.tail(tail)
        for c, name in enumerate(target_cols):
            ax = axes[r * cols + c, 0]
            ax.plot(past[time_col], past[name], color="black", lw=1.0, label="history")
            for i, (label, f) in enumerate(named.items()):
                mine = f[f[ID] == sid]
                mode = str(f.attrs.get("mode", ""))
                color = _COLORS.get(mode, f"C{i + 2}")
                ax.plot(mine[DS], mine[name], color=color, lw=1.6, label=label)
                levels = sorted({float(k.rsplit("-", 1)[1]) for k in mine.columns
                                 if k.startswith(f"{name}-lo-")}, reverse=True)
                for j, level in enumerate(levels):
                    lo, hi = f"{name}-lo-{level:g}", f"{name}-hi-{level:g}"
                    ax.fill_between(mine[DS], mine[lo], mine[hi], color=color,
                                    alpha=0.12 + 0.1 * j, lw=0,
                                    label=f"{label} {level:g}% interval")
            if actuals is not None:
                seen = actuals[actuals[id_col] == sid].sort_values(time_col)
                ax.plot(seen[time_col], seen[name], color="tab:green", lw=1.0, ls="--",
                        label="actual")
            ax.set_title(f"{sid} · {name}", loc="left", fontsize=10)
            ax.grid(alpha=0.3)
            if r == 0 and c == 0:
                ax.legend(fontsize=8, loc="lower left", ncols=2)
    return fig
