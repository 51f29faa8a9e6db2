"""The import layering: a module imports only from layers below its own, never from its own or one above.

Every import counts, also one inside a function (a lazy import is still a dependency). A top-level module of a
package, or a sub-package as a whole (``config``, ``sources``, ``stages``), is one unit; a new one must be given
a layer here. The library ``d2mtl`` never imports the KFP layer ``d2mtl_pipeline``, which sits on top of it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"d2mtl": REPO / "components" / "d2mtl", "d2mtl_pipeline": REPO / "pipeline" / "d2mtl_pipeline"}

# Bottom to top; the units of one layer are independent of each other.
LAYERS = {
    "d2mtl": (
        ("errors", "tasks", "lr", "configs"),  # the error type, the task registry, LR schedules; the YAML profiles
        ("store", "devices", "roles", "metrics", "plots"),  # storage, devices; functions and figures over the registry
        ("layout", "upload", "claims"),  # where outputs live; the claims
        ("contracts",),  # what the outputs hold: the Parquet tables, the model card
        ("config", "data", "losses", "distill", "distributed", "report"),  # configs; data, maths, the report
        ("models", "sources", "faces", "deploy"),  # the network; dataset adapters; detection + alignment; serving
        ("engine", "inference"),  # training; the deployable graph
        ("predict", "export"),  # what a trained model is used for
        ("serve", "stages"),
        ("cli",),  # the stage and user commands
    ),
    "d2mtl_pipeline": (
        ("steps", "placement"),  # the stages as KFP steps run them; where each runs
        ("components",),
        ("pipeline",),
        ("compile",),
        ("local", "submit"),
        ("cli",),  # the d2mtl command: d2mtl.cli's commands and run, compile, submit
    ),
}


def unit_of(package: str, path: Path) -> str:
    """The unit a source file belongs to: its top-level module, or its sub-package."""
    first = path.relative_to(PACKAGES[package]).parts[0]
    return first.removesuffix(".py")


def imported_modules(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Absolute names of what ``tree`` imports; ``from pkg import name`` also gives ``pkg.name``."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = module if is_package else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    parent = parent.rpartition(".")[0]
                base = f"{parent}.{base}".rstrip(".")
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def imports_by_unit(package: str) -> dict[str, set[tuple[str, str]]]:
    """Per unit of ``package``: (imported package, imported unit) for every first-party import it makes."""
    found: dict[str, set[tuple[str, str]]] = {}
    for path in sorted(PACKAGES[package].rglob("*.py")):
        relative = path.relative_to(PACKAGES[package]).with_suffix("")
        module = ".".join((package, *relative.parts)).removesuffix(".__init__")
        unit = unit_of(package, path)
        if unit == "__init__":
            continue
        targets = found.setdefault(unit, set())
        for name in imported_modules(ast.parse(path.read_text()), module, path.name == "__init__.py"):
            top, _, rest = name.partition(".")
            if top in PACKAGES:
                targets.add((top, rest.split(".")[0]))
    return found


def layer_index(package: str) -> dict[str, int]:
    return {unit: level for level, units in enumerate(LAYERS[package]) for unit in units}


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_every_unit_has_a_layer(package):
    placed = layer_index(package)
    assert sorted(set(imports_by_unit(package)) - set(placed)) == [], f"give these {package} modules a layer"
    assert sorted(set(placed) - set(imports_by_unit(package))) == [], f"these {package} modules no longer exist"


def test_the_library_never_imports_the_pipeline_layer():
    reaching_up = [
        f"d2mtl.{unit} imports d2mtl_pipeline{'.' + target if target else ''}"
        for unit, targets in sorted(imports_by_unit("d2mtl").items())
        for top, target in sorted(targets)
        if top == "d2mtl_pipeline"
    ]
    assert reaching_up == []


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_modules_import_only_lower_layers(package):
    level = layer_index(package)
    violations = [
        f"{package}.{unit} (layer {level[unit]}) imports {package}.{target} (layer {level[target]})"
        for unit, targets in sorted(imports_by_unit(package).items())
        for top, target in sorted(targets)
        if top == package and target and target != unit and target in level and level[target] >= level[unit]
    ]
    assert violations == []


def test_no_module_imports_a_private_name_of_another():
    private = [
        f"{path.relative_to(REPO)}:{node.lineno} imports {node.module}.{alias.name}"
        for package, root in PACKAGES.items()
        for path in sorted(root.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] in PACKAGES
        for alias in node.names
        if alias.name.startswith("_") and node.module.split(".")[:2] != [package, unit_of(package, path)]
    ]
    assert private == []
