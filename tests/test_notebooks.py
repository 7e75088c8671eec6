"""The Colab notebooks: committed without outputs, and executed end to end on this interpreter."""

import os
import sys

import nbclient
import nbformat
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = ("01_explore_isimed.ipynb", "02_evaluate_checkpoint.ipynb")


def read(name: str) -> nbformat.NotebookNode:
    nb = nbformat.read(os.path.join(ROOT, "notebooks", name), as_version=4)
    nbformat.validate(nb)
    return nb


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_is_stripped_and_installs_only_when_needed(name):
    nb = read(name)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    assert nb.cells[0].cell_type == "markdown" and "colab.research.google.com" in nb.cells[0].source
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]
    setup = next(cell.source for cell in nb.cells if cell.cell_type == "code")
    # pip runs only in the ImportError branch, so a working install is left alone.
    head, _, branch = setup.partition("except ImportError:")
    assert "import isimed" in head and "pip install" not in head
    assert "%pip install" in branch and "REPO_URL" in setup


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_executes_without_errors(name, phantom_dir, tmp_path, monkeypatch):
    nb = read(name)
    # An extra last cell (in memory only) reports which interpreter the kernel runs.
    nb.cells.append(nbformat.v4.new_code_cell("import sys\nprint(sys.prefix)"))
    # The kernel inherits the environment: the shared test phantom, and a private temp dir so the
    # notebooks' scratch workdirs (and 02's "train first if there is no checkpoint" path) start
    # empty and land under tmp_path.
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("ISIMED_DATA_DIR", phantom_dir)
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.delenv("ISIMED_WORKDIR", raising=False)
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    # kernel_name python3 resolves to ipykernel in this environment; jupyter_client launches a
    # kernelspec whose argv starts with "python" with sys.executable, i.e. this venv's python.
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # Raises CellExecutionError with the cell's traceback on any error.

    assert nb.cells[-1].outputs[-1]["text"].strip() == sys.prefix
    images = sum(
        "image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs
    )
    assert images >= 4  # Every figure cell drew something.
