"""GET /v1/models, GET /v1/models/{name}, PUT /v1/models/{name}/aliases/{alias} (admin)."""

from __future__ import annotations

import hmac
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Header

from models_registry.errors import IntegrityError, ManifestError, RegistryError
from models_registry.errors import ModelNotFound as RegistryModelNotFound
from models_registry.manifest import Manifest
from service import metrics
from service.api.deps import Services
from service.api.errors import from_registry
from service.api.routes.forecast import ERRORS
from service.api.schemas import AliasIn, AliasOut, ModelOut, ModelsOut
from service.core.errors import Forbidden, ModelNotFound, Unauthorized

log = logging.getLogger(__name__)


def check_admin(services: Services, authorization: str | None) -> None:
    """Bearer token, compared in constant time: 401 without one, 403 for a wrong one."""
    if not authorization:
        raise Unauthorized("admin route: send Authorization: Bearer <token>",
                           field="Authorization")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("admin route: expected a Bearer token", field="Authorization")
    expected = services.settings.admin_token
    if expected is None:
        raise Forbidden("admin routes are disabled (no admin token configured)",
                        field="Authorization")
    if not hmac.compare_digest(token.strip().encode(), expected.encode()):
        raise Forbidden("invalid admin token", field="Authorization")


def _version_info(m: Manifest, services: Services) -> dict[str, Any]:
    pool = services.need_pool()
    served = pool.get((m.name, m.version))
    return {
        "version": m.version,
        "kind": m.kind,
        "architecture": m.architecture,
        "lookback": m.lookback,
        "horizon": m.horizon,
        "channels": m.channels,
        "metrics": m.metrics,
        "created_at": m.created_at.isoformat() if m.created_at else None,
        "sha256": m.sha256,
        "members": [str(r) for r in m.members] if m.kind == "ensemble" else None,
        "teachers": [str(r) for r in m.teachers],
        "calibration_levels": m.calibration.levels if m.calibration else None,
        "loaded": served is not None,
        "provider": served.provider if served is not None else None,
    }


def build_router(services: Services) -> APIRouter:
    router = APIRouter(prefix="/v1/models", tags=["models"], responses=ERRORS)

    @router.get("", response_model=ModelsOut, summary="Served models, versions and aliases")
    async def list_models() -> dict[str, Any]:
        pool = services.need_pool()
        registry = services.need_registry()
        out = []
        for name in pool.names():
            state = pool.state(name)
            assert state is not None
            default = state.default
            metrics_ = (await pool.manifest((name, default))).metrics if default else {}
            out.append({
                "name": name,
                "kind": state.kind,
                "versions": state.versions,
                "aliases": await registry.aliases(name),
                "default_version": default,
                "loaded": [s.info() for s in pool.served() if s.name == name],
                "metrics": metrics_,
            })
        return {"models": out}

    @router.get("/{name}", response_model=ModelOut, summary="One model: versions and manifests")
    async def get_model(name: str) -> dict[str, Any]:
        pool = services.need_pool()
        registry = services.need_registry()
        try:
            versions = await registry.list_versions(name)
            aliases = await registry.aliases(name)
        except RegistryModelNotFound:
            raise ModelNotFound(f"unknown model {name!r}", field="name") from None
        except RegistryError as exc:
            raise from_registry(exc, "name") from None
        manifests = [await pool.manifest((name, v)) for v in versions]
        state = pool.state(name)
        return {
            "name": name,
            "kind": manifests[-1].kind,
            "versions": [_version_info(m, services) for m in manifests],
            "aliases": aliases,
            "serving": {
                "default": state.default if state else None,
                "aliases": dict(state.aliases) if state else {},
            },
        }

    @router.put(
        "/{name}/aliases/{alias}",
        response_model=AliasOut,
        summary="Point an alias at a version (admin; every replica follows)",
        responses={401: {"description": "No bearer token"},
                   403: {"description": "Wrong token or admin disabled"},
                   409: {"description": "The registry refused the version"}},
    )
    async def set_alias(
        name: str,
        alias: str,
        body: AliasIn,
        authorization: Annotated[str | None, Header()] = None,
    ) -> dict[str, Any]:
        check_admin(services, authorization)
        registry = services.need_registry()
        pool = services.need_pool()
        try:
            event = await registry.promote(name, alias, body.version)
        except RegistryError as exc:
            if isinstance(exc, IntegrityError | ManifestError):
                # A broken artifact is an incident for the operators, not only a 409 for the
                # caller: the same log line and counter as a failed load on a replica.
                log.error("refused to promote %s@%s to version %d: %s", name, alias,
                          body.version, exc)
                metrics.MODEL_LOADS.labels(name, type(exc).__name__).inc()
                raise from_registry(exc, "version") from None
            raise from_registry(exc, "version" if "version" in str(exc) else "name") from None
        # The event reaches this replica through the registry too; syncing here lets the answer
        # say what this replica now serves.
        await pool.sync_name(name)
        state = pool.state(name)
        return {
            "name": name,
            "alias": alias,
            "version": event.version,
            "previous": event.previous,
            "serving": state.aliases.get(alias) if state else None,
        }

    return router
