"""Native code never kills the user's process: no abort/exit/assert in csrc/ or cuda/, and
kernels stay free of Python headers."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCES = [p for d in ("csrc", "cuda") for p in (ROOT / d).rglob("*") if p.suffix in (".c", ".h", ".cu", ".cuh")]


def _code(path):
    text = path.read_text()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)  # comments may mention the words
    return re.sub(r"//[^\n]*", "", text)


def test_no_process_exits():
    bad = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in SOURCES
           for m in re.finditer(r"\b(abort|exit|assert|_Exit|quick_exit)\s*\(", _code(p))]
    assert SOURCES and not bad, bad


def test_kernels_are_plain_c():
    bad = [str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "kernels").rglob("*")
           if p.suffix in (".c", ".h") and re.search(r'#include\s*[<"](Python\.h|numpy/)', p.read_text())]
    assert not bad, bad
