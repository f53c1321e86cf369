"""Command line: `python -m models_registry [--root DIR] COMMAND`.

Commands: list, show, promote (through the promotion gate), history, verify, gc, export, import
(models_registry/bundle.py: move names with their teachers and ensemble between registries).

Exit codes: 0 success, 1 the operation failed (not found, integrity, verify found problems),
2 bad usage (arguments, malformed names).
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import os
import sys
from collections.abc import Sequence

from models_registry.defaults import (
    DEFAULT_ROOT,
    DEFAULT_TOLERANCE,
    REDIS_ENV,
    ROOT_ENV,
    TOLERANCE_ENV,
)
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
    promote.add_argument("--force", action="store_true",
                         help="promote past the gate (a worse validation MSE); kept in history")
    promote.add_argument("--tolerance", type=float, default=None,
                         help=f"relative slack of the gate (default: ${TOLERANCE_ENV}, else "
                         f"{DEFAULT_TOLERANCE:g})")
    promote.add_argument("--actor", default=None,
                         help="who promotes, for the history (default: cli:$USER)")
    history = sub.add_parser("history", help="every alias change of a model, oldest first")
    history.add_argument("name")
    history.add_argument("--json", action="store_true", help="one JSON object per line")
    verify = sub.add_parser("verify", help="check hashes, manifests, groups and aliases")
    verify.add_argument("name", nargs="?")
    gc = sub.add_parser("gc", help="delete old versions (never aliased ones)")
    gc.add_argument("--keep", type=int, required=True, help="newest versions kept per model")
    gc.add_argument("--dry-run", action="store_true", help="only print what would be deleted")
    export = sub.add_parser("export", help="copy names (with their teachers and ensemble group) "
                            "into a new folder, with SHA256SUMS")
    export.add_argument("--names", required=True,
                        help="comma-separated model names, e.g. etth1-h96,etth2-h96")
    export.add_argument("--out", required=True, help="the folder to create (must not exist)")
    imp = sub.add_parser("import", help="add an export's models that this registry lacks "
                         "(never changes an existing model, version or alias)")
    imp.add_argument("source", nargs="?", default=None,
                     help="an export folder (default: the bundled models, "
                     "models_registry/bundled/)")
    imp.add_argument("--if-empty", action="store_true",
                     help="do nothing unless the registry holds no model")
    return p


def cmd_export(store: FilesystemStore, names: str, out: str) -> int:
    from models_registry.bundle import export_models

    wanted = [n.strip() for n in names.split(",") if n.strip()]
    if not wanted:
        raise ValueError("--names: give at least one model name")
    exported = export_models(store, wanted, out)
    for name, versions in exported.items():
        print(f"exported {name}@{','.join(map(str, versions))}")
    print(f"ok: {sum(map(len, exported.values()))} version(s) of {len(exported)} model(s) "
          f"in {out}")
    return 0


def cmd_import(store: FilesystemStore, source: str | None, if_empty: bool) -> int:
    from models_registry.bundle import BUNDLED_DIR, import_models

    report = import_models(source or BUNDLED_DIR, store, if_empty=if_empty)
    if report.skipped:
        print(f"import skipped: {report.skipped}")
        return 0
    for name, versions in report.added.items():
        print(f"added {name}@{','.join(map(str, versions))}")
    for name in report.kept:
        print(f"kept {name} (already here, identical)")
    print(f"ok: {len(report.added)} model(s) added, {len(report.kept)} already present, "
          f"into {store.root}")
    return 0


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


async def _promote(root: str, name: str, alias: str, version: int, *, force: bool,
                   tolerance: float | None, actor: str) -> str:
    # Imported here: only promote needs the async/Redis stack, and the other commands start faster.
    from models_registry.registry import open_registry

    # Through the Registry, so replicas listening on Redis hear about it at once.
    registry = open_registry(root, os.environ.get(REDIS_ENV) or None)
    try:
        _, change = await registry.change_alias(
            name, alias, version, force=force, actor=actor, tolerance=tolerance
        )
    finally:
        await registry.close()
    before = "unset" if change.previous is None else str(change.previous)
    line = f"{name}@{alias}: {before} -> {change.version}"
    if change.gate is not None and change.gate.current is not None:
        g = change.gate
        line += (f" ({g.metric} {g.candidate} vs {g.current}"
                 f"{', forced past the gate' if change.forced else ''})")
    return line


def _user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no login name in a bare container
        return "unknown"


def cmd_history(store: FilesystemStore, name: str, as_json: bool) -> int:
    changes = store.history(name)
    if as_json:
        for change in changes:
            print(change.model_dump_json())
        return 0
    if not changes:
        print(f"no alias changes recorded for {name}")
    for c in changes:
        before = "unset" if c.previous is None else str(c.previous)
        gate = ""
        if c.gate is not None and c.gate.current is not None:
            gate = f"\t{c.gate.metric} {c.gate.candidate} vs {c.gate.current}"
        forced = "\tFORCED" if c.forced else ""
        print(f"{c.time.isoformat()}\t{c.alias}: {before} -> {c.version}\t{c.actor}{gate}{forced}")
    return 0


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
            actor = args.actor or f"cli:{_user()}"
            print(asyncio.run(_promote(args.root, args.name, args.alias, args.version,
                                       force=args.force, tolerance=args.tolerance, actor=actor)))
            return 0
        if args.command == "history":
            return cmd_history(store, args.name, args.json)
        if args.command == "verify":
            return cmd_verify(store, args.name)
        if args.command == "gc":
            return cmd_gc(store, args.keep, args.dry_run)
        if args.command == "export":
            return cmd_export(store, args.names, args.out)
        if args.command == "import":
            return cmd_import(store, args.source, args.if_empty)
    except (InvalidName, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # `... | head` closed the pipe: not an error. Point stdout at /dev/null so the
        # interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (RegistryError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    raise AssertionError(f"unhandled command {args.command!r}")


if __name__ == "__main__":
    sys.exit(main())
