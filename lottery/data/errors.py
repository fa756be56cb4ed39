"""The data layer's errors: each message names the file (and the field or byte offset)."""
from __future__ import annotations

import os


class DataFormatError(ValueError):
    """A manifest or record does not follow the format; the message names the file and field."""

    def __init__(self, message: str, *, path: str | os.PathLike | None = None, field: str | None = None):
        super().__init__(message)
        self.path = None if path is None else str(path)
        self.field = field


class CorruptDataError(ValueError):
    """A TFRecord file failed a CRC check or is truncated; the message names the file and offset."""

    def __init__(self, message: str, *, path: str | os.PathLike | None = None, offset: int | None = None):
        super().__init__(message)
        self.path = None if path is None else str(path)
        self.offset = offset
