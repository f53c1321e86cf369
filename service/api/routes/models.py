"""GET /v1/models, /v1/models/{name}, /{name}/versions/{v}, /{name}/ready, /{name}/history;
PUT /v1/models/{name}/aliases/{alias} (admin, through the promotion gate)."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Mapping
from typing import Annotated, Any

from fastapi import APIRouter, Header
from fastapi.responses import JSONResponse

from models_registry.errors import (
    AliasNotFound,
    IntegrityError,
    InvalidName,
    ManifestError,
    PromotionRefused,
    RegistryError,
    VersionNotFound,
)
from models_registry.errors import ModelNotFound as RegistryModelNotFound
from models_registry.manifest import DEFAULT_ALIAS, Manifest
from service import metrics
from service.api.deps import Services
from service.api.errors import from_registry
from service.api.routes.forecast import ERRORS
from service.api.schemas import (
    AliasIn,
    AliasOut,
    HistoryOut,
    ModelOut,
    ModelsOut,
    ReadyOut,
    VersionCard,
)
from service.core.errors import Conflict, Forbidden, ModelNotFound, ServiceError, Unauthorized
from service.core.models import ServedModel
from service.logs import event as log_event
from service.logs import request_id

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


def _field(exc: RegistryError) -> str:
    """The request field a registry refusal is about, by its type."""
    if isinstance(exc, VersionNotFound | IntegrityError | ManifestError):
        return "version"
    if isinstance(exc, AliasNotFound):
        return "alias"
    if isinstance(exc, InvalidName):
        return exc.part
    return "name"


def _refused(exc: RegistryError) -> ServiceError:
    return from_registry(exc, _field(exc))


def _version_info(m: Manifest, loaded: Mapping[int, ServedModel]) -> dict[str, Any]:
    served = loaded.get(m.version)
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


def _card(m: Manifest, aliases: dict[str, int], loaded: bool) -> dict[str, Any]:
    dataset = m.dataset
    return {
        "name": m.name,
        "version": m.version,
        "kind": m.kind,
        "architecture": m.architecture,
        "frequency": m.frequency,
        "features": dataset.features if dataset else None,
        "target": dataset.target if dataset else None,
        "lookback": m.lookback,
        "horizon": m.horizon,
        "channels": m.channels,
        "inputs": [{"name": m.input_name, "shape": m.input_shape or []}],
        "outputs": [{"name": m.output_name, "shape": m.output_shape or []}],
        "normalisation": m.normalisation,
        "dataset": dataset.model_dump(mode="json") if dataset else None,
        "metrics": m.metrics,
        "calibration_levels": m.calibration.levels if m.calibration else None,
        "teachers": [str(r) for r in m.teachers],
        "members": [str(r) for r in m.members] if m.kind == "ensemble" else None,
        "sha256": m.sha256,
        "opset": m.opset,
        "parity_max_abs_err": m.parity_max_abs_err,
        "created_at": m.created_at.isoformat() if m.created_at else None,
        "code_version": m.code_version,
        "lineage": m.lineage.model_dump(mode="json") if m.lineage else None,
        "aliases": sorted(a for a, v in aliases.items() if v == m.version),
        "loaded": loaded,
    }


def build_router(services: Services) -> APIRouter:
    router = APIRouter(prefix="/v1/models", tags=["models"], responses=ERRORS)

    @router.get("", response_model=ModelsOut, summary="Served models, versions and aliases")
    async def list_models() -> dict[str, Any]:
        pool = services.need_pool()
        registry = services.need_registry()
        out = []
        for name in pool.names():
            view = pool.view(name)
            if view is None:  # dropped between the two calls
                continue
            default = view.default
            metrics_ = (await pool.manifest((name, default))).metrics if default else {}
            out.append({
                "name": name,
                "kind": view.kind,
                "versions": list(view.versions),
                "aliases": await registry.aliases(name),
                "default_version": default,
                "loaded": [s.info() for s in pool.loaded(name)],
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
            manifests = [await pool.manifest((name, v)) for v in versions]
        except RegistryModelNotFound:
            raise ModelNotFound(f"unknown model {name!r}", field="name") from None
        except RegistryError as exc:
            raise _refused(exc) from None
        view = pool.view(name)
        loaded = {s.version: s for s in pool.loaded(name)}
        default = (view.default if view else None) or aliases.get(DEFAULT_ALIAS) or versions[-1]
        card = next((m for m in manifests if m.version == default), manifests[-1])
        return {
            "name": name,
            "kind": manifests[-1].kind,
            "versions": [_version_info(m, loaded) for m in manifests],
            "aliases": aliases,
            "serving": {
                "default": view.default if view else None,
                "aliases": dict(view.aliases) if view else {},
            },
            "card": _card(card, aliases, default in loaded),
        }

    @router.get("/{name}/versions/{version}", response_model=VersionCard,
                summary="One version's manifest card: frequency, features, shapes, lineage")
    async def get_version(name: str, version: int) -> dict[str, Any]:
        pool = services.need_pool()
        registry = services.need_registry()
        try:
            manifest = await pool.manifest((name, version))
            aliases = await registry.aliases(name)
        except RegistryError as exc:
            raise _refused(exc) from None
        return _card(manifest, aliases, pool.is_loaded(name, version))

    @router.get("/{name}/ready", response_model=ReadyOut,
                responses={503: {"model": ReadyOut, "description": "Not loaded on this replica"}},
                summary="200 when this replica has the model loaded (per-model readiness)")
    async def model_ready(name: str) -> Any:
        pool = services.need_pool()
        view = pool.view(name)
        loaded = [s.version for s in pool.loaded(name)]
        if view is None:
            try:
                await services.need_registry().list_versions(name)
            except RegistryModelNotFound:
                raise ModelNotFound(f"unknown model {name!r}", field="name") from None
            except RegistryError as exc:
                raise _refused(exc) from None
        default = view.default if view else None
        body = {"name": name, "ready": default is not None and bool(loaded),
                "versions": loaded, "default_version": default}
        if body["ready"] and not services.draining:
            return body
        return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})

    @router.get("/{name}/history", response_model=HistoryOut,
                summary="Every alias change of a model (time, old, new, who, gate figures)")
    async def get_history(name: str) -> dict[str, Any]:
        registry = services.need_registry()
        try:
            changes = await registry.history(name)
        except RegistryModelNotFound:
            raise ModelNotFound(f"unknown model {name!r}", field="name") from None
        except RegistryError as exc:
            raise _refused(exc) from None
        return {"name": name, "changes": [
            {**c.model_dump(mode="json", exclude={"name"}), "time": c.time.isoformat()}
            for c in changes
        ]}

    @router.put(
        "/{name}/aliases/{alias}",
        response_model=AliasOut,
        summary="Point an alias at a version (admin; every replica follows)",
        responses={401: {"description": "No bearer token"},
                   403: {"description": "Wrong token or admin disabled"},
                   409: {"description": "The registry refused the version, or the promotion "
                         "gate did (a worse validation MSE; the message names both figures)"}},
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
        rid = request_id.get()
        try:
            event, change = await registry.change_alias(
                name, alias, body.version, force=body.force, actor=f"api:{rid}",
                tolerance=services.settings.promotion_tolerance,
            )
        except PromotionRefused as exc:
            log.warning("promotion refused: %s", exc, extra=log_event(
                "promotion_refused", model=name, alias=alias, version=body.version,
                metric=exc.metric, candidate=exc.candidate, current=exc.current,
                current_version=exc.current_version))
            raise Conflict(str(exc), field="version") from None
        except RegistryError as exc:
            if isinstance(exc, IntegrityError | ManifestError):
                # A broken artifact is an incident for the operators, not only a 409 for the
                # caller: the same log line and counter as a failed load on a replica.
                log.error("refused to promote %s@%s to version %d: %s", name, alias,
                          body.version, exc, extra=log_event(
                              "integrity_refused", model=name, alias=alias,
                              version=body.version))
                metrics.MODEL_LOADS.labels(name, type(exc).__name__).inc()
            raise _refused(exc) from None
        gate = change.gate
        log.info(
            "promoted %s@%s: %s -> %d%s", name, alias, change.previous, change.version,
            " (forced past the gate)" if change.forced else "",
            extra=log_event(
                "promote", model=name, alias=alias, old_version=change.previous,
                new_version=change.version, forced=change.forced, actor=change.actor,
                gate=gate.model_dump() if gate is not None else None,
            ),
        )
        # The event reaches this replica through the registry too; syncing here lets the answer
        # say what this replica now serves.
        await pool.sync_name(name)
        view = pool.view(name)
        return {
            "name": name,
            "alias": alias,
            "version": event.version,
            "previous": event.previous,
            "serving": view.aliases.get(alias) if view else None,
            "forced": change.forced,
            "gate": gate.model_dump() if gate is not None else None,
        }

    return router
