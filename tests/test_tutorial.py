"""docs/tutorial.ipynb: stored as docs/tutorial_build.py writes it, with its pictures, and it runs top to bottom
on the code as it is now (nbclient, from a copy: the stored notebook is never rewritten)."""

import importlib.util
import re
import shutil
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")  # the notebook test extras (.[test]): skipped without them
NotebookClient = pytest.importorskip("nbclient").NotebookClient

DOCS = Path(__file__).resolve().parent.parent / "docs"
NOTEBOOK = DOCS / "tutorial.ipynb"


@pytest.fixture(scope="module")
def stored() -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOK, as_version=4)


def sections(notebook: nbformat.NotebookNode) -> list[list[nbformat.NotebookNode]]:
    """The cells of each numbered section ("## 1. ..."), its heading cell first."""
    found = []
    for cell in notebook.cells:
        if cell.cell_type == "markdown" and re.match(r"## \d+\. ", cell.source):
            found.append([])
        if found:
            found[-1].append(cell)
    return found


def test_tutorial_cells_are_those_its_build_script_writes(stored):
    spec = importlib.util.spec_from_file_location("tutorial_build", DOCS / "tutorial_build.py")
    build_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_script)
    expected = [(cell.cell_type, cell.source) for cell in build_script.build().cells]
    assert [(cell.cell_type, cell.source) for cell in stored.cells] == expected, \
        "docs/tutorial.ipynb differs from docs/tutorial_build.py: run `python docs/tutorial_build.py`"


def test_stored_tutorial_was_run_top_to_bottom_without_errors(stored):
    code = [cell for cell in stored.cells if cell.cell_type == "code"]
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1))
    errors = [output for cell in code for output in cell.outputs if output.output_type == "error"]
    assert not errors, f"stored outputs hold an error: {errors[0].ename}: {errors[0].evalue}"


def test_each_section_names_its_equation_and_code_and_shows_a_picture(stored):
    found = sections(stored)
    assert len(found) == 7
    for number, cells in enumerate(found, start=1):
        heading = cells[0].source.splitlines()[0]
        assert "**Code:**" in cells[0].source, f"{heading}: no function named"
        if number < 7:  # section 7 is the on-disk format, which is diffusers', not the paper's
            assert re.search(r"\*\*Paper\b", cells[0].source), f"{heading}: no equation or algorithm named"
        pictures = [output for cell in cells if cell.cell_type == "code" for output in cell.outputs
                    if "image/png" in output.get("data", {})]
        assert pictures, f"{heading}: no picture stored"


def test_tutorial_runs_top_to_bottom(tmp_path, monkeypatch):
    copy = tmp_path / NOTEBOOK.name
    shutil.copy(NOTEBOOK, copy)
    notebook = nbformat.read(copy, as_version=4)
    # The kernel inherits this environment: offline (conftest.py), a few seconds of training instead of two
    # minutes, one thread as the other tests (two threads on two busy cores run ten times slower).
    monkeypatch.setenv("DDPM_TUTORIAL_TRAIN_SECONDS", "5")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # any cell that raises (the notebook asserts its own checks) fails the run with CellExecutionError
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    last = [cell for cell in notebook.cells if cell.cell_type == "code"][-1].outputs
    assert last and last[0].text.startswith("the notebook ran in")
