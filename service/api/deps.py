"""What the routes share: the settings and the objects the lifespan opens."""

from __future__ import annotations

from dataclasses import dataclass, field

from models_registry.registry import Registry
from service.api.access import AccessControl
from service.api.decode import Limits
from service.api.live import LiveAccuracy
from service.config import Settings
from service.core.errors import ModelUnavailable, Overloaded
from service.core.pool import ModelPool
from service.core.predictor import LoadCounter, Predictor


@dataclass
class Services:
    settings: Settings
    limits: Limits
    load: LoadCounter = field(default_factory=LoadCounter)
    registry: Registry | None = None
    pool: ModelPool | None = None
    predictor: Predictor | None = None
    access: AccessControl | None = None
    live: LiveAccuracy | None = None
    draining: bool = False
    inflight_bytes: int = 0

    def admit(self, length: int | None) -> int:
        """Admit a forecast request (already counted in `load`) announcing `length` body bytes,
        or raise Overloaded; returns the bytes reserved (give them back with `release`)."""
        s = self.settings
        if self.load.value > s.max_in_flight:
            raise Overloaded(f"{s.max_in_flight} requests in flight", retry_after_s=1)
        n = length or 0
        if self.inflight_bytes and self.inflight_bytes + n > s.max_in_flight_bytes:
            raise Overloaded(f"{self.inflight_bytes} body bytes in flight", retry_after_s=1)
        self.inflight_bytes += n
        return n

    def release(self, reserved: int) -> None:
        self.inflight_bytes -= reserved

    def need_pool(self) -> ModelPool:
        if self.pool is None:
            raise ModelUnavailable("the service is starting")
        return self.pool

    def need_registry(self) -> Registry:
        if self.registry is None:
            raise ModelUnavailable("the service is starting")
        return self.registry

    def need_predictor(self) -> Predictor:
        if self.predictor is None:
            raise ModelUnavailable("the service is starting")
        return self.predictor
