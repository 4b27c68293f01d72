"""Read-only memory maps for the file readers: sized from the open file before mapping, so every
later bounds check compares against the bytes that really exist."""
from __future__ import annotations

import mmap
import os

from .errors import ModelFileError


def map_file(path: str, field: str, min_size: int) -> tuple[mmap.mmap, int]:
    """(read-only mapping of the whole file, its size); a file under `min_size` bytes is rejected
    as truncated at `field` (mmap cannot map an empty file)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < min_size:
            raise ModelFileError(path, field, 0, f"file has {size} bytes; needs at least {min_size}")
        return mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ), size


def release(mm: mmap.mmap) -> None:
    """Unmap now unless an array still views the mapping (it is then unmapped with the last view)."""
    try:
        mm.close()
    except BufferError:
        pass
