"""The package's layers (docs/architecture.md): core <- integration <- applications, an acyclic import graph, every
module importable in any order, no application imported by the library, no edits of the import path anywhere."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "arpg_hf"

CORE, INTEGRATION, APPLICATION = 0, 1, 2
LAYER_NAMES = {CORE: "core", INTEGRATION: "integration", APPLICATION: "application"}
# Every module of the package and its layer; a new module must be placed here (and in docs/architecture.md).
LAYERS = {
    "arpg_hf": CORE,  # the lazy facade: imports only auto_classes and lazy_exports at once
    "validation": CORE,
    "atomic_io": CORE,
    "random_utils": CORE,
    "lazy_exports": CORE,
    "optional_dependencies": CORE,
    "saved_folders": CORE,
    "auto_classes": CORE,
    "configuration_arpg": CORE,
    "rotary_2d": CORE,
    "cache_arpg": CORE,
    "fused_projections": CORE,
    "cpu_gemm": CORE,
    "quantization": CORE,
    "modeling_arpg": CORE,
    "compiled_decoding": CORE,
    "memory": CORE,
    "scheduling_arpg": CORE,
    "llamagen_vq": CORE,
    "vq_model": CORE,
    "labels": CORE,
    "pipeline_arpg": CORE,
    "editing_utils": CORE,
    "pipeline_arpg_inpaint": CORE,
    "control_adapter": CORE,
    "control_conditions": CORE,
    "pipeline_arpg_control": CORE,
    "editing_recipes": CORE,
    "conversion": INTEGRATION,
    "model_card": INTEGRATION,
    "bundled": INTEGRATION,
    "user_errors": INTEGRATION,
    "pipeline_loading": INTEGRATION,
    "token_dataset": INTEGRATION,
    "training_utils": INTEGRATION,
    "training_checkpoints": INTEGRATION,
    "digits": INTEGRATION,
    "vq_training": INTEGRATION,
    "metrics": INTEGRATION,
    "cli": APPLICATION,
    "__main__": APPLICATION,
}
# Top-level names of the repository's applications, which the library never imports.
APPLICATION_ROOTS = ("pipelines", "benchmarks", "train", "app", "space", "conversion.convert_arpg_to_hf")
EXCLUDED_DIRS = {".git", "build", "dist", "site-packages", "node_modules", "__pycache__"}


def module_files() -> dict[str, Path]:
    """Dotted name -> file of every Python module of the package (the bundled folder's import shims excluded: they are
    files of a saved pipeline, written by `saved_folders`)."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        if "bundled" in relative.parts[1:-1]:
            continue
        parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
        modules[".".join(parts)] = path
    return modules


def layer_of(module: str) -> int:
    parts = module.split(".")
    return LAYERS[parts[1]] if len(parts) > 1 else LAYERS["arpg_hf"]


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, bool]]:
    """`(imported name, at module level)` for every import the module runs (`if TYPE_CHECKING:` blocks never run);
    intra-package names are resolved to the module they name."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    found = []

    def resolve(name: str) -> str:
        while name not in modules and "." in name:  # `from .x import y`: y is an attribute of x
            name = name.rpartition(".")[0]
        return name

    def visit(node: ast.AST, module_level: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for grandchild in child.orelse:
                    visit(grandchild, module_level)
                continue
            if isinstance(child, ast.Import):
                found.extend((resolve(alias.name), module_level) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package
                    for _ in range(child.level - 1):
                        base = base.rpartition(".")[0]
                    target = f"{base}.{child.module}" if child.module else base
                else:
                    target = child.module or ""
                for alias in child.names:
                    submodule = f"{target}.{alias.name}"
                    found.append((submodule if submodule in modules else resolve(target), module_level))
            nested = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, module_level and not nested)

    visit(ast.parse(path.read_text(encoding="utf-8")), True)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, list[tuple[str, bool]]]:
    modules = module_files()
    return {module: imports_of(module, path, modules) for module, path in modules.items()}


def test_every_module_has_a_layer():
    unplaced = sorted({module.split(".")[1] for module in module_files() if "." in module} - set(LAYERS))
    assert not unplaced, f"place these modules in a layer (tests/test_layers.py, docs/architecture.md): {unplaced}"


def test_the_import_graph_is_acyclic(graph):
    edges = {
        module: {name for name, _ in imported if name in graph and name != module} for module, imported in graph.items()
    }
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = "open"
        stack.append(module)
        for target in sorted(edges[module]):
            if state.get(target) == "open":
                cycle = stack[stack.index(target) :] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module)


def test_imports_point_down_the_layers(graph):
    """Module-level imports stay within a module's layer or below; a function may import one layer up only from the
    core into the integration layer (the model classes' conversion and model-card conveniences), never an
    application."""
    wrong = []
    for module, imported in graph.items():
        for name, module_level in imported:
            if name not in graph or name == module:
                continue
            source, target = layer_of(module), layer_of(name)
            lazy_convenience = not module_level and source == CORE and target == INTEGRATION
            if target > source and not lazy_convenience:
                where = "module level" if module_level else "in a function"
                wrong.append(f"{module} ({LAYER_NAMES[source]}) imports {name} ({LAYER_NAMES[target]}) {where}")
    assert not wrong, "\n".join(wrong)


def test_the_library_imports_no_application(graph):
    wrong = [
        f"{module} imports {name}"
        for module, imported in graph.items()
        if layer_of(module) < APPLICATION
        for name, _ in imported
        if (name in graph and layer_of(name) == APPLICATION)
        or any(name == root or name.startswith(root + ".") for root in APPLICATION_ROOTS)
    ]
    assert not wrong, "\n".join(wrong)


def test_every_module_imports_in_any_order():
    """Each order in one fresh interpreter: sorted, then reversed (a module that only imports after another fails).
    `__main__` runs the CLI when imported; the evaluate modules are scripts that `evaluate.load` reads by path."""
    modules = [
        name
        for name, path in module_files().items()
        if not name.endswith("__main__")
        and all((folder / "__init__.py").is_file() for folder in path.parents if PACKAGE in folder.parents)
    ]
    script = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    for order in (sorted(modules), sorted(modules, reverse=True)):
        result = subprocess.run([sys.executable, "-c", script, *order], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-3000:]


def test_no_sys_path_edits():
    needle = "sys" + ".path"
    files = []
    for folder, subfolders, names in os.walk(REPO):  # skipping virtual environments and build outputs
        subfolders[:] = [name for name in subfolders if name not in EXCLUDED_DIRS and not name.startswith(".venv")]
        files += [Path(folder) / name for name in names if name.endswith(".py")]
    found = [
        f"{path.relative_to(REPO)}:{number}"
        for path in sorted(files)
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
        if needle in line
    ]
    assert not found, f"{needle} edits (install the package instead, `pip install -e .`): {found}"
