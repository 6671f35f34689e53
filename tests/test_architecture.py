"""The rooms hold: no import cycles, no oversized modules, Flower only at the edges, a light CLI.

The import graph counts every import statement in a module, at the top, inside functions and
under ``TYPE_CHECKING`` alike: a function-level import is still a dependency, only a later one, and
a cycle through it is still two modules that cannot be understood (or moved) one without the other.
Importing a package's submodule does not count as importing the package's ``__init__``.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("medstylegan2", "server", "client", "simulation")
MAX_LINES = 400
# The two modules allowed to be long: every network layer in one file (as stylegan2-ada-pytorch
# keeps them) and the phantom renderer (one anatomy, drawn and rendered in one place).
LONG_MODULES = {"medstylegan2.networks", "medstylegan2.phantoms"}
# flwr-datasets' partitioners: the one Flower package the core may use, in one module.
FLOWER_IN_CORE = {"medstylegan2.fl.partition"}


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


MODULES = project_modules()


def imported_names(path: Path, module: str) -> list[str]:
    """Every module name an import statement anywhere in ``path`` refers to (absolute, dotted)."""
    is_package = path.name == "__init__.py"
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package (or the package itself)
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names.append(base)
            names += [f"{base}.{alias.name}" for alias in node.names]  # `from pkg import submodule`
    return names


def import_graph() -> dict[str, set[str]]:
    return {module: {name for name in imported_names(path, module) if name in MODULES and name != module}
            for module, path in MODULES.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_project_has_no_import_cycles():
    graph = import_graph()
    assert graph["server.strategy"] and graph["medstylegan2.trainer"], "the walk must see the project's imports"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import(tmp_path):
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from c import x\n")
    (tmp_path / "c.py").write_text("from a import y\n")
    graph = {m: {n for n in imported_names(tmp_path / f"{m}.py", m) if n in ("a", "b", "c")} for m in "abc"}
    assert find_cycle(graph) == ["a", "b", "c", "a"]


def test_no_module_is_longer_than_the_limit_except_the_networks_and_the_phantom_renderer():
    too_long = {module: n for module, path in MODULES.items()
                if module not in LONG_MODULES and (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not too_long, f"modules over {MAX_LINES} lines (split them by concern): {too_long}"


def test_nothing_in_the_core_imports_flower_but_the_partitioning_module():
    offenders = {}
    for module, path in MODULES.items():
        if not module.startswith("medstylegan2") or module in FLOWER_IN_CORE:
            continue
        flower = [name for name in imported_names(path, module) if name.split(".")[0] in ("flwr", "flwr_datasets")]
        if flower:
            offenders[module] = sorted(set(flower))
    assert not offenders, f"Flower imported in the core (only {', '.join(FLOWER_IN_CORE)} may): {offenders}"
    assert any(name.startswith("flwr_datasets") for name in
               imported_names(MODULES["medstylegan2.fl.partition"], "medstylegan2.fl.partition"))


@pytest.mark.parametrize("code", ["from medstylegan2.cli import build_parser; build_parser()",
                                  "from medstylegan2.cli import main\ntry:\n    main(['--help'])\n"
                                  "except SystemExit as exc:\n    assert exc.code == 0, exc.code"])
def test_the_command_line_lists_its_commands_without_importing_torch_or_flower(code):
    check = "\nimport sys\nheavy = sorted({'torch', 'flwr'} & set(sys.modules))\nassert not heavy, heavy\n"
    result = subprocess.run([sys.executable, "-c", code + check], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_every_subcommand_help_in_the_table_is_its_modules_own():
    from medstylegan2.cli import COMMANDS

    for name, command in COMMANDS.items():
        module = importlib.import_module(command.module)
        assert module.COMMAND_HELP == command.help, name
        assert callable(module.add_arguments) and callable(module.run), name
