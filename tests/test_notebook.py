"""notebooks/quickstart.ipynb runs top to bottom in a fresh kernel and shows what it says.

Skips without nbformat, nbclient, ipykernel or matplotlib, and without the default model.
Cells the checks read carry a tag (cell metadata "tags") naming them.
"""
import os
import pathlib
import re

import pytest

import quanta
from quanta.models import default_model_path

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"


@pytest.fixture(scope="module")
def executed():
    try:
        default_model_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    env = dict(os.environ)
    env["MPLBACKEND"] = "Agg"
    # the kernel imports the same quanta as the tests (an installed or a PYTHONPATH copy)
    pkg_parent = str(pathlib.Path(quanta.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_parent, env.get("PYTHONPATH")) if p)
    # Results do not depend on the thread count; one thread keeps the run short on a
    # shared machine, where OpenMP barriers wait on descheduled threads.
    env.setdefault("OMP_NUM_THREADS", "1")
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute(env=env)  # raises CellExecutionError on the first failing cell
    return nb


def _cell(nb, tag):
    cells = [c for c in nb.cells if tag in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"expected one cell tagged {tag!r}, found {len(cells)}"
    return cells[0]


def _stdout(cell) -> str:
    return "".join(o["text"] for o in cell.outputs if o["output_type"] == "stream" and o["name"] == "stdout")


def test_notebook_has_no_stored_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


def test_runs_without_errors(executed):
    errors = [o for c in executed.cells if c.cell_type == "code"
              for o in c.outputs if o["output_type"] == "error"]
    assert not errors, errors


def test_generation(executed):
    assert "Paris" in _stdout(_cell(executed, "generate"))
    assert len(_stdout(_cell(executed, "stream")).strip()) > 20
    assert "Rome" in _stdout(_cell(executed, "chat"))


def test_qmatmul_matches_dequantized_product(executed):
    m = re.search(r"relative L2 error ([0-9.e+-]+)", _stdout(_cell(executed, "qmatmul")))
    assert m, _stdout(_cell(executed, "qmatmul"))
    assert float(m.group(1)) < 2e-2  # int8 rounding of x, not a wrong product


def test_format_table(executed):
    out = _stdout(_cell(executed, "formats"))
    assert "skipped: q4_k: K = 576" in out and "skipped: int4_g128: K = 576" in out
    rows, layer = {}, None  # (layer, format) -> (weight error, output error)
    for line in out.splitlines():
        head = re.match(r"(\w+) \(K = \d+\)$", line)
        row = re.match(r"  (\S+) +[0-9.]+ +([0-9.e+-]+) +([0-9.e+-]+)$", line)
        if head:
            layer = head.group(1)
        elif row:
            rows[(layer, row.group(1))] = (float(row.group(2)), float(row.group(3)))
    assert ("down", "q4_k") in rows and ("gate_up", "nf4") in rows
    for layer in ("gate_up", "down"):
        assert rows[(layer, "q4_1")][0] == 0.0  # the model's own grid comes back exactly
        assert rows[(layer, "q8_0")][1] < rows[(layer, "q4_0")][1]


def test_plot_is_inline_png(executed):
    outputs = _cell(executed, "plot").outputs
    assert any("image/png" in o.get("data", {}) for o in outputs), outputs


def test_nll_comparison(executed):
    out = _stdout(_cell(executed, "nll"))
    nll = dict(re.findall(r"^(.+?) +mean NLL ([0-9.]+)", out, re.MULTILINE))
    stored, q8, q4 = (float(nll[k]) for k in ("as stored (q4_1)", "q8_0", "q4_0"))
    assert abs(q8 - stored) < 0.02 and q4 > stored
