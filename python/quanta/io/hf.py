"""Hugging Face model folders: config.json, safetensors weights (one file or shards), tokenizer files.

A folder is read without running anything from it:
  - every file is named by a plain file name (no separator, no '..'), and the path it resolves to,
    symlinks followed, must be a regular file inside the folder. The one exception is the Hugging
    Face cache layout, where snapshots/<rev>/<file> links to blobs/<hash> of the same repository;
  - weights come only from model.safetensors or model.safetensors.index.json; pickle checkpoints
    (pytorch_model.bin, *.pt, ...) can execute code when loaded and are refused, never opened;
  - JSON is parsed strictly: duplicate keys, NaN/Infinity and oversized files are rejected.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

import numpy as np

from .errors import ModelFileError
from .safetensors import parse_json_strict, read_safetensors

__all__ = ["HFFolder", "open_hf_folder", "read_json"]

MAX_JSON_BYTES = 50 * 2**20
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def read_json(path, max_bytes: int = MAX_JSON_BYTES) -> dict:
    """A JSON object from `path`, parsed strictly: UTF-8, no duplicate keys, no NaN/Infinity,
    at most `max_bytes` bytes, top level an object. Raises ModelFileError otherwise."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise ModelFileError(path, "file size", None, f"{size} bytes exceeds the limit of {max_bytes}")
        raw = f.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise ModelFileError(path, "file size", None, f"more than {max_bytes} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ModelFileError(path, "json", e.start, f"invalid UTF-8 ({e.reason})") from None
    obj = parse_json_strict(text, path, "json", 0)
    if not isinstance(obj, dict):
        raise ModelFileError(path, "json", 0, f"top level must be an object, got {type(obj).__name__}")
    return obj


@dataclass(eq=False)
class HFFolder:
    """A validated model folder. `tensors` holds every tensor of every shard (read-only mmap views);
    `tokenizer_json` is the path of tokenizer.json, or None."""
    path: str
    config: dict = field(repr=False)
    tensors: dict[str, np.ndarray] = field(repr=False)
    tokenizer_json: str | None = None
    tokenizer_config: dict | None = field(default=None, repr=False)
    generation_config: dict | None = field(default=None, repr=False)
    weight_files: list[str] = field(default_factory=list)


def _inside(real: str, root: str) -> bool:
    return real != root and os.path.commonpath([real, root]) == root


class _Folder:
    """Resolves plain file names to regular files that stay inside the model folder."""

    def __init__(self, folder: str):
        self.root = os.path.realpath(folder)
        self.roots = [self.root]
        parent = os.path.dirname(self.root)
        if os.path.basename(parent) == "snapshots":       # <cache>/models--org--name/snapshots/<rev>
            self.roots.append(os.path.join(os.path.dirname(parent), "blobs"))

    def check_name(self, name, where: str, field: str) -> str:
        if (not isinstance(name, str) or not name or "/" in name or "\\" in name or ".." in name
                or "\0" in name or os.path.isabs(name) or os.path.splitdrive(name)[0]):
            raise ModelFileError(where, field, None, f"{name!r} is not a plain file name inside the folder")
        return name

    def find(self, name: str) -> str | None:
        """The resolved path of `name` in the folder, or None if there is no such entry."""
        p = os.path.join(self.root, name)
        if not os.path.lexists(p):
            return None
        real = os.path.realpath(p)
        if not any(_inside(real, r) for r in self.roots):
            raise ModelFileError(p, "path", None, f"resolves to {real}, outside the model folder {self.root}")
        try:
            st = os.stat(real)
        except OSError as e:
            raise ModelFileError(p, "path", None, f"cannot be read: {e.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise ModelFileError(p, "path", None, "is not a regular file")
        return real


def open_hf_folder(folder) -> HFFolder:
    """Read a Hugging Face model folder: config.json (required), weights from model.safetensors or
    the shards listed in model.safetensors.index.json (all validated; a tensor in two shards, or an
    index entry its shard lacks, is an error), and the optional tokenizer.json,
    tokenizer_config.json and generation_config.json. Raises ModelFileError for a malformed folder."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        if not os.path.exists(folder):
            raise FileNotFoundError(f"open_hf_folder: no such folder: {folder}")
        raise NotADirectoryError(f"open_hf_folder: not a folder: {folder}")
    d = _Folder(folder)

    config_path = d.find("config.json")
    if config_path is None:
        raise ModelFileError(d.root, "config.json", None, "missing (every model folder needs one)")
    config = read_json(config_path)

    single = d.find("model.safetensors")
    index = None if single else d.find("model.safetensors.index.json")
    if single:
        tensors, _ = read_safetensors(single)
        files = [single]
    elif index:
        tensors, files = _read_shards(d, index)
    else:
        pickles = sorted(n for n in os.listdir(d.root)
                         if n.endswith(_PICKLE_SUFFIXES) or n.endswith(".bin.index.json"))
        if pickles:
            raise ModelFileError(d.root, "weights", None,
                                 f"only pickle checkpoints found ({', '.join(pickles[:5])}); pickle files "
                                 "can execute code when loaded and are never loaded here. Use the model's "
                                 "safetensors files, or convert the checkpoint to safetensors")
        raise ModelFileError(d.root, "weights", None, "no model.safetensors or model.safetensors.index.json")

    tok = d.find("tokenizer.json")
    tok_cfg = d.find("tokenizer_config.json")
    gen_cfg = d.find("generation_config.json")
    return HFFolder(path=d.root, config=config, tensors=tensors, tokenizer_json=tok,
                    tokenizer_config=read_json(tok_cfg) if tok_cfg else None,
                    generation_config=read_json(gen_cfg) if gen_cfg else None, weight_files=files)


def _read_shards(d: _Folder, index_path: str):
    index = read_json(index_path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelFileError(index_path, "weight_map", None,
                             "must be a non-empty object of tensor name -> shard file")
    shards: dict[str, str] = {}          # shard file name -> resolved path, in first-use order
    for name, shard in weight_map.items():
        fld = f"weight_map[{name!r}]"
        d.check_name(shard, index_path, fld)
        if not shard.endswith(".safetensors"):
            raise ModelFileError(index_path, fld, None, f"shard {shard!r} is not a .safetensors file")
        if shard not in shards:
            real = d.find(shard)
            if real is None:
                raise ModelFileError(index_path, fld, None, f"shard {shard!r} does not exist in the folder")
            shards[shard] = real
    tensors: dict[str, np.ndarray] = {}
    owner: dict[str, str] = {}
    for shard, real in shards.items():
        part, _ = read_safetensors(real)
        for name, arr in part.items():
            if name in owner:
                raise ModelFileError(real, f"header[{name!r}]", None,
                                     f"tensor also stored in shard {owner[name]!r}")
            if weight_map.get(name) != shard:
                listed = weight_map.get(name)
                raise ModelFileError(index_path, f"weight_map[{name!r}]", None,
                                     f"shard {shard!r} holds this tensor but the index "
                                     + ("does not list it" if listed is None else f"maps it to {listed!r}"))
            owner[name] = shard
            tensors[name] = arr
    for name, shard in weight_map.items():
        if name not in tensors:
            raise ModelFileError(index_path, f"weight_map[{name!r}]", None,
                                 f"shard {shard!r} lacks this tensor")
    return tensors, list(shards.values())
