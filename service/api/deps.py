"""What the routes share: the settings and the objects the lifespan opens."""

from __future__ import annotations

from dataclasses import dataclass, field

from models_registry.registry import Registry
from service.api.decode import Limits
from service.config import Settings
from service.core.errors import ModelUnavailable
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
    draining: bool = False

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
