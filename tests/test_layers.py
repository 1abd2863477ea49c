"""The house: card_megatron's import graph has no cycle and no arrow pointing up.

The graph is read from the source with ``ast``: every ``import`` and ``from ... import`` of a
card_megatron module counts, at module level or inside a function. ``LAYERS`` is the one written
order of the top-level packages and modules (docs/design.md, "The house" says the same): a module
may import from its own package and from packages of lower layers only; packages of one layer do
not import each other. No module imports another module's private (underscore) names.
"""

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "card_megatron"

# Bottom to top. Each entry is one layer: the top-level modules and packages of card_megatron in it.
LAYERS = (
    ("fileio", "lock", "noise", "quiet_warnings", "config_checks", "rundir"),  # foundation
    ("tokenizers", "objectives"),  # each objective's maths, traits and config section; the tokenizers
    ("config",),  # the typed tree: composes every section (the objective's from objectives/)
    ("cli",),  # options dataclasses -> command lines, checked like the config; the one entry helper
    ("data", "parallel"),
    ("model",),
    ("training",),
    ("inference",),
    ("eval", "interop"),  # evaluation; export, import and the transformers anchor
    ("train", "launch_check", "tools"),  # entry points: the trainer's and the tools' (card_megatron/tools/)
)


def module_files() -> dict[str, str]:
    """{dotted module name: path} of every .py file of the package (a package is its __init__)."""
    out = {}
    for dirpath, _, files in os.walk(os.path.join(REPO, PACKAGE)):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                dotted = os.path.relpath(path, REPO)[: -len(".py")].replace(os.sep, ".")
                out[dotted.removesuffix(".__init__")] = path
    return out


def import_graph(modules: dict[str, str]) -> dict[str, dict[str, int]]:
    """{module: {imported card_megatron module: first line}}. ``from pkg import name`` points at the
    module ``pkg.name`` when there is one, else at ``pkg``; the root package itself is left out."""
    graph: dict[str, dict[str, int]] = {}
    for module, path in modules.items():
        edges: dict[str, int] = {}
        is_package = path.endswith("__init__.py")
        for node in ast.walk(ast.parse(open(path).read(), path)):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = module.split(".") if is_package else module.split(".")[:-1]
                    parts = parts[: len(parts) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                while target and target not in modules:  # "import card_megatron.x.y" of a name: its module
                    target = target.rpartition(".")[0]
                if target and target != PACKAGE and target != module:
                    edges.setdefault(target, node.lineno)
        graph[module] = edges
    return graph


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str]:
    """One cycle of the graph as [a, b, ..., a], or [] when there is none (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return []


def _top(module: str) -> str:
    return module.split(".")[1]


@pytest.fixture(scope="module")
def graph():
    return import_graph(module_files())


def test_no_import_cycle(graph):
    cycle = find_cycle(graph)
    where = [f"{a} -> {b} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])]
    assert not cycle, "import cycle:\n  " + "\n  ".join(where)


def test_every_top_level_package_has_a_layer(graph):
    layered = {name for layer in LAYERS for name in layer}
    tops = {_top(m) for m in graph if m != PACKAGE}
    assert tops <= layered, f"not in LAYERS (tests/test_layers.py, docs/design.md): {sorted(tops - layered)}"
    assert layered <= tops, f"in LAYERS but not in card_megatron: {sorted(layered - tops)}"


def test_imports_point_down_the_layers(graph):
    level = {name: i for i, layer in enumerate(LAYERS) for name in layer}
    files = module_files()
    wrong = []
    for module, edges in graph.items():
        if module == PACKAGE:
            continue
        for target, line in edges.items():
            a, b = _top(module), _top(target)
            if a != b and level[b] >= level[a]:
                how = "the same layer" if level[b] == level[a] else "a higher layer"
                wrong.append(f"{os.path.relpath(files[module], REPO)}:{line}: {module} imports {target} ({how})")
    assert not wrong, "imports against LAYERS:\n  " + "\n  ".join(sorted(wrong))


def test_no_module_imports_another_modules_private_names():
    files = module_files()
    wrong = []
    for path in files.values():
        for node in ast.walk(ast.parse(open(path).read(), path)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(PACKAGE):
                for alias in node.names:
                    if alias.name.startswith("_") and f"{node.module}.{alias.name}" not in files:
                        if alias.name != "_indexer":  # the compiled extension module
                            wrong.append(f"{os.path.relpath(path, REPO)}:{node.lineno}: {node.module}.{alias.name}")
    assert not wrong, "private names imported across modules (make them public or move them):\n  " + "\n  ".join(wrong)


def test_the_library_does_not_import_the_apps():
    """apps/ (the study) is built on the library, never the other way round (lingua's apps/)."""
    wrong = []
    for path in module_files().values():
        for node in ast.walk(ast.parse(open(path).read(), path)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            wrong += [f"{os.path.relpath(path, REPO)}:{node.lineno}: {n}" for n in names if n.split(".")[0] == "apps"]
    assert not wrong, "the library imports apps/:\n  " + "\n  ".join(wrong)


def test_the_checks_catch_a_cycle_and_an_upward_arrow():
    assert find_cycle({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": 1}, "b": {}}) == []
    graph = import_graph(module_files())
    assert "card_megatron.objectives.traits" in graph["card_megatron.objectives"]  # function-level too:
    assert "card_megatron.rundir" in graph["card_megatron.config.loading"]  # init_from_defaults imports it inside
