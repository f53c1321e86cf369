"""How the core reports what it does, without knowing who listens.

The core (pool, served models, predictor) calls an `Observer`; the web layer implements it with
its exporter, while the batch job and tests keep the no-op `NULL_OBSERVER`. So `service/core/`
imports neither the web layer nor an exporter, and the Ray job reuses the core as it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class BatchObserver(Protocol):
    """Per served version, bound once at load: called after every session call."""

    def on_batch(self, rows: int, seconds: float, waits: Sequence[float]) -> None: ...


class Observer(Protocol):
    def batch_observer(self, name: str, version: int, provider: str) -> BatchObserver:
        """The hook for one served version's session calls (rows, call seconds, queue waits)."""
        ...

    def model_load(self, name: str, outcome: str) -> None:
        """A version load finished: `outcome` is "ok" or the error class of a failed load."""
        ...

    def model_loaded(
        self, name: str, version: int, kind: str, provider: str, loaded: bool
    ) -> None:
        """A version started (`loaded`) or stopped being served by this process."""
        ...

    def model_swap(self, name: str, alias: str) -> None:
        """An alias switched to another version on this process (a hot swap)."""
        ...

    def shadow_gaps(self, name: str, gaps: Sequence[float]) -> None:
        """Distillation gaps (MAE(student, ensemble) / window std) of shadowed fast requests."""
        ...


class _NullBatch:
    __slots__ = ()

    def on_batch(self, rows: int, seconds: float, waits: Sequence[float]) -> None:
        pass


class NullObserver:
    """Reports nothing (the default)."""

    __slots__ = ()
    _batch = _NullBatch()

    def batch_observer(self, name: str, version: int, provider: str) -> BatchObserver:
        return self._batch

    def model_load(self, name: str, outcome: str) -> None:
        pass

    def model_loaded(
        self, name: str, version: int, kind: str, provider: str, loaded: bool
    ) -> None:
        pass

    def model_swap(self, name: str, alias: str) -> None:
        pass

    def shadow_gaps(self, name: str, gaps: Sequence[float]) -> None:
        pass


NULL_OBSERVER: Observer = NullObserver()
