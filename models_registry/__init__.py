"""Model artifacts, manifests, aliases, storage and the Redis cache (docs/contracts.md).

Submodules: `manifest`, `errors`, `store` (filesystem, sync, source of truth), `cache`,
`registry` (async facade for the service). Nothing here imports torch, HTTP or metrics libraries.
"""
