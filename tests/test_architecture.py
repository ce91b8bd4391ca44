"""The package layering: data flows one way, no module imports in a circle, one list of data jobs.

Layers, lowest first (a module imports only from its own layer or lower ones;
the package docstrings say the same in prose):

1. ``schemas``: record formats, typed configs and their flags, storage; no project imports.
2. ``pipelines.tokens``: text and media → token ids, LWM's prompt layouts; no Beam.
3. ``trainer``: model, training, inference, evaluation, conversions.
4. ``pipelines.kit``: the Beam data-job kit.
5. the data jobs: ``pipelines.books``, ``pipelines.vision``, ``pipelines.chat_qa``, …
6. ``orchestration``: the CLI, stage plans and launchers, the demo.

Imports are read from the source (top level and inside functions alike).
"""

from __future__ import annotations

import ast
import importlib
import pathlib

import pipelines

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("schemas", "pipelines", "trainer", "orchestration")


def layer(module: str) -> int:
    if module.startswith("schemas"):
        return 1
    if module.startswith("pipelines.tokens"):
        return 2
    if module.startswith("trainer"):
        return 3
    if module.startswith("pipelines.kit"):
        return 4
    if module.startswith("pipelines"):
        return 0 if module == "pipelines" else 5  # the package itself is the registry: it imports nothing
    assert module.startswith("orchestration"), module
    return 6


def modules() -> dict[str, pathlib.Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            found[name] = path
    return found


def imports(path: pathlib.Path, known: set[str]) -> set[str]:
    """Project modules ``path`` imports anywhere in it (``from X import y`` counts as ``X.y`` when that is
    a module, else as ``X``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] in PACKAGES)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
            for alias in node.names:
                found.add(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known else node.module)
    return found


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(path, set(found)) for name, path in found.items()}


def test_every_import_points_down_the_layers():
    backward = [f"{m} (layer {layer(m)}) imports {d} (layer {layer(d)})"
                for m, deps in graph().items() for d in deps if layer(d) > max(layer(m), 1) or
                (layer(m) == 0 and d != m)]
    assert not backward, "\n".join(backward)


def test_no_module_imports_in_a_circle():
    edges = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for dep in edges.get(node, ()):
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = []
            while True:
                component.append(stack.pop())
                if component[-1] == node:
                    break
            if len(component) > 1 or node in edges.get(node, ()):
                cycles.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    assert not cycles, cycles


def test_no_folder_holds_more_than_sixteen_modules():
    crowded = {str(d.relative_to(ROOT)): n for package in PACKAGES for d in [ROOT / package, *(ROOT / package).rglob("*")]
               if d.is_dir() and (n := len([f for f in d.glob("*.py") if f.name != "__init__.py"])) > 16}
    assert not crowded, crowded


def test_no_two_modules_share_a_name():
    names: dict[str, list[str]] = {}
    for module, path in modules().items():
        if path.name != "__init__.py":
            names.setdefault(path.stem, []).append(module)
    assert {n: m for n, m in names.items() if len(m) > 1} == {}


def test_the_job_registry_is_the_only_list_of_jobs():
    jobs = set(pipelines.JOBS)
    for name, module in pipelines.JOBS.items():
        assert importlib.import_module(module).JOB.name == name
    # No other module holds a collection literal of job names.
    spelled = []
    for module, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            items = node.keys if isinstance(node, ast.Dict) else getattr(node, "elts", None)
            if isinstance(node, (ast.Tuple, ast.List, ast.Set, ast.Dict)) and module != "pipelines":
                names = {i.value for i in items if isinstance(i, ast.Constant)} & jobs
                if len(names) > 1:
                    spelled.append(f"{module}:{node.lineno}")
    assert not spelled, f"these modules list data jobs themselves; read pipelines.JOBS instead: {spelled}"
