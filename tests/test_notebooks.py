"""The notebooks in notebooks/ are committed WITH their outputs, so a reader sees the plots and tables
without running anything. The tests execute each one again (kernel python3, working directory
notebooks/): a cell that raises fails, and the cells tagged ``reproducible`` (the lecture's AND gate and
the other deterministic computations) must print what the committed copy shows, numbers to 1e-9, so the
committed outputs come from the current code.

After changing gpuxent or a notebook, write the outputs again: ``python tests/test_notebooks.py``.
"""

import copy
import pathlib
import re
import sys
import time

import numpy as np
import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 120
BUDGET_S = 90  # each notebook should run in well under a minute on a quiet CPU; this leaves slack for a busy one
TAG = "reproducible"
NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")


def execute(nb):
    """Run ``nb`` in place, top to bottom, in a fresh python3 kernel; CellExecutionError names a failing cell."""
    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
        record_timing=False,  # no timestamps in the committed files
    )
    client.execute()
    return nb


def _code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def _text(cell) -> str:
    """What a cell printed and returned, as text (images, HTML and stderr left out: numba's one-time compile
    notice goes there, in whichever cell first calls a kernel that no earlier test has compiled)."""
    parts = []
    for out in cell.outputs:
        if out.output_type == "stream" and out.name == "stdout":
            parts.append(out.text)
        elif out.output_type in ("execute_result", "display_data") and "text/plain" in out.get("data", {}):
            if "image/png" not in out.data:  # a figure's text/plain is its repr, with an address
                parts.append(out.data["text/plain"])
    return "".join(parts)


def _same_text(committed: str, fresh: str) -> bool:
    """Equal up to the last digits of the numbers in them (another CPU may round the last ulp otherwise)."""
    if NUMBER.sub("#", committed) != NUMBER.sub("#", fresh):
        return False
    a, b = (np.array([float(x) for x in NUMBER.findall(t)]) for t in (committed, fresh))
    return np.allclose(a, b, rtol=1e-9, atol=1e-12)


def test_notebooks_exist():
    names = {p.name for p in NOTEBOOKS}
    assert {"01_lecture.ipynb", "02_train_digits.ipynb", "03_benchmarks.ipynb"} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_with_outputs(path):
    """Executed top to bottom in one go, with no error, a plot, and something to compare."""
    nb = nbformat.read(path, as_version=4)
    cells = _code_cells(nb)
    assert [c.execution_count for c in cells] == list(range(1, len(cells) + 1)), f"{path.name}: run it again"
    outputs = [o for c in cells for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert [o for o in outputs if "image/png" in o.get("data", {})], f"{path.name}: no plot in the committed file"
    assert [c for c in cells if TAG in c.metadata.get("tags", []) and _text(c)], f"{path.name}: no {TAG} cell"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_and_reproduces_its_outputs(path):
    committed = nbformat.read(path, as_version=4)
    nb = copy.deepcopy(committed)
    t0 = time.perf_counter()
    execute(nb)  # raises CellExecutionError, naming the cell, when one fails
    elapsed = time.perf_counter() - t0
    assert not [o for c in _code_cells(nb) for o in c.outputs if o.output_type == "error"]
    assert [o for c in _code_cells(nb) for o in c.outputs if "image/png" in o.get("data", {})], "no plot rendered"
    for old, new in zip(_code_cells(committed), _code_cells(nb)):
        if TAG in old.metadata.get("tags", []):
            assert _same_text(_text(old), _text(new)), f"{path.name}: committed\n{_text(old)}\nnow\n{_text(new)}"
    assert elapsed < BUDGET_S, f"{path.name} took {elapsed:.0f} s"


def test_same_text():
    assert _same_text("loss 0.43301 at [1 2]\n", "loss 0.4330100000001 at [1 2]\n")
    assert not _same_text("loss 0.43301\n", "loss 0.43302\n")
    assert not _same_text("Y_hat = [0 0 0 1]\n", "Y_hat = [0 0 1 1]\n")
    assert not _same_text("accuracy 0.95\n", "precision 0.95\n")


if __name__ == "__main__":  # write the outputs into the committed notebooks
    for path in sys.argv[1:] or NOTEBOOKS:
        nb = execute(nbformat.read(path, as_version=4))
        nbformat.write(nb, path)
        print(f"{path}: executed and saved")
