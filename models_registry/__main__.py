"""Command line: `python -m models_registry [--root DIR] list | show | promote | verify | gc`.

Exit codes: 0 success, 1 the operation failed (not found, integrity, verify found problems),
2 bad usage (arguments, malformed names).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence

from models_registry.defaults import DEFAULT_ROOT, REDIS_ENV, ROOT_ENV
from models_registry.errors import InvalidName, RegistryError
from models_registry.store import FilesystemStore


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m models_registry", description=__doc__)
    p.add_argument(
        "--root",
        default=os.environ.get(ROOT_ENV, DEFAULT_ROOT),
        help=f"registry root (default: ${ROOT_ENV}, else {DEFAULT_ROOT})",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="models, versions and aliases")
    show = sub.add_parser("show", help="print a manifest as JSON")
    show.add_argument("ref", metavar="NAME[@VERSION|@ALIAS]")
    promote = sub.add_parser("promote", help="point an alias at a version")
    promote.add_argument("name")
    promote.add_argument("version", type=int)
    promote.add_argument("--alias", default="production")
    verify = sub.add_parser("verify", help="check hashes, manifests, groups and aliases")
    verify.add_argument("name", nargs="?")
    gc = sub.add_parser("gc", help="delete old versions (never aliased ones)")
    gc.add_argument("--keep", type=int, required=True, help="newest versions kept per model")
    gc.add_argument("--dry-run", action="store_true", help="only print what would be deleted")
    return p


def cmd_list(store: FilesystemStore) -> int:
    names = store.list_models()
    if not names:
        print(f"no models in {store.root}")
        return 0
    for name in names:
        versions = store.list_versions(name)
        aliases = store.aliases(name)
        kind = store.manifest(name, versions[-1]).kind
        shown = ",".join(map(str, versions))
        alias_text = " ".join(f"{a}={v}" for a, v in sorted(aliases.items())) or "-"
        print(f"{name}\t{kind}\tversions={shown}\taliases: {alias_text}")
    return 0


def cmd_show(store: FilesystemStore, ref: str) -> int:
    name, version = store.resolve(ref)
    print(store.manifest(name, version).model_dump_json(indent=2))
    return 0


async def _promote(root: str, name: str, alias: str, version: int) -> str:
    # Imported here: only promote needs the async/Redis stack, and the other commands start faster.
    from models_registry.registry import open_registry

    # Through the Registry, so replicas listening on Redis hear about it at once.
    registry = open_registry(root, os.environ.get(REDIS_ENV) or None)
    try:
        event = await registry.promote(name, alias, version)
    finally:
        await registry.close()
    before = "unset" if event.previous is None else str(event.previous)
    return f"{name}@{alias}: {before} -> {event.version}"


def cmd_verify(store: FilesystemStore, name: str | None) -> int:
    problems = store.verify(name)
    for problem in problems:
        print(problem)
    if problems:
        print(f"{len(problems)} problem(s) found", file=sys.stderr)
        return 1
    checked = [name] if name else store.list_models()
    total = sum(len(store.list_versions(n)) for n in checked)
    print(f"ok: {total} version(s) of {len(checked)} model(s) verified")
    return 0


def cmd_gc(store: FilesystemStore, keep: int, dry_run: bool) -> int:
    deleted = store.gc(keep, dry_run=dry_run)
    verb = "would delete" if dry_run else "deleted"
    for ref in deleted:
        print(f"{verb} {ref}")
    print(f"{verb} {len(deleted)} version(s)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    store = FilesystemStore(args.root)
    try:
        if args.command == "list":
            return cmd_list(store)
        if args.command == "show":
            return cmd_show(store, args.ref)
        if args.command == "promote":
            print(asyncio.run(_promote(args.root, args.name, args.alias, args.version)))
            return 0
        if args.command == "verify":
            return cmd_verify(store, args.name)
        if args.command == "gc":
            return cmd_gc(store, args.keep, args.dry_run)
    except (InvalidName, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (RegistryError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    raise AssertionError(f"unhandled command {args.command!r}")


if __name__ == "__main__":
    sys.exit(main())
