"""The ``lottery_compare`` DAG's params and task: one comparison plot and table of finished
experiments on the same data and model (one-shot against iterative pruning, one rewind mode against
another), from their work directories or replicate sets (`lottery.compare.compare`).

Each experiment is named by its directory under the artifact root (an experiment id such as
``lenet_300_100-061218bbb9a0``, or a replicate set such as ``lenet_300_100-061218bbb9a0-x3``) or by
its absolute path in an allowed artifact root. The comparison is written to
``<artifact_root>/comparisons/<name>/`` (comparison.png, comparison.md).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Any

from airflow.sdk import Param, get_current_context
from airflow.sdk.exceptions import AirflowFailException

from lottery.config import ConfigError
from lottery.deploy.constants import ALLOWED_ARTIFACT_ROOTS_ENV
from lottery.deploy.roots import allowed_artifact_roots, path_problem
from lottery.errors import is_permanent

log = logging.getLogger("lottery.dag")

COMPARE_DAG_ID = "lottery_compare"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$"
ARTIFACT_ROOTS = allowed_artifact_roots()

COMPARE_PARAMS = {
    "experiments": Param(
        [], type="array", items={"type": "string", "minLength": 1}, title="Experiments to compare",
        description="Two or more, one per line: an experiment id or a replicate set's name (`<id>-x3`) under the artifact "
        "root, or the absolute path of a work directory or replicate set. Same data set and model.",
    ),
    "artifact_root": Param(ARTIFACT_ROOTS[0], type="string", minLength=1, title="Artifact root",
                           description=f"Where the experiments are, and the comparison goes: {', '.join(ARTIFACT_ROOTS)}."),
    "name": Param(None, type=["null", "string"], title="Comparison name",
                  description="The directory under `<artifact_root>/comparisons/`; empty: a hash of the experiments' names."),
    "rewinds": Param([], type="array", items={"type": "string"}, title="Rewind points",
                     description="Only these rewind points (e.g. `1ep`); empty: those the experiments share."),
}


def experiment_paths(params: dict[str, Any]) -> tuple[list[Path], Path]:
    """The experiments' directories and the comparison's, checked: a ``ConfigError`` names every bad value."""
    root, names, errors = params["artifact_root"], list(params.get("experiments") or []), []
    problem = path_problem(root, allowed_artifact_roots(os.environ), ALLOWED_ARTIFACT_ROOTS_ENV)
    if problem:
        raise ConfigError("artifact_root", root, problem)
    if len(names) < 2:
        errors.append(ConfigError("experiments", names, "names fewer than two experiments"))
    paths = []
    for name in names:
        path = Path(name) if name.startswith("/") else Path(root) / name
        problem = path_problem(str(path), [root], "artifact_root") if name.startswith("/") or re.fullmatch(NAME_PATTERN, name) else (
            "is neither an experiment's name under the artifact root nor an absolute path")
        if problem is None and not ((path / "config.json").exists() or (path / "replicates.json").exists()):
            problem = f"is not a work directory or replicate set ({path} has no config.json or replicates.json)"
        if problem:
            errors.append(ConfigError("experiments", name, problem))
        paths.append(path)
    name = params.get("name") or hashlib.sha256("\n".join(sorted(str(p) for p in paths)).encode()).hexdigest()[:12]
    if not re.fullmatch(NAME_PATTERN, name):
        errors.append(ConfigError("name", name, f"must match {NAME_PATTERN}"))
    if errors:
        raise ConfigError.combine(errors)
    return paths, Path(root) / "comparisons" / name


def compare_experiments() -> dict[str, Any]:
    """The task: check the params, write the comparison, log where it is."""
    from lottery.compare import compare

    params = dict(get_current_context()["params"])
    try:
        paths, out = experiment_paths(params)
    except ConfigError as exc:
        for field, value, reason in exc.errors:
            log.error("param %r = %r: %s", field, value, reason)
        raise AirflowFailException(str(exc)) from exc
    log.info("compare: start  %d experiments -> %s", len(paths), out)
    try:
        written = compare([str(p) for p in paths], out, rewinds=list(params.get("rewinds") or []) or None)
    except Exception as exc:  # different models or data sets, a damaged result: retrying cannot help
        if isinstance(exc, ValueError) or is_permanent(exc):
            raise AirflowFailException(f"{type(exc).__name__}: {exc}") from exc
        raise
    for experiment in written["experiments"]:
        log.info("compare: %s = %s (%d replicates)", experiment["label"], experiment["path"], experiment["replicates"])
    log.info("compare: done  %s, %s", written["plot"], written["table"])
    return {"plot": written["plot"], "table": written["table"]}
