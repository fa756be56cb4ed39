"""The engine's errors: each message names what is wrong and where.

Two kinds. A `PermanentError` is one that retrying cannot help (a corrupt or missing input, a file
that does not follow its format, a work directory of another experiment): the DAG fails the task
at once with its message. Any other `LotteryError` (a lock still held, a data worker that died) is
transient, and retried.
"""
from __future__ import annotations

import os


class LotteryError(Exception):
    """Base class of the engine's own errors; transient unless it is a `PermanentError`."""


class PermanentError(LotteryError):
    """Retrying cannot help: fix (or delete) the file or setting the message names, then rerun."""


def is_permanent(exc: BaseException) -> bool:
    return isinstance(exc, PermanentError)


class CorruptArtifactError(PermanentError):
    """A checkpoint, mask or result file exists but cannot be trusted (truncated, bad checksum)."""


class WorkdirMismatchError(PermanentError):
    """A work directory belongs to a different experiment configuration or format version."""


class MissingArtifactError(PermanentError):
    """A step needs the output of an earlier step that has not been produced yet."""


class NotComparableError(PermanentError):
    """Experiments asked to be compared that are on different data sets or models."""


class _DataError(PermanentError, ValueError):
    def __init__(self, message: str, *, path: str | os.PathLike | None = None):
        super().__init__(message)
        self.path = None if path is None else str(path)


class DataFormatError(_DataError):
    """A manifest or record does not follow the format; the message names the file and field."""

    def __init__(self, message: str, *, path: str | os.PathLike | None = None, field: str | None = None):
        super().__init__(message, path=path)
        self.field = field


class CorruptDataError(_DataError):
    """A shard failed its size, sha256 or CRC check, or is truncated; the message names the file
    (and the byte offset of a bad record)."""

    def __init__(self, message: str, *, path: str | os.PathLike | None = None, offset: int | None = None):
        super().__init__(message, path=path)
        self.offset = offset


class MissingDataError(PermanentError, FileNotFoundError):
    """An input file that must exist does not (a shard the manifest lists, a source archive)."""
