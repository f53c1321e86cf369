"""A loaded model version: its sessions (one, or an ensemble's members), batcher and bookkeeping."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import numpy as np

from models_registry.manifest import Manifest, ModelRef
from service.core.batcher import DynamicBatcher
from service.core.engine import OrtEngine
from service.core.intervals import Calibration
from service.core.observer import NULL_OBSERVER, Observer

log = logging.getLogger(__name__)

BatcherFactory = Callable[["ServedModel"], DynamicBatcher]
WARMUP_ROWS = (1, 8)


class ServedModel:
    """One servable (name, version). Ensembles average their members' forecasts.

    `inflight` counts requests holding this version; a retired version is released only once it
    drops to zero, so a hot swap never pulls a session from under a running request.
    """

    def __init__(
        self,
        manifest: Manifest,
        engines: list[OrtEngine],
        batcher_factory: BatcherFactory,
        *,
        observer: Observer = NULL_OBSERVER,
    ) -> None:
        self.manifest = manifest
        self.name = manifest.name
        self.version = manifest.version
        self.kind = manifest.kind
        self.lookback = manifest.lookback
        self.horizon = manifest.horizon
        self.channels = manifest.channels
        self.engines = engines
        self.calibration = Calibration.from_manifest(
            manifest.calibration.model_dump() if manifest.calibration else None
        )
        self.provider = ",".join(sorted({e.provider for e in engines}))
        self.label = f"{self.name}@{self.version}"
        self.on_batch = observer.batch_observer(self.name, self.version, self.provider).on_batch
        """Called by the batcher after each session call: (rows, seconds, queue waits)."""
        self.inflight = 0
        self.retired = False
        self._idle = asyncio.Event()
        self._idle.set()
        self.batcher = batcher_factory(self)

    @property
    def members(self) -> list[ModelRef]:
        return list(self.manifest.members) if self.kind == "ensemble" else [self.manifest.ref]

    def run(self, x: np.ndarray) -> np.ndarray:
        """x: float32 [B, L, C] -> float32 [B, H, C]; ensembles: the mean of the members."""
        if len(self.engines) == 1:
            return self.engines[0].run(x)
        total = self.engines[0].run(x)
        for engine in self.engines[1:]:
            total += engine.run(x)
        total /= len(self.engines)
        return total

    def warmup(self) -> None:
        """Run the graph once per warm-up size: checks the output shape, seeds the cost model."""
        channels = self.channels or 1
        for rows in WARMUP_ROWS:
            x = np.zeros((rows, self.lookback, channels), dtype=np.float32)
            for _ in range(2):  # the first call pays one-off allocations; time the second
                y, seconds = self.batcher.timed_run(x)
            if y.shape != (rows, self.horizon, channels):
                expected = (rows, self.horizon, channels)
                raise ValueError(f"{self.label}: output {y.shape}, manifest says {expected}")
            self.batcher.cost.observe(rows, seconds)

    def use(self) -> ServedModel:
        """`with served.use():` holds this version for the block (a plain context manager, not
        a generator one: this runs on every request)."""
        return self

    def __enter__(self) -> ServedModel:
        self.inflight += 1
        self._idle.clear()
        return self

    def __exit__(self, *exc: object) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self._idle.set()

    async def drained(self) -> None:
        await self._idle.wait()

    def info(self) -> dict[str, object]:
        return {
            "name": self.name,
            "version": self.version,
            "kind": self.kind,
            "provider": self.provider,
            "lookback": self.lookback,
            "horizon": self.horizon,
            "channels": self.channels,
            "members": [str(m) for m in self.members] if self.kind == "ensemble" else None,
            "inflight": self.inflight,
        }
