"""The package's import graph: layers, lowest first, and no import upward or sideways.

Lazy imports (inside functions) and ``TYPE_CHECKING`` ones count too: a cycle
through a lazy import is still a cycle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
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


#: The framework integrations: each imports only its framework and the public
#: ``anisota_agent``; nothing in the package imports them.
INTEGRATIONS = {"pygame", "qt", "pyglet"}


def public(module: str | None, names: list[str]) -> bool:
    """Whether ``from module import names`` takes only public names."""
    if module == "anisota_agent":
        return not set(names) - set(anisota_agent.__all__)
    if module is not None and module.startswith("anisota_agent.integrations."):
        name = module.rsplit(".", 1)[1]
        return name in INTEGRATIONS and set(names) <= exported(PACKAGE / "integrations" / name)
    return False


def exported(stem: Path) -> set[str]:
    """The names in the ``__all__`` of the module ``<stem>.py``, read without importing it."""
    tree = ast.parse(stem.with_suffix(".py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(target, ast.Name) and target.id == "__all__" for target in node.targets
        ):
            return set(ast.literal_eval(node.value))
    return set()


def test_examples_use_only_public_names() -> None:
    """What the examples import is what ``anisota_agent`` and its integrations export."""
    private = []
    for path in sorted((PACKAGE.parent / "examples").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("anisota_agent"):
                names = [alias.name for alias in node.names]
                if not public(node.module, names):
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


def test_the_integrations_use_only_the_public_agent_and_nothing_imports_them() -> None:
    folder = PACKAGE / "integrations"
    assert {path.stem for path in folder.glob("*.py")} == INTEGRATIONS | {"__init__"}
    wrong = []
    for path in sorted(folder.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                module = node.module or ""
                if node.level > 0 or (module.startswith("anisota_agent.")):
                    wrong.append(f"integrations.{path.stem} imports {module}")
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
                wrong += [name for name in names if name.startswith("anisota_agent")]
    for path in sorted(PACKAGE.glob("*.py")):
        if "integrations" in imported_modules(path):
            wrong.append(f"{path.stem} imports the integrations")
    assert wrong == []


def test_no_framework_is_imported_unless_asked_for() -> None:
    script = (
        "import sys, anisota_agent, anisota_agent.integrations\n"
        "print(sorted(m for m in ('pygame', 'PySide6', 'pyglet', 'anisota_agent.integrations.qt',"
        " 'anisota_agent.integrations.pygame', 'anisota_agent.integrations.pyglet')"
        " if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]"
