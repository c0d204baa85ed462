"""The house's imports run one way: algebra -> tracing/table -> saliency -> render -> monitor -> callback/CLI.

Read from the source with ``ast`` (what each module imports at its top level and inside functions),
so a new upward arrow or a cycle fails here, not in a user's import.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "rf_callback"

LEVEL = {
    "errors": 0,
    "report": 0,
    "algebra": 1,
    "tracing": 2,
    "sharding": 2,
    "table": 3,
    "probes": 3,
    "erf": 4,
    "cost": 4,
    "crops": 4,
    "selection": 4,
    "saliency": 5,
    "render": 3,
    "destinations": 7,
    "monitor": 8,
    "checkpoints": 9,
    "compare": 10,
    "export": 11,
    "loggers": 12,
    "callback": 13,
    "cli": 14,
    "__main__": 15,
    "__init__": 16,
}
"""Each core module may import only modules of a lower level."""

FRAMEWORK_FREE = {
    "errors",
    "algebra",
    "report",
    "tracing",
    "sharding",
    "table",
    "probes",
    "erf",
    "cost",
    "crops",
    "selection",
    "saliency",
    "render",
    "destinations",
    "monitor",
}
STANDARD_LIBRARY_ONLY = {"errors", "algebra", "report"}


def imports_of(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def modules() -> dict[str, set[str]]:
    """Imports by module; a subpackage (the tracer) counts as one module, its files as one."""
    found = {path.stem: imports_of(path) for path in PACKAGE.glob("*.py")}
    for package in (p for p in PACKAGE.iterdir() if (p / "__init__.py").exists() and p.name != "demos"):
        inside = set().union(*(imports_of(path) for path in package.glob("*.py")))
        found[package.name] = {i for i in inside if not i.startswith(f"rf_callback.{package.name}")}
    return found


def test_every_module_has_a_level():
    assert set(modules()) == set(LEVEL)


@pytest.mark.parametrize("name", sorted(LEVEL))
def test_imports_point_down(name):
    own = {imported.split(".")[1] for imported in modules()[name] if imported.startswith("rf_callback.")}
    assert "demos" not in own, f"{name} imports the demos"
    upward = [other for other in own if other in LEVEL and LEVEL[other] >= LEVEL[name] and other != name]
    assert not upward, f"rf_callback.{name} imports {upward}, which sit at its level or above"
    if name in FRAMEWORK_FREE:
        assert not any(i.split(".")[0] in ("lightning", "pytorch_lightning") for i in modules()[name])
    if name in STANDARD_LIBRARY_ONLY:
        third_party = {i.split(".")[0] for i in modules()[name]} - set(sys.stdlib_module_names) - {"rf_callback"}
        assert not third_party, f"{name} imports {third_party}"


def test_the_algebra_and_errors_import_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import rf_callback.algebra, rf_callback.errors, rf_callback.report\n"
        "from rf_callback.algebra import Field\n"
        "print(Field.of_input((5,)).window(0, 3, 2, 1, 3).rfs[0])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "AxisRF(size=3, jump=2, start=-1)"


def test_the_core_imports_without_lightning():
    code = (
        "import sys; sys.modules['lightning'] = None; sys.modules['pytorch_lightning'] = None\n"
        "import rf_callback.monitor, rf_callback.saliency, rf_callback.render, rf_callback.destinations"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
