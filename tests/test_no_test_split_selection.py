"""Nothing in ``bench/`` or ``training/`` selects, early-stops or tunes on the test split.

A static check over the source (``ast``): within each function (and at module level), values
derived from the test split are followed through assignments and loops, starting from
``x["test"]`` / ``x["test_..."]`` subscripts, ``.test`` / ``.test_...`` attributes and names
``test`` / ``test_...``. It is a violation when such a value

* reaches a choosing call: the builtins ``min``, ``max``, ``sorted``, or ``argmin``,
  ``argmax``, ``argsort``, ``idxmin``, ``nsmallest``, ``topk``, ... (as an argument, inside a
  ``key=`` lambda, or as the receiver of a method such as ``losses.argmin()``; ``err.max()`` and
  ``np.max(err)`` reduce one array and are not choices);
* is ordered (``<``, ``<=``, ``>``, ``>=``) in the condition of an ``if``, ``while``, conditional
  expression or comprehension filter (how early stopping and "keep the better one" are written);
* is stored in a name or attribute that holds a choice (``best``, ``stop``, ``patience``,
  ``chosen``, ``winner``).

Test figures may be computed, stored and printed: that is reporting. A line that compares test
figures only to *report* the comparison (a verdict column in a table) says so with the pragma
``# evidence: report-only``, which this check accepts and a reviewer can see.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCANNED = ("bench", "training")
PRAGMA = "# evidence: report-only"

CHOOSERS = {
    "min",
    "max",
    "sorted",
    "sort",
    "argmin",
    "argmax",
    "nanargmin",
    "nanargmax",
    "argsort",
    "idxmin",
    "idxmax",
    "nsmallest",
    "nlargest",
    "topk",
}
REDUCTIONS = {"min", "max"}  # as methods or numpy/torch functions
CHOICE_NAME = re.compile(r"best|stop|patience|chosen|winner|select", re.IGNORECASE)
ORDERING = (ast.Lt, ast.LtE, ast.Gt, ast.GtE)


def _is_test_key(value: object) -> bool:
    return isinstance(value, str) and (value == "test" or value.startswith("test_"))


@dataclass(frozen=True)
class Violation:
    path: str
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.what}"


class _Scope:
    """Taint tracking over one function body (nested functions get their own scope)."""

    def __init__(self, path: str, lines: list[str]) -> None:
        self.path, self.lines = path, lines
        self.tainted: set[str] = set()
        self.violations: list[Violation] = []

    # -- what is derived from the test split
    def is_source(self, node: ast.AST) -> bool:
        if isinstance(node, ast.Subscript):
            key = node.slice
            if isinstance(key, ast.Constant) and _is_test_key(key.value):
                return True
        if isinstance(node, ast.Attribute) and _is_test_key(node.attr):
            return True
        return isinstance(node, ast.Name) and (_is_test_key(node.id) or node.id in self.tainted)

    def tainted_expr(self, node: ast.AST | None) -> bool:
        return node is not None and any(self.is_source(n) for n in ast.walk(node))

    # -- bookkeeping
    def flag(self, node: ast.AST, what: str) -> None:
        line = getattr(node, "lineno", 0)
        if PRAGMA in (self.lines[line - 1] if 0 < line <= len(self.lines) else ""):
            return
        self.violations.append(Violation(self.path, line, what))

    def bind(self, target: ast.AST, tainted: bool, node: ast.AST) -> None:
        """``x = v`` / ``x[i] = v`` taint ``x``; ``obj.attr = v`` taints nothing (``obj`` holds
        more than ``v``) but is checked like a name for a stored choice."""
        if not tainted:
            return
        if isinstance(target, ast.Tuple | ast.List):
            for element in target.elts:
                self.bind(element, tainted, node)
            return
        if isinstance(target, ast.Starred):
            self.bind(target.value, tainted, node)
            return
        base = target.value if isinstance(target, ast.Subscript) else target
        if isinstance(base, ast.Name):
            self.tainted.add(base.id)
            name = base.id
        elif isinstance(base, ast.Attribute):
            name = base.attr
        else:
            return
        if CHOICE_NAME.search(name):
            self.flag(node, f"a test-derived value is stored in {name!r}")

    # -- walking
    def run(self, body: list[ast.stmt]) -> None:
        for _ in range(2):  # twice, so that taint flows around loops
            self.violations = []
            for stmt in body:
                self.stmt(stmt)

    def stmt(self, node: ast.stmt) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            return  # scanned as a scope of its own
        if isinstance(node, ast.Assign):
            for t in node.targets:
                self.bind(t, self.tainted_expr(node.value), node)
        elif isinstance(node, ast.AugAssign | ast.AnnAssign):
            self.bind(node.target, self.tainted_expr(node.value), node)
        elif isinstance(node, ast.For | ast.AsyncFor):
            self.bind(node.target, self.tainted_expr(node.iter), node)
        elif isinstance(node, ast.With | ast.AsyncWith):
            for item in node.items:
                if item.optional_vars is not None:
                    self.bind(item.optional_vars, self.tainted_expr(item.context_expr), node)
        if isinstance(node, ast.If | ast.While):
            self.condition(node.test)
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.stmt):
                self.stmt(child)
            elif isinstance(child, ast.expr):
                self.expr(child)

    def condition(self, test: ast.expr) -> None:
        for n in ast.walk(test):
            if isinstance(n, ast.Compare) and any(isinstance(op, ORDERING) for op in n.ops):
                if self.tainted_expr(n):
                    self.flag(n, "a condition orders test-split figures")

    def expr(self, node: ast.expr) -> None:
        for n in ast.walk(node):
            if isinstance(n, ast.NamedExpr):
                self.bind(n.target, self.tainted_expr(n.value), n)
            elif isinstance(n, ast.comprehension):
                self.bind(n.target, self.tainted_expr(n.iter), n)
                for cond in n.ifs:
                    self.condition(cond)
            elif isinstance(n, ast.IfExp):
                self.condition(n.test)
            elif isinstance(n, ast.Call):
                func = n.func
                name = (
                    func.id
                    if isinstance(func, ast.Name)
                    else func.attr
                    if isinstance(func, ast.Attribute)
                    else ""
                )
                receiver = func.value if isinstance(func, ast.Attribute) else None
                if name not in CHOOSERS or (receiver is not None and name in REDUCTIONS):
                    continue  # ``err.max()`` / ``np.max(err)`` reduce one array, choose nothing
                parts: list[ast.AST] = [*n.args, *(k.value for k in n.keywords)]
                on_data = receiver is not None and not _is_module(receiver)
                if any(self.tainted_expr(p) for p in parts) or (
                    on_data and self.tainted_expr(receiver)
                ):
                    self.flag(n, f"{name}() chooses among test-split figures")


def _is_module(node: ast.AST | None) -> bool:
    """``np.argmin(...)`` / ``torch.argmin(...)``: the receiver is a module, not the data."""
    return isinstance(node, ast.Name) and node.id in {"np", "numpy", "torch", "math", "heapq"}


def check_source(source: str, path: str = "<snippet>") -> list[Violation]:
    tree = ast.parse(source)
    lines = source.splitlines()
    found: list[Violation] = []
    scopes: list[list[ast.stmt]] = [tree.body]
    scopes += [
        n.body
        for n in ast.walk(tree)
        if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
    ]
    for body in scopes:
        scope = _Scope(path, lines)
        scope.run(body)
        found += scope.violations
    return sorted(set(found), key=lambda v: (v.path, v.line, v.what))


def scanned_files() -> Iterator[Path]:
    for top in SCANNED:
        yield from sorted((REPO / top).rglob("*.py"))


def test_bench_and_training_never_choose_on_the_test_split() -> None:
    files = list(scanned_files())
    assert len(files) > 10  # the scan sees the packages
    found = [v for f in files for v in check_source(f.read_text(), str(f.relative_to(REPO)))]
    assert not found, "choices made on the test split:\n" + "\n".join(map(str, found))


# --- the check itself catches what it is meant to catch --------------------------------------

VIOLATING = {
    "argmin over test scores": """
def pick(models, splits):
    scores = [evaluate(m, splits["test"]) for m in models]
    return models[int(np.argmin(scores))]
""",
    "min with a key on test metrics": """
def pick(runs):
    return min(runs, key=lambda r: r.test["mse"])
""",
    "sorted by a test figure": """
def rank(records):
    return sorted(records, key=lambda r: r["test_mse"])[0]
""",
    "early stopping on the test loss": """
def train(model, data, epochs):
    best_loss, wait = float("inf"), 0
    for epoch in range(epochs):
        step(model)
        loss = evaluate(model, data.splits["test"])["mse"]
        if loss < best_loss:
            best_loss, wait = loss, 0
        else:
            wait += 1
""",
    "keeping the better candidate by test MSE": """
def sweep(grid):
    kept = None
    for alpha in grid:
        result = run(alpha)
        test_mse = result.test["mse"]
        kept = result if kept is None or test_mse < kept.test["mse"] else kept
    return kept
""",
    "a method call on test losses": """
def pick(losses_by_split):
    test_losses = losses_by_split["test"]
    return test_losses.argmin()
""",
    "the best epoch taken from test": """
def summary(history):
    best_epoch = history["test"].index(min(history["test"]))
    return best_epoch
""",
}

CLEAN = {
    "choosing on validation, reporting test": """
def pick(rows):
    winner = min(rows, key=lambda r: r["val_mse"])
    print(winner["test_mse"])
    return winner
""",
    "early stopping on validation": """
def train(model, data, epochs):
    best = float("inf")
    for epoch in range(epochs):
        val = evaluate(model, data.splits["val"])["mse"]
        if val < best:
            best = val
    test = evaluate(model, data.splits["test"])
    return {"val": best, "test": test}
""",
    "a verdict that only reports": """
def verdict(r, base):
    return "helped" if r["test_mse"] < base["test_mse"] else "did not"  # evidence: report-only
""",
}


@pytest.mark.parametrize("name", sorted(VIOLATING))
def test_the_check_catches_a_choice_on_test(name: str) -> None:
    assert check_source(VIOLATING[name]), f"not caught: {name}"


@pytest.mark.parametrize("name", sorted(CLEAN))
def test_the_check_accepts_validation_choices_and_test_reports(name: str) -> None:
    assert check_source(CLEAN[name]) == []
