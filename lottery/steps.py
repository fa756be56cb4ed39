"""Points in training written as step strings: ``4ep``, ``500it``, ``2ep100it`` (OpenLTH's Step).

The one parser of step strings (``Step.parse``), and the config's step-string field types built on it.
Pure Python and pydantic: the DAG file imports it at parse time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import AfterValidator, Field, Strict

STEP_HELP = "a step string like '4ep', '500it' or '2ep100it'"
_STEP_RE = re.compile(r"^\s*(?:(\d+)\s*ep)?\s*(?:(\d+)\s*it)?\s*$")


@dataclass(frozen=True, order=True)
class Step:
    """A point in training: ``ep`` whole epochs plus ``it`` iterations."""

    ep: int = 0
    it: int = 0

    @classmethod
    def parse(cls, text: str | Step) -> Step:
        """``"2ep100it"`` -> ``Step(2, 100)``; a ``ValueError`` in words for anything else."""
        if isinstance(text, Step):
            return text
        match = _STEP_RE.match(text) if isinstance(text, str) else None
        if match is None or match.groups() == (None, None):
            raise ValueError(f"must be {STEP_HELP}, not {text!r}")
        ep, it = match.groups()
        return cls(int(ep or 0), int(it or 0))

    def iterations(self, steps_per_epoch: int) -> int:
        return self.ep * steps_per_epoch + self.it

    def __str__(self) -> str:
        """The canonical spelling: ``2ep``, ``500it``, ``2ep100it``, ``0it``."""
        return (f"{self.ep}ep" if self.ep else "") + (f"{self.it}it" if self.it or not self.ep else "")

    def surely_after(self, total: Step) -> bool:
        """Whether this step is after ``total`` for every epoch length (an epoch has >= 1 iteration)."""
        if self.ep > total.ep:  # the gap grows with the epoch length: smallest at one iteration per epoch
            return (self.ep - total.ep) + self.it > total.it
        return self.ep == total.ep and self.it > total.it


def distinct(values: tuple, key=lambda value: value) -> tuple:
    """``values`` unchanged, or a ``ValueError`` naming the first entry that repeats an earlier one."""
    seen: dict[Any, Any] = {}
    for value in values:
        if key(value) in seen:
            raise ValueError(f"{value!r} repeats {seen[key(value)]!r}")
        seen[key(value)] = value
    return values


def _valid(text: str) -> str:
    Step.parse(text)
    return text


def _nonzero(text: str) -> str:
    if Step.parse(text) == Step(0, 0):
        raise ValueError("must be longer than zero")
    return text


# A step string, kept as written (the id compares canonical spellings); a list of distinct ones; a length > 0.
# The trigger form refuses what is no step string at all before the run is created (validate_config
# checks the rest: zero lengths, repeats, points past the end of training).
STEP_PATTERN = r"^\s*(\d+\s*ep\s*(\d+\s*it)?|\d+\s*it)\s*$"
StepText = Annotated[str, Strict(), AfterValidator(_valid), Field(json_schema_extra={"pattern": STEP_PATTERN})]
StepList = Annotated[tuple[StepText, ...], AfterValidator(lambda texts: distinct(texts, Step.parse))]
Length = Annotated[StepText, AfterValidator(_nonzero)]
