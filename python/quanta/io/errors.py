"""The one exception every model-file reader raises for a malformed file.

A message always names the file, the field that is wrong and, where the format has one, the byte
offset of that field, e.g. ``model.gguf: tensor_info[3].dims at byte 1184: product ... exceeds ...``.
"""
from __future__ import annotations

import os


class ModelFileError(ValueError):
    """A model file is malformed.

    Attributes: ``path`` (str), ``field`` (the part of the file that is wrong), ``offset`` (byte
    offset of that field in the file, or None where no offset applies, e.g. a JSON value).
    """

    def __init__(self, path, field: str, offset: int | None, message: str):
        self.path = os.fspath(path) if path is not None else "<unknown>"
        self.field = field
        self.offset = offset
        self.message = message
        if offset is None:
            text = f"{self.path}: {field}: {message}"
        else:
            text = f"{self.path}: {field} at byte {offset}: {message}"
        super().__init__(text)

    def __reduce__(self):
        # Exceptions pickle as cls(*args); ours has four arguments, not the formatted text.
        return (type(self), (self.path, self.field, self.offset, self.message))
