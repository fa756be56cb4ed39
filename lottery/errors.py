"""Exceptions shared across the engine."""


class LotteryError(Exception):
    """Base class of the engine's own errors."""


class CorruptArtifactError(LotteryError):
    """An artifact on disk (mask, checkpoint, report) is missing, truncated
    or does not match its recorded checksum. The message names the file."""
