"""Hugging Face model folders and strict JSON; an audit hook shows that reading hostile files and
folders opens nothing outside them and unpickles nothing."""
import json
import os
import pathlib
import pickle
import sys

import numpy as np
import pytest
from quanta.io import (
    HFFolder,
    ModelFileError,
    open_hf_folder,
    read_gguf,
    read_json,
    read_safetensors,
    save_safetensors,
)
from test_io_gguf import CORPUS as GGUF_CORPUS
from test_io_safetensors import CORPUS as SAFETENSORS_CORPUS

CONFIG = {"architectures": ["LlamaForCausalLM"], "hidden_size": 8, "num_hidden_layers": 1, "rope_theta": 1e4}


def write_json(path, obj):
    pathlib.Path(path).write_text(json.dumps(obj))


def make_folder(root, shards=None, index=None, extras=True):
    """A model folder: config.json, weights (one file, or `shards` name -> tensors with an index),
    and tokenizer files."""
    root = pathlib.Path(root)
    root.mkdir(parents=True, exist_ok=True)
    write_json(root / "config.json", CONFIG)
    if shards is None:
        save_safetensors(root / "model.safetensors", {"embed": np.ones((4, 8), np.float32),
                                                       "norm": np.arange(8, dtype=np.float32)})
    else:
        for name, tensors in shards.items():
            save_safetensors(root / name, tensors)
        if index is None:
            index = {k: name for name, tensors in shards.items() for k in tensors}
        write_json(root / "model.safetensors.index.json", {"metadata": {"total_size": 0}, "weight_map": index})
    if extras:
        write_json(root / "tokenizer.json", {"model": {"type": "BPE"}})
        write_json(root / "tokenizer_config.json", {"eos_token": "</s>"})
        write_json(root / "generation_config.json", {"eos_token_id": [1, 2]})
    return root


def two_shards():
    return {"model-00001-of-00002.safetensors": {"a": np.ones(3, np.float32), "b": np.zeros((2, 2), np.int8)},
            "model-00002-of-00002.safetensors": {"c": np.full(4, 2.5, np.float32)}}


# ---- read_json ---------------------------------------------------------------------------------

def test_read_json_strict(tmp_path):
    p = tmp_path / "c.json"
    p.write_text('{"a": [1, 2.5, "x", null, true], "b": {"c": "ü"}}')
    assert read_json(p) == {"a": [1, 2.5, "x", None, True], "b": {"c": "ü"}}
    bad = {
        '{"a": 1, "a": 2}': "duplicate key 'a'",
        '{"a": {"b": 1, "b": 1}}': "duplicate key 'b'",
        '{"a": NaN}': "NaN",
        '{"a": Infinity}': "Infinity",
        '{"a": -Infinity}': "Infinity",
        '[1, 2]': "must be an object",
        '"text"': "must be an object",
        '{"a": 1': "invalid JSON",
        '': "invalid JSON",
        '{"a": ' + "[" * 50000 + "]" * 50000 + "}": "nested too deeply",
    }
    for text, msg in bad.items():
        p.write_text(text)
        with pytest.raises(ModelFileError, match=msg) as info:
            read_json(p)
        assert info.value.field == "json"
    p.write_bytes(b'{"a": "\xff"}')
    with pytest.raises(ModelFileError, match="UTF-8") as info:
        read_json(p)
    assert info.value.offset == 7
    p.write_text('{"a": "' + "x" * 2000 + '"}')
    with pytest.raises(ModelFileError, match="exceeds the limit") as info:
        read_json(p, max_bytes=1000)
    assert info.value.field == "file size"


# ---- folders -----------------------------------------------------------------------------------

def test_single_file_folder(tmp_path):
    root = make_folder(tmp_path / "m")
    f = open_hf_folder(root)
    assert isinstance(f, HFFolder) and f.path == str(root.resolve())
    assert f.config == CONFIG
    assert set(f.tensors) == {"embed", "norm"} and not f.tensors["norm"].flags.writeable
    np.testing.assert_array_equal(f.tensors["norm"], np.arange(8, dtype=np.float32))
    assert f.tokenizer_json == str(root.resolve() / "tokenizer.json")
    assert f.tokenizer_config == {"eos_token": "</s>"} and f.generation_config == {"eos_token_id": [1, 2]}
    assert f.weight_files == [str(root.resolve() / "model.safetensors")]


def test_optional_files_absent(tmp_path):
    f = open_hf_folder(make_folder(tmp_path / "m", extras=False))
    assert f.tokenizer_json is None and f.tokenizer_config is None and f.generation_config is None


def test_sharded_folder(tmp_path):
    root = make_folder(tmp_path / "m", shards=two_shards())
    f = open_hf_folder(str(root))
    assert sorted(f.tensors) == ["a", "b", "c"]
    np.testing.assert_array_equal(f.tensors["c"], np.full(4, 2.5, np.float32))
    assert [os.path.basename(p) for p in f.weight_files] == list(two_shards())


def test_hf_cache_layout(tmp_path):
    """snapshots/<rev>/<file> -> ../../blobs/<hash> (how huggingface_hub stores downloads) is allowed."""
    repo = tmp_path / "models--org--tiny"
    src = make_folder(tmp_path / "src")
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    for i, name in enumerate(sorted(os.listdir(src))):
        os.replace(src / name, repo / "blobs" / f"blob{i}")
        os.symlink(f"../../blobs/blob{i}", snap / name)
    f = open_hf_folder(snap)
    assert set(f.tensors) == {"embed", "norm"} and f.config == CONFIG


def test_symlink_inside_folder_allowed(tmp_path):
    root = make_folder(tmp_path / "m", extras=False)
    (root / "sub").mkdir()
    os.replace(root / "model.safetensors", root / "sub" / "weights.safetensors")
    os.symlink("sub/weights.safetensors", root / "model.safetensors")
    assert set(open_hf_folder(root).tensors) == {"embed", "norm"}


@pytest.mark.parametrize("case", ["dup_across_shards", "index_names_missing", "shard_lists_unindexed",
                                  "mapped_to_other_shard", "missing_shard", "not_safetensors", "weight_map_list",
                                  "no_weight_map", "shard_name_int", "bad_shard"])
def test_sharded_folder_errors(tmp_path, case):
    shards = two_shards()
    index = {k: name for name, tensors in shards.items() for k in tensors}
    first, second = list(shards)
    expect = {
        "dup_across_shards": "also stored in shard",
        "index_names_missing": "lacks this tensor",
        "shard_lists_unindexed": "does not list it",
        "mapped_to_other_shard": "maps it to",
        "missing_shard": "does not exist",
        "not_safetensors": "not a .safetensors file",
        "weight_map_list": "weight_map",
        "no_weight_map": "weight_map",
        "shard_name_int": "not a plain file name",
        "bad_shard": "header_length",
    }[case]
    if case == "dup_across_shards":
        shards[second]["a"] = np.ones(3, np.float32)
    elif case == "index_names_missing":
        index["ghost"] = second
    elif case == "shard_lists_unindexed":
        del index["b"]
    elif case == "mapped_to_other_shard":
        index["b"] = second
    elif case == "missing_shard":
        index["c"] = "model-00009-of-00009.safetensors"
    elif case == "not_safetensors":
        index["c"] = "config.json"
    elif case == "weight_map_list":
        index = [first]
    elif case == "shard_name_int":
        index["c"] = 7
    root = make_folder(tmp_path / "m", shards=shards, index=index)
    if case == "no_weight_map":
        write_json(root / "model.safetensors.index.json", {"metadata": {}})
    if case == "bad_shard":
        (root / second).write_bytes(b"\x01\x02")
    with pytest.raises(ModelFileError, match=expect) as info:
        open_hf_folder(root)
    assert info.value.field


def test_folder_level_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        open_hf_folder(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        open_hf_folder(tmp_path / "file")
    root = make_folder(tmp_path / "m")
    os.remove(root / "config.json")
    with pytest.raises(ModelFileError, match="config.json.*missing"):
        open_hf_folder(root)
    (root / "config.json").write_text('{"a": 1, "a": 1}')
    with pytest.raises(ModelFileError, match="duplicate key"):
        open_hf_folder(root)
    write_json(root / "config.json", CONFIG)
    os.remove(root / "model.safetensors")
    with pytest.raises(ModelFileError, match="no model.safetensors"):
        open_hf_folder(root)
    os.mkfifo(root / "model.safetensors")       # opening a FIFO would block forever
    with pytest.raises(ModelFileError, match="not a regular file"):
        open_hf_folder(root)


# ---- hostile folders, watched by an audit hook -------------------------------------------------

class _Payload:
    """Pickles to a call that creates `marker`: proof of execution if anything unpickled it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def hostile_folders(base: pathlib.Path):
    """label -> (folder, text the error must contain); files outside the folders are valid bait."""
    outside = base / "outside.safetensors"
    save_safetensors(outside, {"w": np.ones(2, np.float32)})
    write_json(base / "outside.json", CONFIG)
    out = {}

    def folder(label, index=None, **links):
        root = make_folder(base / label, shards={"model-00001-of-00001.safetensors": {"w": np.ones(2, np.float32)}},
                           index=index)
        for name, target in links.items():
            name = name.replace("__", ".").replace("_", "-")
            os.remove(root / name) if os.path.lexists(root / name) else None
            os.symlink(target, root / name)
        return root

    out["index ../"] = (folder("dotdot", {"w": "../outside.safetensors"}), "not a plain file name")
    out["index ..\\"] = (folder("backslash", {"w": "..\\outside.safetensors"}), "not a plain file name")
    out["index absolute"] = (folder("absolute", {"w": str(outside)}), "not a plain file name")
    out["index subfolder"] = (folder("subdir", {"w": "sub/x.safetensors"}), "not a plain file name")
    out["shard symlink out"] = (folder("shardlink", **{"model-00001-of-00001__safetensors": str(outside)}),
                                "outside the model folder")
    out["relative symlink out"] = (folder("rellink", **{"model-00001-of-00001__safetensors":
                                                        "../outside.safetensors"}), "outside the model folder")
    out["config symlink out"] = (folder("configlink", config__json=str(base / "outside.json")),
                                 "outside the model folder")
    out["tokenizer symlink out"] = (folder("toklink", tokenizer__json=str(base / "outside.json")),
                                    "outside the model folder")
    pk = base / "pickle_only"
    pk.mkdir()
    write_json(pk / "config.json", CONFIG)
    (pk / "pytorch_model.bin").write_bytes(pickle.dumps({"w": _Payload(base / "PWNED")}))
    (pk / "training_args.pt").write_bytes(pickle.dumps(_Payload(base / "PWNED")))
    out["pickle only"] = (pk, "pickle")
    return out


_AUDIT = {"on": False, "opens": [], "forbidden": []}
_HOOK_INSTALLED = False
_FORBIDDEN = ("pickle.find_class", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen")


def _audit_hook(event, args):
    # Audit hooks cannot be removed; outside a recording window this returns at once.
    if not _AUDIT["on"]:
        return
    if event == "open":
        _AUDIT["opens"].append(args[0])
    elif event in _FORBIDDEN:
        _AUDIT["forbidden"].append(event)


@pytest.fixture
def audit():
    global _HOOK_INSTALLED
    if not _HOOK_INSTALLED:
        sys.addaudithook(_audit_hook)
        _HOOK_INSTALLED = True

    class Recorder:
        def __enter__(self):
            _AUDIT["opens"].clear()
            _AUDIT["forbidden"].clear()
            _AUDIT["on"] = True
            return self

        def __exit__(self, *exc):
            _AUDIT["on"] = False
            self.opens = [os.path.realpath(os.fsdecode(p)) for p in _AUDIT["opens"] if not isinstance(p, int)]
            self.forbidden = list(_AUDIT["forbidden"])

        def outside(self, root):
            root = os.path.realpath(root)
            return [p for p in self.opens if os.path.commonpath([p, root]) != root]

    yield Recorder
    _AUDIT["on"] = False


def test_audit_hook_sees_our_opens(tmp_path, audit):
    """The hook works: a valid folder's reads are recorded, all inside the folder."""
    root = make_folder(tmp_path / "m", shards=two_shards())
    with audit() as rec:
        open_hf_folder(root)
    names = {os.path.basename(p) for p in rec.opens}
    assert {"config.json", "model.safetensors.index.json", *two_shards()} <= names
    assert rec.outside(root) == [] and rec.forbidden == []
    with audit() as rec:
        (tmp_path / "elsewhere.txt").write_text("x")
    assert rec.outside(root) == [str((tmp_path / "elsewhere.txt").resolve())]
    with audit() as rec:
        pickle.loads(pickle.dumps(_Payload(tmp_path / "marker")))
    assert "pickle.find_class" in rec.forbidden         # the hook would see an unpickle


def test_hostile_inputs_open_nothing_outside(tmp_path, audit):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    files = []
    for i, (_, raw, _) in enumerate(GGUF_CORPUS):
        files.append((read_gguf, corpus / f"{i}.gguf"))
        files[-1][1].write_bytes(raw)
    for i, (_, raw, _) in enumerate(SAFETENSORS_CORPUS):
        files.append((read_safetensors, corpus / f"{i}.safetensors"))
        files[-1][1].write_bytes(raw)
    with audit() as rec:
        rejected = 0
        for reader, path in files:
            try:
                reader(path)
            except ModelFileError:
                rejected += 1
    assert rejected == len(files) and len(rec.opens) == len(files)
    assert rec.outside(corpus) == [] and rec.forbidden == []

    hf = tmp_path / "hf"
    hf.mkdir()
    folders = hostile_folders(hf)
    for label, (root, msg) in folders.items():
        with audit() as rec, pytest.raises(ModelFileError, match=msg):
            open_hf_folder(root)
        assert rec.outside(root) == [], (label, rec.opens)
        assert rec.forbidden == [], label
        assert not any("outside" in os.path.basename(p) or p.endswith((".bin", ".pt")) for p in rec.opens), label
    assert not (hf / "PWNED").exists()


def test_pickles_beside_safetensors_are_ignored(tmp_path, audit):
    root = make_folder(tmp_path / "m")
    (root / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(tmp_path / "PWNED")))
    with audit() as rec:
        f = open_hf_folder(root)
    assert set(f.tensors) == {"embed", "norm"}
    assert not any(p.endswith(".bin") for p in rec.opens) and rec.forbidden == []
    assert not (tmp_path / "PWNED").exists()
