"""The package reads top-down: imports only point to lower layers, and the README's layout table
names every module. Parsed from the source, so a new import or module is checked as it lands."""

import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Top to bottom. A unit (a top-level module or subpackage of isimed) may import units of its own
# layer's row or of rows below it, never above.
LAYERS = (
    ("isimed.cli",),
    ("isimed.locate",),
    ("isimed.finetune",),
    ("isimed.train", "isimed.locate"),
    ("isimed.evaluation", "isimed.export"),
    ("isimed.checkpoints",),
    ("isimed.train_state",),
    ("isimed.methods", "isimed.config_checks", "isimed.data", "isimed.writers"),
    ("isimed.augment", "isimed.models", "isimed.losses"),
    ("isimed.geometry", "isimed.paths", "isimed.runtime", "isimed.workdir"),
    ("isimed.errors",),
)
RANK = {unit: i for i, row in enumerate(LAYERS) for unit in row}


def _modules() -> dict[str, str]:
    """Dotted module name -> path, for every .py file under isimed/."""
    out = {}
    for root, _, files in os.walk(os.path.join(ROOT, "isimed")):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[name.removesuffix(".__init__")] = path
    return out


def _imports(path: str, modules: dict[str, str]) -> set[str]:
    """The isimed modules a file imports (`from isimed.x import y` counts y if y is a module)."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found.update(n for n in names if n in modules)
    return found


def _unit(module: str) -> str:
    return ".".join(module.split(".")[:2])


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(p, modules) - {m} for m, p in modules.items()}


def test_every_unit_has_a_layer():
    units = {_unit(m) for m in _modules()} - {"isimed"}
    assert units <= set(RANK), f"place these in LAYERS: {sorted(units - set(RANK))}"


def test_imports_point_down():
    upward = [
        f"{m} imports {d}"
        for m, deps in _graph().items()
        for d in deps
        if _unit(m) in RANK and _unit(d) in RANK and RANK[_unit(d)] < RANK[_unit(m)]
    ]
    assert not upward, upward


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done.

    def visit(m, path):
        state[m] = 1
        for d in graph.get(m, ()):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(d) :] + [d]))
            if d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_readme_layout_table_names_every_module():
    readme = open(os.path.join(ROOT, "README.md")).read()
    section = readme[readme.index("## Layout") :]
    section = section[: section.index("\n## ", 1)]
    listed = set(re.findall(r"`(isimed/[\w/.]+)`", section))
    missing_files = [p for p in listed if not os.path.exists(os.path.join(ROOT, p))]
    assert not missing_files, f"README layout names files that do not exist: {missing_files}"
    covered = lambda rel: any(rel == p or (p.endswith("/") and rel.startswith(p)) for p in listed)
    unlisted = [
        rel
        for rel in (os.path.relpath(p, ROOT) for p in _modules().values())
        if not rel.endswith("__init__.py") and not covered(rel)
    ]
    assert not unlisted, f"README layout table does not name: {sorted(unlisted)}"
