"""The config's error: every invalid field named at once, in words (``config field 'lr' = 0: must be greater than 0``).

A bad config cannot be fixed by retrying: ``ConfigError`` is a ``PermanentError`` (the DAG fails the
task at once) and a ``ValueError``. ``field_errors`` turns pydantic's errors into it.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from lottery.errors import PermanentError


class ConfigError(ValueError, PermanentError):
    """Invalid configuration values (retrying cannot help). The message names every field and its
    value; ``field`` and ``value`` are the first one's, ``errors`` lists them all as (field, value, reason)."""

    def __init__(self, field_name: str, value: Any, reason: str):
        self.field, self.value = field_name, value
        self.errors: list[tuple[str, Any, str]] = [(field_name, value, reason)]
        super().__init__(_describe(field_name, value, reason))

    @property
    def fields(self) -> list[str]:
        return [name for name, _, _ in self.errors]

    @classmethod
    def combine(cls, errors: list[ConfigError]) -> ConfigError:
        """One error that lists every field of ``errors``, in order: a user fixes them all at once."""
        items = [item for error in errors for item in error.errors]
        combined = cls(*items[0])
        if len(items) > 1:
            combined.errors = items
            combined.args = (f"{len(items)} config errors: " + "; ".join(_describe(*item) for item in items),)
        return combined


def _describe(field_name: str, value: Any, reason: str) -> str:
    return f"config field '{field_name}' = {value!r}: {reason}"


_KIND_WORDS = {"int_type": "must be an integer", "float_type": "must be a number", "bool_type": "must be true or false",
               "string_type": "must be a string", "tuple_type": "must be a list", "too_short": "must not be empty"}


def field_errors(exc: ValidationError, known: list[str]) -> list[ConfigError]:
    """One ``ConfigError`` per field, in words: unknown fields first, then values of the wrong kind, then the rest."""
    errors: dict[str, ConfigError] = {}
    for e in sorted(exc.errors(), key=lambda e: (e["type"] != "extra_forbidden", e["type"] not in _KIND_WORDS)):
        if e["type"] == "extra_forbidden":
            reason = f"unknown field; known fields: {', '.join(known)}"
        elif e["type"] == "value_error":
            reason = str(e["ctx"]["error"])
        else:
            reason = _KIND_WORDS.get(e["type"]) or e["msg"].replace("Input should be", "must be")
        errors.setdefault(str(e["loc"][0]), ConfigError(str(e["loc"][0]), e["input"], reason))
    return list(errors.values())


def errors_of(check) -> list[ConfigError]:
    """The ``ConfigError`` that ``check()`` raises, as a list (empty: it passed)."""
    try:
        check()
    except ConfigError as exc:
        return [exc]
    return []
