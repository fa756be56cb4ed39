"""The product's structure rules, checked on the source with ``ast``: one write path (``os.replace``
only in lottery/files.py), no import cycle between lottery's modules (imports inside functions
included), no function over 60 lines."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRODUCT_DIRS = ("lottery", "spark_jobs", "dags", "plugins")
MAX_FUNCTION_LINES = 60


def _sources(*dirs: str) -> list[Path]:
    return sorted(p for d in dirs for p in (ROOT / d).rglob("*.py") if "__pycache__" not in p.parts)


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


# ---- os.replace only in lottery/files.py ----------------------------------------------------------
def _os_replace_calls(path: Path) -> list[int]:
    lines = []
    for node in ast.walk(_tree(path)):
        if (isinstance(node, ast.Attribute) and node.attr == "replace" and isinstance(node.value, ast.Name)
                and node.value.id == "os"):
            lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.module == "os" and any(a.name == "replace" for a in node.names):
            lines.append(node.lineno)
    return lines


def test_os_replace_only_in_lottery_files():
    offenders = [f"{_rel(p)}:{line}" for p in _sources(*PRODUCT_DIRS) if p != ROOT / "lottery" / "files.py"
                 for line in _os_replace_calls(p)]
    assert offenders == [], f"os.replace outside lottery/files.py (write through lottery.files): {offenders}"


# ---- no import cycle in lottery/ --------------------------------------------------------------------
def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imported_modules(path: Path, name: str, modules: set[str]) -> set[str]:
    """The lottery modules ``path`` (module ``name``) imports anywhere in its body, each resolved to
    the deepest module that exists (``from lottery.data import runtime`` -> lottery.data.runtime)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            candidates = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for candidate in candidates:
            while candidate and candidate not in modules:
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                found.add(candidate)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in _sources("lottery")}
    modules = set(paths)
    return {name: _imported_modules(path, name, modules) for name, path in paths.items()}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_the_import_graph_sees_function_level_imports():
    """The cycle check could pass vacuously if the graph missed imports: it must not."""
    graph = import_graph()
    assert "lottery.data.runtime" in graph["lottery.session"]  # `from lottery.data import runtime` in a function
    assert "lottery.config" in graph["lottery.session"]  # a module-level import
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_in_lottery():
    cycles = import_cycles(import_graph())
    assert cycles == [], f"import cycles between lottery's modules (function-level imports included): {cycles}"


# ---- no function over 60 lines --------------------------------------------------------------------
def long_functions(paths: list[Path], limit: int = MAX_FUNCTION_LINES) -> list[str]:
    found = []
    for path in paths:
        for node in ast.walk(_tree(path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > limit:
                    found.append(f"{_rel(path)}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_no_function_over_60_lines():
    offenders = long_functions(_sources(*PRODUCT_DIRS))
    assert offenders == [], f"functions over {MAX_FUNCTION_LINES} lines: {offenders}"


def test_the_length_check_sees_long_functions(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n" + "    x = 1\n" * MAX_FUNCTION_LINES + "\n\ndef g():\n    pass\n")
    assert [line.split(" ")[1] for line in long_functions([source])] == ["f"]
