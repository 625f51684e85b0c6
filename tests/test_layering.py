"""The layout holds: layers point one way, pika stays behind its one door, no two modules import each other.

Read from the code itself: every import statement of fedq's four packages (module level or inside a
function), resolved to the project's modules. Tests and benchmarks are not walked: they speak raw
AMQP on purpose (a hostile site, the bare pika loop a benchmark compares against).
"""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("shared", "coordinator", "worker", "fedq")
# What each package may import from the project: shared/ is below both processes, the processes do not
# know each other, and fedq/ (the command, the local federation, the broker finder) sits on top.
MAY_IMPORT = {
    "shared": {"shared"},
    "coordinator": {"shared", "coordinator"},
    "worker": {"shared", "worker"},
    "fedq": {"shared", "coordinator", "worker", "fedq"},
}
TRANSPORT = "shared.transport"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for package in PACKAGES for path in (ROOT / package).rglob("*.py")}


def imports_of(name: str) -> list[tuple[str, int]]:
    """(imported module, line) for every import in module ``name``, relative imports resolved;
    ``from a import b`` names a.b when that is a module, else a."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {(alias.name, node.lineno) for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                child = f"{base}.{alias.name}"
                found.add((child if child in MODULES else base, node.lineno))
    return sorted(found)


def project_module(imported: str) -> str | None:
    """The project module an import names (a package's name is its __init__), or None if not ours."""
    while imported and imported not in MODULES:
        imported = imported.rpartition(".")[0]
    return imported or None


def test_every_package_imports_only_the_layers_below_it():
    wrong = []
    for name in MODULES:
        layer = name.split(".")[0]
        for imported, line in imports_of(name):
            target = project_module(imported)
            if target is not None and target.split(".")[0] not in MAY_IMPORT[layer]:
                wrong.append(f"{MODULES[name].relative_to(ROOT)}:{line} imports {target}")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_pika_is_imported_only_inside_the_transport_package():
    outside = [
        f"{MODULES[name].relative_to(ROOT)}:{line} imports {imported}"
        for name in MODULES if not (name == TRANSPORT or name.startswith(TRANSPORT + "."))
        for imported, line in imports_of(name) if imported.split(".")[0] == "pika"
    ]
    assert not outside, "pika outside shared/transport:\n" + "\n".join(outside)
    assert any(imported.split(".")[0] == "pika" for name in MODULES if name.startswith(TRANSPORT)
               for imported, _ in imports_of(name)), "the walk sees pika where it is imported"


def test_no_modules_import_each_other_through_any_path():
    graph = {name: {target for imported, _ in imports_of(name) if (target := project_module(imported)) not in (None, name)}
             for name in MODULES}
    cycles = [sorted(component) for component in strongly_connected(graph) if len(component) > 1]
    assert not cycles, f"import cycles: {cycles}"


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's strongly connected components."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in graph[node]:
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            components.append(component)

    for node in graph:
        if node not in index:
            visit(node)
    return components


def test_the_cycle_check_finds_a_cycle():
    assert [sorted(c) for c in strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) if len(c) > 1] == [
        ["a", "b", "c"]]


def test_importing_all_of_shared_loads_nothing_from_the_processes_or_the_command():
    shared_modules = sorted(name for name in MODULES if name.split(".")[0] == "shared")
    script = (f"import importlib, sys\nfor name in {shared_modules!r}:\n    importlib.import_module(name)\n"
              "print(sorted({m.split('.')[0] for m in sys.modules} & {'coordinator', 'worker', 'fedq'}))")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"importing shared loaded {result.stdout.strip()}"
    assert len(shared_modules) > 10, "the walk found shared's modules"
