"""The versions this replica serves, kept in step with the registry's aliases (hot swap).

Requests resolve `name[@alias|@version]` against an in-memory view (no I/O on the request path).
The view only ever points at versions that are loaded: on an alias change the new version is
loaded beside the old one, the view switches in one assignment, and the old version is released
once the requests holding it have finished. A version that fails to load leaves the view as it
was (the old version keeps serving); the failure is logged and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass

from models_registry.defaults import STAGING_ALIAS
from models_registry.errors import IntegrityError, RegistryError
from models_registry.errors import ModelNotFound as RegistryModelNotFound
from models_registry.manifest import DEFAULT_ALIAS, AliasEvent, Manifest, ModelRef
from models_registry.registry import Registry
from service.core.batcher import BatchHook, DynamicBatcher, RunFn
from service.core.engine import EngineOptions, OrtEngine
from service.core.errors import ModelNotFound, ModelUnavailable
from service.core.models import ServedModel
from service.core.modes import ENSEMBLE_SUFFIX, group_name
from service.core.observer import NULL_OBSERVER, Observer

log = logging.getLogger(__name__)

# Every registration lands on staging: replicas load it when a request asks for it, not eagerly
# (no memory for versions nobody calls, no load retried every refresh for a broken one).
LAZY_ALIASES = frozenset({STAGING_ALIAS})

Key = tuple[str, int]
# Versions named explicitly by requests (name@3) stay loaded while recently used, up to this many.
MAX_ON_DEMAND = 4


@dataclass(frozen=True, slots=True)
class PoolOptions:
    engine: EngineOptions
    batch_max_size: int = 1024
    batch_max_delay_s: float = 0.001
    batch_max_queue: int = 256
    inline_max_s: float = 0.002
    models: tuple[str, ...] = ()

    def batcher(
        self,
        run: RunFn,
        *,
        executor: Executor | None,
        on_batch: BatchHook | None = None,
        load_hint: Callable[[], int] | None = None,
    ) -> DynamicBatcher:
        """A dynamic batcher for `run` with these options' limits."""
        return DynamicBatcher(
            run,
            max_batch=self.batch_max_size,
            max_delay_s=self.batch_max_delay_s,
            max_queue=self.batch_max_queue,
            inline_max_s=self.inline_max_s,
            executor=executor,
            on_batch=on_batch,
            load_hint=load_hint,
        )


@dataclass(frozen=True, slots=True)
class ServingView:
    """What one name serves on this replica; replaced whole on every sync (read it freely)."""

    kind: str
    versions: tuple[int, ...]
    """Every registered version."""
    aliases: Mapping[str, int]
    """The serving view: alias -> a loaded version (lazy aliases: loaded on first request)."""
    default: int | None
    """What a bare name serves: production if loaded, else the latest loaded."""


class _Engines:
    """Sessions shared between served versions (an ensemble member used by two group versions)."""

    def __init__(self) -> None:
        self._items: dict[Key, tuple[OrtEngine, int]] = {}

    def get(self, key: Key) -> OrtEngine | None:
        item = self._items.get(key)
        return item[0] if item else None

    def add(self, key: Key, engine: OrtEngine) -> OrtEngine:
        current = self._items.get(key)
        if current is not None:
            self._items[key] = (current[0], current[1] + 1)
            return current[0]
        self._items[key] = (engine, 1)
        return engine

    def release(self, key: Key) -> None:
        engine, refs = self._items[key]
        if refs <= 1:
            del self._items[key]
        else:
            self._items[key] = (engine, refs - 1)


class ModelPool:
    def __init__(
        self,
        registry: Registry,
        options: PoolOptions,
        *,
        executor: Executor | None = None,
        load_hint: Callable[[], int] | None = None,
        observer: Observer = NULL_OBSERVER,
    ) -> None:
        self.registry = registry
        self.options = options
        self.executor = executor
        self.observer = observer
        self._load_hint = load_hint
        self._names: dict[str, ServingView] = {}
        self._served: dict[Key, ServedModel] = {}
        self._on_demand: OrderedDict[Key, None] = OrderedDict()
        self._loading: dict[Key, asyncio.Task[ServedModel]] = {}
        self._engines = _Engines()
        self._manifests: dict[Key, Manifest] = {}
        self._name_locks: dict[str, asyncio.Lock] = {}
        self._releases: set[asyncio.Task[None]] = set()
        self.failed: dict[Key, str] = {}

    # -- queries (sync, request path) ------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return bool(self._served) and all(s.default is not None for s in self._names.values())

    def names(self) -> list[str]:
        return sorted(self._names)

    def kind(self, name: str) -> str | None:
        state = self._names.get(name)
        return state.kind if state else None

    def view(self, name: str) -> ServingView | None:
        """The serving view of `name` (None: not served here)."""
        return self._names.get(name)

    def served(self) -> list[ServedModel]:
        return list(self._served.values())

    def loaded(self, name: str) -> list[ServedModel]:
        """The versions of `name` loaded on this replica, oldest first."""
        return sorted((s for k, s in self._served.items() if k[0] == name),
                      key=lambda s: s.version)

    def is_loaded(self, name: str, version: int) -> bool:
        """Whether `name@version` is loaded (unlike `get`, does not count as a use)."""
        return (name, version) in self._served

    def default_name(self) -> str | None:
        students = [n for n, s in self._names.items() if s.kind != "ensemble"]
        return students[0] if len(students) == 1 else None

    def group_of(self, name: str) -> str | None:
        group = group_name(name)
        state = self._names.get(group)
        return group if state is not None and state.kind == "ensemble" else None

    def lookup(self, name: str, selector: str | int | None, *, field: str = "model") -> Key:
        """Resolve against the serving view; raises ModelNotFound (unknown name/alias/version)."""
        state = self._names.get(name)
        if state is None:
            raise ModelNotFound(f"unknown model {name!r}", field=field)
        if selector is None:
            if state.default is None:
                raise ModelUnavailable(f"{name}: no loadable version", field=field)
            return name, state.default
        if isinstance(selector, int):
            if selector not in state.versions:
                raise ModelNotFound(f"{name} has no version {selector}", field=field)
            return name, selector
        version = state.aliases.get(selector)
        if version is None:
            raise ModelNotFound(f"{name} has no alias {selector!r}", field=field)
        return name, version

    def get(self, key: Key) -> ServedModel | None:
        served = self._served.get(key)
        if served is not None and key in self._on_demand:
            self._on_demand.move_to_end(key)
        return served

    async def obtain(self, key: Key, *, field: str = "model") -> ServedModel:
        """The served version, loading it on demand (explicit `name@version` requests)."""
        served = self.get(key)
        if served is not None:
            return served
        on_demand = not self._needed(*key)
        if on_demand:  # before loading, so a concurrent sync does not retire it right away
            self._on_demand[key] = None
        try:
            served = await self._load(key)
        except Exception as exc:
            if on_demand:
                self._on_demand.pop(key, None)
            raise ModelUnavailable(
                f"{key[0]}@{key[1]} cannot be loaded: {exc}", field=field
            ) from exc
        self._evict_on_demand()
        return served

    async def resolve(self, name: str, selector: str | int | None, *, field: str = "model") -> Key:
        """`lookup`, re-reading a known name once when it names a version not seen yet."""
        try:
            return self.lookup(name, selector, field=field)
        except ModelNotFound:
            if not isinstance(selector, int) or name not in self._names:
                raise
        await self.sync_name(name)
        return self.lookup(name, selector, field=field)

    async def manifest(self, key: Key) -> Manifest:
        manifest = self._manifests.get(key)
        if manifest is None:
            manifest = await self.registry.manifest(*key)
            self._manifests[key] = manifest
        return manifest

    # -- loading ---------------------------------------------------------------------------------

    def _make_batcher(self, served: ServedModel) -> DynamicBatcher:
        return self.options.batcher(served.run, executor=self.executor,
                                    on_batch=served.on_batch, load_hint=self._load_hint)

    async def _engine(self, ref: ModelRef) -> OrtEngine:
        key = (ref.name, ref.version)
        existing = self._engines.get(key)
        if existing is not None:
            return self._engines.add(key, existing)
        data = await self.registry.onnx_bytes(ref.name, ref.version)
        engine = await asyncio.to_thread(OrtEngine, data, self.options.engine, label=str(ref))
        return self._engines.add(key, engine)

    async def _load(self, key: Key) -> ServedModel:
        """Load one version (deduplicated: concurrent callers share one load)."""
        served = self._served.get(key)
        if served is not None:
            return served
        task = self._loading.get(key)
        if task is None:
            task = asyncio.create_task(self._do_load(key), name=f"load {key[0]}@{key[1]}")
            self._loading[key] = task
            task.add_done_callback(lambda _t: self._loading.pop(key, None))
        return await asyncio.shield(task)

    async def _do_load(self, key: Key) -> ServedModel:
        name = key[0]
        engines: list[Key] = []
        try:
            manifest = await self.manifest(key)
            refs = manifest.members if manifest.kind == "ensemble" else [manifest.ref]
            sessions = []
            for ref in refs:
                sessions.append(await self._engine(ref))
                engines.append((ref.name, ref.version))
            served = ServedModel(manifest, sessions, self._make_batcher, observer=self.observer)
            await asyncio.to_thread(served.warmup)
        except Exception as exc:
            for engine_key in engines:
                self._engines.release(engine_key)
            reason = type(exc).__name__
            self.failed[key] = f"{reason}: {exc}"
            self.observer.model_load(name, reason)
            kind = "integrity_refused" if isinstance(exc, IntegrityError) else "load_failed"
            log.error("loading %s@%d failed; the previous version keeps serving: %s",
                      name, key[1], exc,
                      extra={"event": kind, "model": name, "version": key[1], "error": reason})
            raise
        self.failed.pop(key, None)
        self._served[key] = served
        self.observer.model_load(name, "ok")
        self.observer.model_loaded(name, key[1], served.kind, served.provider, True)
        log.info("loaded %s (%s, %s)", served.label, served.kind, served.provider,
                 extra={"event": "load", "model": name, "version": key[1],
                        "kind": served.kind, "provider": served.provider})
        return served

    # -- keeping in step with the registry -------------------------------------------------------

    def _managed(self, names: list[str], kinds: dict[str, str]) -> list[str]:
        wanted = self.options.models
        out = []
        for name in names:
            kind = kinds.get(name)
            if kind is None or kind == "teacher":
                continue  # teachers are served as ensemble members, not on their own
            base = name.removesuffix(ENSEMBLE_SUFFIX) if kind == "ensemble" else name
            if wanted and base not in wanted:
                continue
            out.append(name)
        return out

    async def start(self) -> None:
        await self.refresh()

    async def refresh(self) -> None:
        """Re-read every name from the registry and load/switch/release what changed."""
        names = await self.registry.list_models()
        kinds: dict[str, str] = {}
        for name in names:
            with contextlib.suppress(RegistryError):
                latest = (await self.registry.list_versions(name))[-1]
                kinds[name] = (await self.manifest((name, latest))).kind
        for name in self._managed(names, kinds):
            await self.sync_name(name, kind=kinds[name])

    async def on_alias_event(self, event: AliasEvent) -> None:
        if event.name in self._names or event.name in await self.registry.list_models():
            await self.sync_name(event.name)

    async def sync_name(self, name: str, *, kind: str | None = None) -> None:
        lock = self._name_locks.setdefault(name, asyncio.Lock())
        async with lock:
            try:
                versions = await self.registry.list_versions(name)
                aliases = await self.registry.aliases(name)
                if kind is None:
                    kind = (await self.manifest((name, versions[-1]))).kind
            except RegistryModelNotFound:
                return
            except RegistryError as exc:
                log.warning("cannot read %s from the registry: %s", name, exc)
                return
            if kind == "teacher":
                return
            old = self._names.get(name)
            wanted_default = aliases.get(DEFAULT_ALIAS, versions[-1])
            eager = {v for a, v in aliases.items() if a not in LAZY_ALIASES}
            for version in sorted({*eager, wanted_default}):
                if (name, version) not in self._served:
                    with contextlib.suppress(Exception):  # counted and logged in _do_load
                        await self._load((name, version))
            serving: dict[str, int] = {}
            for alias, version in aliases.items():
                if alias in LAZY_ALIASES or (name, version) in self._served:
                    # A lazy alias resolves at once and loads on its first request (`obtain`).
                    serving[alias] = version
                elif old is not None and alias in old.aliases:
                    serving[alias] = old.aliases[alias]  # keep the old version serving
            if (name, wanted_default) in self._served:
                default: int | None = wanted_default
            else:
                default = old.default if old is not None else None
            new = ServingView(kind, tuple(versions), serving, default)
            self._names[name] = new  # the atomic switch
            for alias, version in serving.items():
                before = old.aliases.get(alias) if old is not None else None
                if before != version and alias not in LAZY_ALIASES:
                    if old is not None:
                        self.observer.model_swap(name, alias)
                    log.info("%s@%s now serves version %d (was %s)", name, alias, version,
                             before, extra={"event": "swap", "model": name, "alias": alias,
                                            "old_version": before, "new_version": version})
            self._retire_unneeded(name)

    def _needed(self, name: str, version: int) -> bool:
        state = self._names.get(name)
        if state is None:
            return False
        return version == state.default or version in state.aliases.values()

    def _retire_unneeded(self, name: str) -> None:
        for key in [k for k in self._served if k[0] == name]:
            if not self._needed(*key) and key not in self._on_demand:
                self._retire(key)

    def _evict_on_demand(self) -> None:
        while len(self._on_demand) > MAX_ON_DEMAND:
            key, _ = self._on_demand.popitem(last=False)
            if not self._needed(*key):
                self._retire(key)

    def _retire(self, key: Key) -> None:
        served = self._served.pop(key, None)
        if served is None:
            return
        served.retired = True
        task = asyncio.create_task(self._release(served), name=f"release {served.label}")
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _release(self, served: ServedModel) -> None:
        await served.drained()
        await served.batcher.close()
        for ref in served.members:
            self._engines.release((ref.name, ref.version))
        self.observer.model_loaded(served.name, served.version, served.kind, served.provider,
                                   False)
        log.info("released %s", served.label,
                 extra={"event": "release", "model": served.name, "version": served.version})

    async def close(self, timeout: float) -> None:
        """Drain every served version (waiting for in-flight requests up to `timeout`)."""
        for key in list(self._served):
            self._retire(key)
        if self._releases:
            await asyncio.wait(set(self._releases), timeout=timeout)
        for task in self._loading.values():
            task.cancel()
