"""Security checks: admin tokens, path traversal over HTTP, what the service imports, and the image.

Static checks need no service; `http_probes` runs against a `ServiceProcess` on a registry that
also holds a symlink escaping its root.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.reliability.harness import REPO, TOKEN

NAME = "etth1-h96"
PACKAGES = ("service", "models_registry")
# Never in the serving process: the training stack, and every library that unpickles.
FORBIDDEN_MODULES = ("torch", "training", "joblib", "dill", "cloudpickle", "safetensors",
                     "sklearn", "shelve")
# Never imported by the project's serving code itself (numpy imports pickle for np.load; the
# service never calls that).
FORBIDDEN_IMPORTS = ("pickle", "_pickle", "cPickle", "torch", "training", "joblib", "dill",
                     "cloudpickle", "marshal", "shelve")
SOURCE_PATTERN = re.compile(r"pickle|torch\.load|joblib|allow_pickle|np\.load\(|marshal\.load")


# -- static ----------------------------------------------------------------------------------------


def service_modules() -> dict[str, str | None]:
    """Every module loaded by importing the app, with its file, in a fresh interpreter."""
    code = ("import json, sys; import service.app, models_registry.registry; "
            "print(json.dumps({n: getattr(m, '__file__', None) for n, m in "
            "sorted(sys.modules.items())}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True, timeout=120)
    modules: dict[str, str | None] = json.loads(out.stdout.strip().splitlines()[-1])
    return modules


def forbidden_loaded(modules: dict[str, str | None]) -> list[str]:
    return sorted(n for n in modules if n.split(".")[0] in FORBIDDEN_MODULES)


def _imports(path: Path) -> Iterator[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module


def forbidden_project_imports(modules: dict[str, str | None]) -> list[str]:
    """The project's own modules in the import graph that import a forbidden module."""
    found = []
    for name, file in modules.items():
        if name.split(".")[0] not in PACKAGES or not file:
            continue
        for line, module in _imports(Path(file)):
            if module.split(".")[0] in FORBIDDEN_IMPORTS:
                found.append(f"{name}:{line} imports {module}")
    return found


def source_hits() -> list[str]:
    """grep of service/ and models_registry/ for pickle, torch.load, joblib, np.load(...)."""
    hits = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            for i, line in enumerate(path.read_text().splitlines(), 1):
                if SOURCE_PATTERN.search(line):
                    hits.append(f"{path.relative_to(REPO)}:{i}: {line.strip()}")
    return hits


@dataclass(frozen=True)
class Stage:
    base: str
    user: str | None


def final_stage(dockerfile: Path) -> Stage:
    """The last FROM's base image and the last USER after it (continuations joined)."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    base, user = "", None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        if word.upper() == "FROM":
            base, user = rest.split()[0], None
        elif word.upper() == "USER":
            user = rest.strip()
    return Stage(base, user)


def non_root(user: str | None) -> bool:
    if user is None:
        return False
    name = user.split(":")[0]
    return name not in ("root", "0", "")


def static_problems() -> list[str]:
    problems = []
    modules = service_modules()
    if bad := forbidden_loaded(modules):
        problems.append(f"importing the service loads {bad}")
    if bad := forbidden_project_imports(modules):
        problems.append(f"serving modules import forbidden modules: {bad}")
    if bad := source_hits():
        problems.append(f"sources mention pickle/torch.load/joblib: {bad}")
    for name in ("service.Dockerfile", "service-gpu.Dockerfile"):
        path = REPO / "docker" / name
        if path.exists():
            stage = final_stage(path)
            if not non_root(stage.user):
                problems.append(f"{name}: the runtime stage runs as {stage.user or 'root'}")
    return problems


# -- over HTTP -------------------------------------------------------------------------------------


@dataclass
class Probe:
    name: str
    status: int
    expected: str
    ok: bool
    detail: str = ""


def escaping_symlink(root: Path, outside: Path) -> str:
    """A model directory outside the root (a full copy of a real version), linked into the root
    under a valid model name: the service must neither list nor load it."""
    target = outside / "evil-model"
    shutil.copytree(root / NAME, target, symlinks=False,
                    ignore=shutil.ignore_patterns(".lock", "aliases.json"))
    for manifest in target.glob("*/manifest.json"):
        data = json.loads(manifest.read_text())
        data["name"] = "evil-model"
        manifest.write_text(json.dumps(data))
    (root / "evil-model").symlink_to(target, target_is_directory=True)
    return "evil-model"


def http_probes(url: str, root: Path, outside: Path, *, linked: str | None = None
                ) -> tuple[list[Probe], list[str]]:
    """Admin token checks and traversal attempts; returns the probes and what went wrong."""
    probes: list[Probe] = []
    aliases_before = (root / NAME / "aliases.json").read_bytes()
    entries_before = sorted(p.name for p in outside.iterdir())
    with httpx.Client(base_url=url, timeout=15) as c:

        def probe(name: str, r: httpx.Response, expected: set[int], *,
                  field: str | None = None) -> None:
            ok = r.status_code in expected
            detail = r.text[:160]
            if ok and r.status_code >= 400:
                try:
                    error = r.json()["error"]
                    ok = bool(error["code"]) and (field is None or error.get("field") == field)
                except (ValueError, KeyError, TypeError):
                    ok = False
            probes.append(Probe(name, r.status_code, "/".join(map(str, sorted(expected))), ok,
                                detail))

        put = f"/v1/models/{NAME}/aliases/production"
        body = {"version": 1}
        r = c.put(put, json=body)
        probe("admin: no token", r, {401}, field="Authorization")
        if r.headers.get("www-authenticate", "").lower() != "bearer":
            probes.append(Probe("admin: 401 names the scheme", r.status_code, "Bearer", False,
                                str(r.headers.get("www-authenticate"))))
        for label, header, expected in (
            ("wrong token", f"Bearer {'x' * len(TOKEN)}", {403}),
            ("token prefix", f"Bearer {TOKEN[:-1]}", {403}),
            ("token + suffix", f"Bearer {TOKEN}x", {403}),
            ("token, other case", f"Bearer {TOKEN.upper()}", {403}),
            ("basic scheme", f"Basic {TOKEN}", {401}),
            ("empty bearer", "Bearer ", {401}),
            ("scheme only", "Bearer", {401}),
            ("token without scheme", TOKEN, {401}),
            ("NUL in token", f"Bearer {TOKEN}\x00", {400, 401, 403}),
        ):
            try:
                r = c.put(put, json=body, headers={"Authorization": header})
            except (httpx.LocalProtocolError, ValueError):
                continue  # the client refuses to send it: nothing reached the service
            probe(f"admin: {label}", r, expected)
        r = c.put(put, params={"token": TOKEN, "access_token": TOKEN}, json=body)
        probe("admin: token in the query string", r, {401})
        r = c.put(put, json=body, headers={"Authorization": f"bearer {TOKEN}"})
        probe("admin: right token (control)", r, {200})
        # Traversal in the names the HTTP API takes.
        auth = {"Authorization": f"Bearer {TOKEN}"}
        for raw in ("..", "%2e%2e", "..%2f..%2fetc%2fpasswd", "%2e%2e%2f%2e%2e%2fetc",
                    f"{NAME}%2f..%2f..%2f..%2ftmp", "..%5c..%5cwindows", "a%00b", "%2fetc",
                    ".hidden", "~root", "-rf", "A" * 300, "evil%0a", "etc%2fpasswd"):
            probe(f"GET /v1/models/{raw[:40]}", c.get(f"/v1/models/{raw}"), {404, 422})
            probe(f"PUT /v1/models/{raw[:40]}/aliases/x",
                  c.put(f"/v1/models/{raw}/aliases/x", json=body, headers=auth),
                  {404, 405, 409, 422})
            probe(f"PUT alias {raw[:40]}",
                  c.put(f"/v1/models/{NAME}/aliases/{raw}", json=body, headers=auth),
                  {404, 405, 409, 422})
        for model in ("../x", "..\\x", "/etc/passwd", f"{NAME}/../../x", f"{NAME}@../../x",
                      f"{NAME}@..", f"{NAME}@1/../2", "etc/passwd", "../../" + NAME,
                      f"./{NAME}", f"{NAME}\x00", f"{NAME}@production\n"):
            r = c.post("/v1/forecast", json={"model": model, "series": [
                {"id": 1, "values": [float(i) for i in range(32)]}]})
            probe(f"forecast model {model!r}", r, {404, 422}, field="model")
        if linked is not None:
            listed = [m["name"] for m in c.get("/v1/models").json()["models"]]
            probes.append(Probe("symlinked model not listed", 200, "absent",
                                linked not in listed, str(listed)))
            probe("symlinked model: GET", c.get(f"/v1/models/{linked}"), {404, 422})
            r = c.post("/v1/forecast", json={"model": linked, "series": [
                {"id": 1, "values": [float(i) for i in range(32)]}]})
            probe("symlinked model: forecast", r, {404, 422}, field="model")
            probe("symlinked model: promote", c.put(f"/v1/models/{linked}/aliases/production",
                                                    json=body, headers=auth), {404, 409, 422})
    problems = [f"{p.name}: {p.status} (expected {p.expected}) {p.detail}" for p in probes
                if not p.ok]
    if (root / NAME / "aliases.json").read_bytes() != aliases_before:
        problems.append("the alias map changed during the security probes")
    if sorted(p.name for p in outside.iterdir()) != entries_before:
        problems.append("a file or directory appeared outside the registry root")
    return probes, problems


def summary(probes: list[Probe]) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for p in probes:
        counts[str(p.status)] = counts.get(str(p.status), 0) + 1
    # Each probe's expected answer is its expected status (a refusal here is the answer).
    return {"requests": len(probes), "answered": sum(p.ok for p in probes), "refused_503": 0,
            "refused_connect": 0, "failed": sum(not p.ok for p in probes),
            "status_codes": dict(sorted(counts.items()))}
