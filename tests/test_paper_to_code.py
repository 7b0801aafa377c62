"""docs/paper-to-code.md names, for each step of the paper, the function that does it and the tag that function
carries; and the package reads in one direction: no two of its modules import each other."""

import ast
import importlib.util
import inspect
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROW = re.compile(r"^\| (?P<paper>[^|]+?) \| .+ \| `(?P<file>[^`]+)`: `(?P<name>[^`]+)` \| `(?P<tag>[^`]+)` \|$")


def table_rows() -> list[dict[str, str]]:
    rows = [match.groupdict() for line in (ROOT / "docs" / "paper-to-code.md").read_text().splitlines()
            if (match := ROW.match(line))]
    assert len(rows) >= 25, f"only {len(rows)} rows read from docs/paper-to-code.md"
    return rows


def load(file: str):
    """The module of `file` (train.py is loaded from its path: it is a script, not a package module)."""
    spec = importlib.util.spec_from_file_location(Path(file).stem, ROOT / file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("row", table_rows(), ids=lambda row: f"{row['name']}:{row['tag']}")
def test_each_named_function_exists_and_carries_its_tag(row):
    target = load(row["file"]) if row["file"] == "train.py" else importlib.import_module(
        row["file"].removesuffix(".py").replace("/", "."))
    for part in row["name"].split("."):
        assert hasattr(target, part), f"{row['file']} has no {row['name']} (the row for {row['paper']})"
        target = getattr(target, part)
    assert row["tag"] in inspect.getsource(target), f"{row['name']} no longer says {row['tag']!r}"


def test_the_table_covers_both_algorithms_line_by_line_and_the_papers_equations():
    papers = " ".join(row["paper"] for row in table_rows())
    for step in ("Algorithm 1, line 2", "Algorithm 1, lines 3-4", "Algorithm 1, line 5", "Algorithm 2, line 1",
                 "Algorithm 2, lines 2-5", "Algorithm 2, line 6", "Eq. 4", "Eq. 5", "Eq. 6-7", "Eq. 11", "Eq. 12",
                 "Eq. 13", "Eq. 14", "Eq. 16", "Eq. 17", "Min-SNR"):
        assert step in papers, step


def package_imports() -> dict[str, set[str]]:
    """Each ddpm module and the ddpm modules it imports (relative or absolute, anywhere in the file)."""
    graph = {}
    for path in sorted((ROOT / "ddpm").glob("*.py")):
        name = path.stem
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = node.module or ""
                if node.level == 1:  # from .x import y, or from . import x
                    imported |= {module.split(".")[0]} if module else {alias.name for alias in node.names}
                elif module == "ddpm":
                    imported |= {alias.name for alias in node.names}
                elif module.startswith("ddpm."):
                    imported.add(module.split(".")[1])
            elif isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[1] for alias in node.names if alias.name.startswith("ddpm.")}
        graph[name] = imported - {name}
    return graph


def test_no_module_of_the_package_imports_itself_through_others():
    graph = package_imports()
    assert graph["data"] and graph["training_state"], "the import graph was not read"
    modules = set(graph) - {"__init__"}

    def reachable(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for following in graph[todo.pop()] & modules:
                if following not in seen:
                    seen.add(following)
                    todo.append(following)
        return seen

    in_cycles = sorted(module for module in modules if module in reachable(module))
    assert not in_cycles, f"modules on an import cycle: {in_cycles}"
