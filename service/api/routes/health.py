"""GET /healthz (alive), /readyz (models loaded), /metrics (Prometheus)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from starlette.responses import Response

from service import metrics
from service.api.deps import Services
from service.api.errors import json_error


def build_router(services: Services) -> APIRouter:
    router = APIRouter(tags=["health"])

    @router.get("/healthz", summary="The process is alive")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/readyz", summary="Models are loaded and the replica takes traffic",
                responses={503: {"description": "Not ready (starting, draining, no model)"}})
    async def readyz() -> Any:
        pool = services.pool
        if services.draining:
            return json_error(503, "draining", "shutting down")
        if pool is None or not pool.ready:
            return json_error(503, "not_ready", "models are not loaded yet")
        registry = services.need_registry()
        return {
            "status": "ready",
            "models": {n: v.default for n in pool.names() if (v := pool.view(n))},
            # Redis down does not make the replica unready: it serves its loaded models.
            "cache_available": registry.cache.available,
            "events": registry.listening,
        }

    @router.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics_endpoint() -> Response:
        if services.registry is not None:
            metrics.sync_cache_stats(services.registry.stats.as_dict())
            metrics.REGISTRY_CACHE_UP.set(1 if services.registry.cache.available else 0)
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    return router
