"""The repository's shape: an import graph without cycles, and the library apart from the demo world.

The library is `mlx_llava` (but its `demo` subpackage) and `convert`; the
demo world imports the library and is never imported by it (the library only
finds the shipped model's folder by path). Nothing imports `research/`. The
CLI presents the library and, in `mlx-llava demo` and the default `eval`, the
demo. Every import counts, module level or inside a function.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# folder -> the package name it installs as (pyproject's package-dir)
PACKAGES = {"mlx_llava": "mlx_llava", "convert": "mlx_llava.convert", "cli": "mlx_llava.cli"}


def modules() -> dict:
    """{module name: path} for every .py file of the installed packages."""
    out = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


def imports(name: str, path: Path, known: set) -> set:
    """The project modules `name` imports, resolved to the longest known name."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def graph() -> dict:
    mods = modules()
    known = set(mods)
    return {name: imports(name, path, known) for name, path in mods.items()}


def test_the_import_graph_has_no_cycle():
    g = graph()
    # a package's __init__ importing its own submodules is how packages are made, not a cycle
    edges = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in g.items()}
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == "open":
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_library_never_imports_the_demo_world_or_research():
    g = graph()
    library = [m for m in g if not m.startswith(("mlx_llava.demo", "mlx_llava.cli"))]
    assert "mlx_llava.convert" in library and "mlx_llava.models.llava" in library
    offenders = {m: sorted(t for t in g[m] if t.startswith("mlx_llava.demo")) for m in library}
    assert not {m: t for m, t in offenders.items() if t}
    for path in [*modules().values(), *(ROOT / "benchmarks").glob("*.py")]:
        assert "research" not in {n.split(".")[0] for n in _imported_names(path)}, path


def test_only_the_demo_commands_present_the_demo():
    g = graph()
    cli = {m: sorted(t for t in ts if t.startswith("mlx_llava.demo")) for m, ts in g.items() if m.startswith("mlx_llava.cli")}
    assert {m for m, ts in cli.items() if ts} <= {"mlx_llava.cli.demo", "mlx_llava.cli.eval"}


def test_no_two_modules_share_a_name_for_different_things():
    names = {}
    for name in modules():
        stem = name.rpartition(".")[2]
        names.setdefault(stem, []).append(name)
    # a command module is the CLI of the library module of its name: the same thing
    shared = {stem: ms for stem, ms in names.items()
              if len([m for m in ms if not m.startswith("mlx_llava.cli.")]) > 1 and stem != "__init__"}
    assert not shared, shared


def _imported_names(path: Path) -> set:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.add(node.module)
    return out
