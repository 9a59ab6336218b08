"""Every chapter notebook runs top to bottom with quick parameters (MRCNN_EDU_QUICK=1).

Cells are executed in one namespace in a temporary directory, so a notebook cannot depend on
files left by another. Notebooks are committed without outputs; that is checked too.
"""

import os
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert not cell.get("outputs"), f"{path.name} cell {i} has outputs; clear them"
            assert cell.get("execution_count") is None, f"{path.name} cell {i} has a count"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MRCNN_EDU_QUICK", "1")
    nb = nbformat.read(path, as_version=4)
    namespace = {"__name__": "__main__"}
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        # IPython magics and shell escapes are not Python; notebooks here do not need them.
        src = "\n".join(
            line for line in cell.source.splitlines() if not line.lstrip().startswith(("%", "!"))
        )
        try:
            exec(compile(src, f"{path.name}[cell {i}]", "exec"), namespace)
        except Exception as err:
            raise AssertionError(f"{path.name} cell {i} failed: {err!r}") from err
        finally:
            plt.close("all")
    assert os.getcwd() == str(tmp_path)


def _percent_code_cells(py_path: Path) -> list[str]:
    """Code cells of a jupytext percent-format script: the blocks after ``# %%`` markers that
    are not ``# %% [markdown]``."""
    cells, current, is_code = [], None, False
    for line in py_path.read_text().splitlines():
        if line.startswith("# %%"):
            if current is not None and is_code:
                cells.append("\n".join(current).strip())
            current, is_code = [], "[markdown]" not in line
        elif current is not None:
            current.append(line)
    if current is not None and is_code:
        cells.append("\n".join(current).strip())
    return cells


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_matches_its_jupytext_pair(path):
    """Edit the .py, then regenerate the .ipynb (jupytext --to ipynb): the two must agree."""
    pair = path.with_suffix(".py")
    assert pair.exists(), f"{path.name} has no paired {pair.name}"
    nb = nbformat.read(path, as_version=4)
    code = [c.source.strip() for c in nb.cells if c.cell_type == "code"]
    assert code == _percent_code_cells(pair), f"{path.name} is out of date with {pair.name}"
