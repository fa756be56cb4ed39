"""The job's failures and its exit statuses. `InputError` and `DataError` are permanent engine
errors (a rerun with the same input fails the same way); `ClusterError` is not (the same run
succeeds once the Spark cluster is back)."""
from __future__ import annotations

from lottery.errors import LotteryError, PermanentError

EXIT_OK, EXIT_DATA, EXIT_USAGE, EXIT_CLUSTER = 0, 1, 2, 3


class InputError(PermanentError):
    """Bad arguments, input root or output path: nothing was written (exit 2)."""


class DataError(PermanentError):
    """The data failed a check (bad-file threshold, empty class, mixed sizes): exit 1."""


class ClusterError(LotteryError):
    """The Spark master is unreachable, or no executor registered within the bound: exit 3,
    nothing written."""
