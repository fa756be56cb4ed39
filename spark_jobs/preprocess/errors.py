"""The job's two failures and its exit statuses."""
from __future__ import annotations

EXIT_OK, EXIT_DATA, EXIT_USAGE = 0, 1, 2


class InputError(Exception):
    """Bad arguments, input root or output path: nothing was written (exit 2)."""


class DataError(Exception):
    """The data failed a check (bad-file threshold, empty class, mixed sizes): exit 1."""
