"""The mode -> version rules (docs/contracts.md, "How the service resolves a request's model").

One place for them, used by the `Predictor` (per request, against the replica's serving view) and
by the batch job (once at submission, against the filesystem store), so a nightly job scores with
exactly the version the endpoint would answer with. Pure functions over what the caller has read:
no I/O, no numpy, no web framework.

- fast: the student at the request's selector; a teacher ensemble cannot answer fast.
- accurate: an ensemble named directly; else `NAME-ensemble` at the same alias; for a pinned
  student version (`NAME@3`), the ensemble that version records in its `teachers`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from service.core.errors import InvalidInput, ModelNotFound

ENSEMBLE_SUFFIX = "-ensemble"
Key = tuple[str, int]
Selector = str | int | None


class TeacherNamed(InvalidInput):
    """A teacher was named: teachers answer only as members of their ensemble."""


class FastOnEnsemble(InvalidInput):
    """mode fast on a teacher ensemble."""


class NoEnsemble(ModelNotFound):
    """mode accurate on a student whose `NAME-ensemble` does not exist."""


def mode_of(kind: str) -> Literal["fast", "accurate"]:
    """The request mode that serves exactly a version of this kind (ensembles answer accurate,
    students fast)."""
    return "accurate" if kind == "ensemble" else "fast"


def group_name(student: str) -> str:
    """The teacher ensemble's name for a student (`etth1-h96` -> `etth1-h96-ensemble`)."""
    return student + ENSEMBLE_SUFFIX


@dataclass(frozen=True, slots=True)
class Route:
    """Where a request goes: `name` at `selector`; with `by_teachers`, first resolve the student
    `name@selector`, then take the ensemble recorded in that version's teachers
    (`group_from_teachers`)."""

    name: str
    selector: Selector
    by_teachers: bool = False


def route(
    name: str,
    kind: str,
    mode: Literal["fast", "accurate"],
    selector: Selector,
    *,
    has_group: bool,
) -> Route:
    """The rule for a model of `kind` asked in `mode`. `has_group`: `NAME-ensemble` exists.

    Raises TeacherNamed, FastOnEnsemble (InvalidInput) or NoEnsemble (ModelNotFound); callers
    may word them for their own interface by type (the batch CLI names its flags)."""
    if kind == "teacher":
        raise TeacherNamed(
            f"{name} is a teacher: name the student (fast) or its ensemble (accurate)",
            field="model",
        )
    if kind == "ensemble":
        if mode == "fast":
            raise FastOnEnsemble(
                f"{name} is a teacher ensemble: use mode accurate or auto, or name the student",
                field="mode",
            )
        return Route(name, selector)
    if mode == "fast":
        return Route(name, selector)
    if isinstance(selector, int):
        return Route(name, selector, by_teachers=True)
    if not has_group:
        raise NoEnsemble(f"{name} has no teacher ensemble ({group_name(name)})", field="model")
    return Route(group_name(name), selector)


def ensemble_among(teachers: Iterable[Key], kind_of: Callable[[Key], str | None]) -> Key | None:
    """The first recorded teacher (in name order) that is itself an ensemble: a student
    distilled from a group records the group."""
    for ref in sorted(set(teachers)):
        if kind_of(ref) == "ensemble":
            return ref
    return None


def group_version_of(
    teachers: Iterable[Key], candidates: Iterable[tuple[int, Iterable[Key]]]
) -> int | None:
    """The newest group version whose members are exactly the recorded teachers (a student that
    records its members rather than the group). `candidates`: (group version, its members)."""
    refs = set(teachers)
    if not refs:
        return None
    for version, members in sorted(candidates, key=lambda c: c[0], reverse=True):
        if set(members) == refs:
            return version
    return None


def no_group(student: Key) -> ModelNotFound:
    return ModelNotFound(
        f"{student[0]}@{student[1]} records no teacher ensemble in this registry", field="model"
    )
