"""The package's plan, held to: each sub-package imports only what its __init__.py says it may, no module
imports another in a circle, and the core loads no option code.

Imports are read from the source (every import statement, those inside functions too), so a lazy
import counts like any other.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

PACKAGE = ROOT / "bitfit"
LAYERS = ("core", "data", "model", "store", "parallel", "training")  # each may import only those before it
SHARED = ("bitfit.errors", "bitfit.config")  # beside the layers, for every one of them


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path) -> set[str]:
    """Every module path.py imports, as written (bitfit.x.y, torch, ...)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.add(node.module)
            # "from bitfit.data import templates" imports the module bitfit.data.templates
            found |= {f"{node.module}.{alias.name}" for alias in node.names
                      if f"{node.module}.{alias.name}" in modules()}
    return found


def contract(package: str) -> tuple[set[str], set[str]]:
    """(the bitfit packages and modules, the other top-level packages) that the package's
    __init__.py says it may import, in its "May import:" paragraph."""
    docstring = ast.get_docstring(ast.parse((PACKAGE / package / "__init__.py").read_text()))
    assert docstring and "May import:" in docstring, f"bitfit/{package}/__init__.py states no contract"
    words = docstring.split("May import:")[1].replace("\n", " ").replace(";", ",").split(",")
    allowed = {word.strip() for word in words if word.strip()}
    internal = {word for word in allowed if word.startswith("bitfit.")}
    return internal, allowed - internal


def owner(module: str) -> str:
    """bitfit.core.step -> bitfit.core; bitfit.errors -> bitfit.errors; bitfit.compare -> bitfit.compare."""
    parts = module.split(".")
    return ".".join(parts[:2])


def test_each_package_states_the_contract_the_layers_give_it():
    for index, layer in enumerate(LAYERS):
        internal, _ = contract(layer)
        assert internal == {*SHARED, *(f"bitfit.{below}" for below in LAYERS[:index])} - (
            {"bitfit.config"} if layer == "core" else set()), layer


@pytest.mark.parametrize("layer", LAYERS)
def test_a_package_imports_only_what_its_contract_allows(layer):
    internal, external = contract(layer)
    standard = set(sys.stdlib_module_names) if "the standard library" in external else set()
    broken = []
    for name, path in modules().items():
        if owner(name) != f"bitfit.{layer}":
            continue
        for imported in imports(path):
            top = imported.split(".")[0]
            if top == "bitfit":
                if owner(imported) not in internal | {f"bitfit.{layer}", "bitfit"}:
                    broken.append(f"{name} imports {imported}")
            elif top not in standard | external:
                broken.append(f"{name} imports {imported} (not among: {', '.join(sorted(external))})")
    assert broken == []


def test_no_package_imports_a_command():
    """The commands (python -m bitfit.NAME, and cli) sit on top: nothing in a layer reaches up to them."""
    layers = {f"bitfit.{layer}" for layer in LAYERS}
    shared = {*SHARED, "bitfit"}
    commands = {owner(name) for name in modules()} - layers - shared
    assert {"bitfit.walkthrough", "bitfit.compare", "bitfit.export", "bitfit.fetch", "bitfit.bench",
            "bitfit.experiment", "bitfit.cli"} <= commands
    reaching_up = [f"{name} imports {imported}" for name, path in modules().items()
                   if owner(name) in layers | shared for imported in imports(path) if owner(imported) in commands]
    assert reaching_up == []


def test_no_module_imports_itself_through_others():
    graph = {name: {imported for imported in imports(path) if imported in modules() and imported != name}
             for name, path in modules().items()}
    circles = []

    def visit(name, trail):
        if name in trail:
            circles.append(" -> ".join(trail[trail.index(name):] + [name]))
            return
        if name in done:
            return
        for imported in sorted(graph[name]):
            visit(imported, trail + [name])
        done.add(name)

    done = set()
    for name in sorted(graph):
        visit(name, [])
    assert circles == []


OPTION_MODULES = ("bitfit.parallel", "bitfit.model.quantize", "bitfit.model.gguf", "bitfit.model.known",
                  "bitfit.store", "bitfit.training", "bitfit.cli", "bitfit.compare", "bitfit.export",
                  "bitfit.fetch", "bitfit.bench", "bitfit.experiment", "torchao", "transformers")


@pytest.mark.parametrize("statement", ["import bitfit; bitfit.train_step; bitfit.train_loop",
                                       "import bitfit.core.step, bitfit.core.loop"])
def test_the_core_loads_no_option_code(statement):
    """A learner reading train_step is not one import away from FSDP, 4-bit weights, GGUF, the run
    folder, training checkpoints or the commands (nor torchao, nor transformers)."""
    probe = f"{statement}; import sys; print('\\n'.join(sorted(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.split()
    assert [name for name in loaded if name.startswith(OPTION_MODULES)] == []
    assert sorted(name for name in loaded if name.startswith("bitfit")) == [
        "bitfit", "bitfit.core", "bitfit.core.examples", "bitfit.core.loop", "bitfit.core.loss", "bitfit.core.step",
        "bitfit.core.trainable", "bitfit.core.world", "bitfit.errors"]
