"""Errors the engine raises on purpose: each message names what is wrong and where."""


class LotteryError(Exception):
    """Base class of the engine's own errors."""


class CorruptArtifactError(LotteryError):
    """A checkpoint, mask or result file exists but cannot be trusted (truncated, bad checksum)."""


class WorkdirMismatchError(LotteryError):
    """A work directory already belongs to a different experiment configuration."""


class MissingArtifactError(LotteryError):
    """A step needs the output of an earlier step that has not been produced yet."""
