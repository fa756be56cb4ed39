"""docs/reliability.md names, for each fault, the test that tries it: every test it names exists."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "reliability.md"


def named_tests() -> list[tuple[str, str | None]]:
    """(test file, test function or None) for every `tests/...py[::name]` in the page."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"(tests/[\w/]+\.py)(?:::(\w+))?", DOC.read_text())]


def defined_tests(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.name for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}


def test_every_test_the_page_names_exists():
    names = named_tests()
    assert len(names) > 20
    missing = []
    for file, function in names:
        path = ROOT / file
        if not path.is_file():
            missing.append(file)
        elif function and function not in defined_tests(path):
            missing.append(f"{file}::{function}")
    assert not missing, f"docs/reliability.md names tests that do not exist: {sorted(set(missing))}"
