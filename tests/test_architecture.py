"""The one rule of the house (docs/architecture.md): imports point down. Drawn from the source itself
(every ``import`` and ``from ... import`` of a growlm module, at any depth of a function; only those under
``if TYPE_CHECKING:``, which never run, are left out), each module's
floor must be at or below the importer's, and no import circle may exist, so no import is ever made lazy
to dodge one. A new module gets a floor here (an unlisted module fails the test).
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "growlm"

# From the ground up. A package name covers its submodules unless one is listed itself.
FLOORS: list[list[str]] = [
    ["growlm.errors", "growlm.hashing", "growlm.registry", "growlm.distributed", "growlm.files"],  # primitives
    ["growlm.corpus", "growlm.model", "growlm.lora", "growlm.memory", "growlm.rules", "growlm.mixture"],  # parts of the model
    ["growlm.tokenizer", "growlm.substrate", "growlm.trunk_cache", "growlm.audit"],  # the docking port
    ["growlm.store"],  # formats: model, mixture and run dirs
    ["growlm.stages", "growlm.plan", "growlm.growth", "growlm.loading", "growlm.data", "growlm.prepare", "growlm.shards"],  # the method's data
    ["growlm.training"],  # the loop
    ["growlm.compose"],  # mixtures (their router and head tuning train with the loop)
    ["growlm.evaluation", "growlm.verification", "growlm.inspection", "growlm.interop", "growlm.model_card",
     "growlm.compute", "growlm.report"],  # reading what was made
    ["growlm.api", "growlm.lm_eval_model"],  # the library's entry points
    ["growlm", "growlm.cli", "growlm.__main__", "growlm.demo"],  # applications
]


def modules() -> dict[str, Path]:
    out = {}
    for f in SRC.rglob("*.py"):
        parts = f.relative_to(SRC.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def floor_of(name: str) -> int:
    """The floor of the most specific listed name covering module ``name``."""
    best = None
    for i, names in enumerate(FLOORS):
        for listed in names:
            if (name == listed or name.startswith(listed + ".")) and (best is None or len(listed) > len(best[1])):
                best = (i, listed)
    assert best is not None, f"{name} has no floor in tests/test_architecture.py FLOORS: give it one"
    return best[0]


def imports(name: str, f: Path, known: dict[str, Path]) -> set[str]:
    """The growlm modules ``name`` imports (a package import counts as its ``__init__``, which Python runs)."""
    out = set()
    tree = ast.parse(f.read_text(encoding="utf-8"))
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and _is_type_checking(block.test)
                   for stmt in block.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in typing_only:  # annotations only: never run, so never a circle
            continue
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                       for a in node.names]
        for t in targets:
            if not t.startswith("growlm"):
                continue
            parts = t.split(".")
            for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ first
                prefix = ".".join(parts[:i])
                if prefix in known and prefix != name and not name.startswith(prefix + "."):
                    out.add(prefix)
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, f, known) for name, f in known.items()}


def test_every_import_points_down():
    wrong = sorted(f"{a} (floor {floor_of(a)}) imports {b} (floor {floor_of(b)})"
                   for a, targets in graph().items() for b in targets if floor_of(b) > floor_of(a))
    assert not wrong, "imports that run back up:\n" + "\n".join(wrong)


def test_no_import_circle():
    g = graph()
    circles, state = [], {}

    def visit(v: str, path: list[str]) -> None:
        state[v] = "open"
        for w in sorted(g[v]):
            if state.get(w) == "open":
                circles.append(" -> ".join(path[path.index(w):] + [w]))
            elif w not in state:
                visit(w, [*path, w])
        state[v] = "done"

    for v in sorted(g):
        if v not in state:
            visit(v, [v])
    assert not circles, "import circles:\n" + "\n".join(circles)
