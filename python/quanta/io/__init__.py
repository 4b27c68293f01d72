"""Model-file readers: GGUF, safetensors and Hugging Face model folders.

Strict parsers for files downloaded from strangers: every size is checked before anything is
allocated, weights are memory-mapped read-only (never copied), nothing is unpickled, and a malformed
file raises ModelFileError (a ValueError) naming the field and byte offset.

    from quanta.io import read_gguf, read_safetensors, open_hf_folder
    g = read_gguf("model.gguf");  g.metadata["general.architecture"], g.tensors["token_embd.weight"].data
"""
from .errors import ModelFileError
from .gguf import GGUFFile, GGUFTensor, read_gguf
from .hf import HFFolder, open_hf_folder, read_json
from .safetensors import read_safetensors, save_safetensors

__all__ = ["GGUFFile", "GGUFTensor", "HFFolder", "ModelFileError", "open_hf_folder", "read_gguf", "read_json",
           "read_safetensors", "save_safetensors"]
