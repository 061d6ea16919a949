"""The package's import graph: layers, lowest first, and no import upward or sideways.

Lazy imports (inside functions) and ``TYPE_CHECKING`` ones count too: a cycle
through a lazy import is still a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import anisota_agent

PACKAGE = Path(anisota_agent.__file__).parent

#: Each module may import only modules of the layers before its own.
LAYERS = [
    ["_files", "_version", "syntax"],
    ["checks", "status", "timing", "tokens"],
    ["clock", "network"],
    ["lexicon"],
    ["records"],
    ["guard", "migrations"],
    ["store"],
    ["data", "recovery", "xrpc"],
    ["auth"],
    ["sync"],
    ["settings"],
    ["remote", "sessions"],
    ["uplink"],
    ["recorder"],
    ["agent"],
    ["demo"],
    ["cli"],
    ["__init__", "__main__"],
]


def imported_modules(path: Path) -> set[str]:
    """The package's modules that ``path`` imports, anywhere in it."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("anisota_agent"):
            rest = (node.module or "").removeprefix("anisota_agent").lstrip(".")
            found.add(rest.split(".")[0] if rest else "__init__")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("anisota_agent."):
                    found.add(alias.name.split(".")[1])
    return found


def test_every_module_has_a_layer() -> None:
    modules = {path.stem for path in PACKAGE.glob("*.py")}
    placed = {name for layer in LAYERS for name in layer}
    assert modules <= placed, f"place these in LAYERS: {sorted(modules - placed)}"


def test_no_module_imports_its_own_layer_or_a_higher_one() -> None:
    rank = {name: index for index, layer in enumerate(LAYERS) for name in layer}
    wrong = []
    for path in sorted(PACKAGE.glob("*.py")):
        for target in sorted(imported_modules(path)):
            if target in rank and rank[target] >= rank[path.stem]:
                wrong.append(f"{path.stem} imports {target}")
    assert wrong == []


def test_examples_use_only_public_names() -> None:
    """What the examples import is what ``anisota_agent`` exports."""
    private = []
    for path in sorted((PACKAGE.parent / "examples").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("anisota_agent"):
                names = [alias.name for alias in node.names]
                if node.module != "anisota_agent" or set(names) - set(anisota_agent.__all__):
                    private.append(f"{path.name}: from {node.module} import {', '.join(names)}")
    assert private == []


def test_every_module_says_what_it_exports() -> None:
    missing = []
    for path in sorted(PACKAGE.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        targets = [
            target.id
            for node in tree.body
            if isinstance(node, (ast.Assign, ast.AnnAssign))
            for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
            if isinstance(target, ast.Name)
        ]
        if "__all__" not in targets:
            missing.append(path.name)
    assert missing == []
