"""The package's structure, checked from its source: imports run down the layers and never in a circle
(imports inside functions count), public functions of the method and protocol packages say what they
do, and every paper has its protocol, configs and table under one name."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lorabench"

# The layers, lowest first, written down once. A module may import modules of its own layer or of a
# lower one; a layer is the first part of the module path under lorabench (lorabench.adapters.io ->
# "adapters"; the package root is "").
LAYERS = [
    ("", "errors", "utils", "checks"),  # errors, config checks without torch, io, seeding, registries, plots, console
    ("data", "models"),               # image folders; loading and saving diffusers models
    ("adapters",),                    # LoRA, OrthA, TriLoRA: one file each, their injection and files
    ("sampling", "evaluation"),       # drawing images; scoring them
    ("world",),                       # the mini world: its model, data, evaluators and eval sets
    ("merging",),                     # merging independently trained adapters
    ("continual",),                   # passing one adapter from task to task
    ("training", "loggers"),          # the Lightning module, its callbacks, the loggers
    ("run",),                         # the train task
    ("protocols",),                   # what experiments do: one file per paper, and what they share
    ("cli", "__main__", "sweeps"),    # the command line, and sweeps' folders and summaries
]
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}
# Packages whose public functions and classes each need a docstring.
DOCUMENTED = ("adapters", "merging", "continual", "protocols")


def module_files() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = module_files()


def resolve(name: str) -> str:
    """The longest module of the package that ``name`` names or lies in."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def imports_of(module: str) -> list[tuple[str, int]]:
    """``(imported module, line)`` for every import of a lorabench module anywhere in ``module`` (top
    level, inside functions, under ``if TYPE_CHECKING``)."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(resolve(a.name), node.lineno) for a in node.names if a.name.split(".")[0] == "lorabench"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                full = ".".join(base + ([node.module] if node.module else []))
            else:
                full = node.module or ""
            if full.split(".")[0] != "lorabench":
                continue
            for alias in node.names:
                sub = f"{full}.{alias.name}"
                found.append((sub if sub in MODULES else resolve(full), node.lineno))
    return [(m, line) for m, line in found if m != module]


GRAPH = {m: imports_of(m) for m in MODULES}


def layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    assert top in LAYER_OF, f"{module}: its top-level name {top!r} is in no layer; add it to LAYERS"
    return LAYER_OF[top]


def test_every_module_has_a_layer():
    for m in MODULES:
        layer(m)


def test_imports_run_down_the_layers():
    upward = [f"{MODULES[m].relative_to(ROOT)}:{line} imports {target} ({LAYERS[layer(target)]} is above "
              f"{LAYERS[layer(m)]})"
              for m, edges in GRAPH.items() for target, line in edges if layer(target) > layer(m)]
    assert not upward, "\n".join(upward)


def find_cycle(graph: dict[str, list[tuple[str, int]]]) -> list[str]:
    """One import circle of ``graph`` (its modules, the first repeated at the end), or []."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str]:
        state[m] = 1
        path.append(m)
        for target, _ in graph.get(m, []):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[m] = 2
        return []

    for m in graph:
        if m not in state and (cycle := visit(m)):
            return cycle
    return []


def test_no_import_circles():
    cycle = find_cycle(GRAPH)
    assert not cycle, "import circle: " + " -> ".join(cycle)


def test_the_checks_catch_a_circle_and_an_upward_import():
    """The two checks above on a made-up graph: they would fail on what they are meant to find."""
    graph = {"lorabench.adapters.io": [("lorabench.merging.updates", 3)],
             "lorabench.merging.updates": [("lorabench.adapters.io", 5)]}
    assert find_cycle(graph) == ["lorabench.adapters.io", "lorabench.merging.updates", "lorabench.adapters.io"]
    assert layer("lorabench.merging.updates") > layer("lorabench.adapters.io")
    assert find_cycle({"lorabench.a": [("lorabench.b", 1)], "lorabench.b": []}) == []


def test_imports_inside_functions_say_why():
    """An import inside a function is the exception: its line carries ``noqa: PLC0415`` (ruff checks the
    rest) and a reason, on that line or in a comment just above."""
    missing = []
    for m, path in MODULES.items():
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
                line = lines[node.lineno - 1]
                reason = line.partition("noqa: PLC0415")[2].strip(" -") or any(
                    "#" in lines[k] for k in range(max(0, node.lineno - 4), node.lineno - 1))
                if "noqa: PLC0415" not in line or not reason:
                    missing.append(f"{path.relative_to(ROOT)}:{node.lineno}: {line.strip()}")
    assert not missing, "imports inside functions without a reason:\n" + "\n".join(missing)


@pytest.mark.parametrize("package", DOCUMENTED)
def test_public_functions_have_a_docstring(package):
    missing = []
    for m, path in MODULES.items():
        if not m.startswith(f"lorabench.{package}"):
            continue
        tree = ast.parse(path.read_text())
        nodes = list(tree.body) + [n for c in tree.body if isinstance(c, ast.ClassDef) for n in c.body]
        for node in nodes:
            if (isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_")
                    and not ast.get_docstring(node)):
                missing.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    # Methods that implement a documented interface (Lightning hooks, the adapter and continual-method
    # interfaces) are documented where the interface is.
    missing = [x for x in missing if x.split()[-1] not in INTERFACE_METHODS]
    assert not missing, "public functions without a docstring:\n" + "\n".join(missing)


INTERFACE_METHODS = {
    "factors", "adapter_metadata", "validate",                                     # adapters.base
    "train_deltas", "adapter_config", "start", "finish", "eval_deltas",           # continual.methods
    "state_dict", "load_state_dict", "combine",
    "update", "compute", "on_train_end", "on_train_batch_end", "on_train_epoch_end",  # torchmetrics, Lightning
    "forward", "extra_repr",                                                       # torch
}


def test_each_paper_has_its_protocol_configs_and_table_under_one_name():
    papers = sorted(p.name for p in (ROOT / "experiments").iterdir() if p.is_dir())
    assert papers == ["continual", "orthogonal_adaptation", "trilora"]
    for paper in papers:
        assert (PACKAGE / "protocols" / f"{paper}.py").is_file(), paper
        assert (ROOT / "conf" / "experiment" / paper).is_dir(), paper
        assert (ROOT / "experiments" / paper / "README.md").is_file(), paper
