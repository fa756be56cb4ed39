"""Where a run may write (``artifact_root``) and read (``dataset``): the deployment's choice, not the trigger's.

The deployment lists the allowed roots in the environment of the dag-processor, the scheduler and
the workers, which whoever may trigger the DAG cannot change (README, "Security"):

* ``LOTTERY_ALLOWED_ARTIFACT_ROOTS``: the directories a run's ``artifact_root`` may be in or under
  (``os.pathsep``-separated). The deployment's own artifact root (``LOTTERY_ARTIFACT_ROOT``, by
  default the project's ``artifacts/``) is always allowed.
* ``LOTTERY_ALLOWED_DATA_ROOTS``: the directories an image-folder ``dataset`` may be in or under.
  Default: none, so only the bundled ``fashion_mnist`` is read.

``path_problem`` refuses a path, naming the allowed roots, when it is not spelled as a plain
absolute path under a root (``..``, ``//``, control characters, ``artifacts-old``, a Cyrillic ``а``)
or when it resolves outside every resolved root (a symlink inside a root that points out of it).
The trigger form only names the roots: its JSON-schema check would stop at the first bad field and
answer with a regex.

Pure Python: the DAG file imports it at parse time.
"""

from __future__ import annotations

import os
import re
from typing import Iterable, Mapping

from lottery.deploy.constants import ALLOWED_ARTIFACT_ROOTS_ENV, ALLOWED_DATA_ROOTS_ENV, ARTIFACT_ROOT

# One path component: not "." or "..", no "/" and no control character (a NUL ends a C string).
_COMPONENT = r"(?!\.\.?(?:/|$))[^/\x00-\x1f\x7f]+"


def normalize_root(root: str, env_name: str) -> str:
    """An allowed root as configured, made canonical (``/a/b/`` -> ``/a/b``); a relative one is an error."""
    if not os.path.isabs(root):
        raise ValueError(f"{env_name}: {root!r} is not an absolute path")
    return os.path.normpath(root).replace("//", "/")


def parse_roots(text: str | None, env_name: str) -> tuple[str, ...]:
    """The ``os.pathsep``-separated list of an environment variable, canonical, duplicates dropped."""
    roots = [normalize_root(part.strip(), env_name) for part in (text or "").split(os.pathsep) if part.strip()]
    return tuple(dict.fromkeys(roots))


def allowed_artifact_roots(environ: Mapping[str, str] = os.environ) -> tuple[str, ...]:
    """The deployment's artifact root (always) and ``LOTTERY_ALLOWED_ARTIFACT_ROOTS``."""
    own = environ.get("LOTTERY_ARTIFACT_ROOT") or ARTIFACT_ROOT
    return tuple(dict.fromkeys((normalize_root(own, "LOTTERY_ARTIFACT_ROOT"),
                                *parse_roots(environ.get(ALLOWED_ARTIFACT_ROOTS_ENV), ALLOWED_ARTIFACT_ROOTS_ENV))))


def allowed_data_roots(environ: Mapping[str, str] = os.environ) -> tuple[str, ...]:
    """``LOTTERY_ALLOWED_DATA_ROOTS`` (default: none: only the bundled Fashion-MNIST)."""
    return parse_roots(environ.get(ALLOWED_DATA_ROOTS_ENV), ALLOWED_DATA_ROOTS_ENV)


def _spellings(roots: Iterable[str]) -> list[str]:
    """Each root as configured and resolved (``/tmp`` is ``/private/tmp`` on macOS): both spellings are accepted."""
    out: list[str] = []
    for root in roots:
        for spelling in (root, os.path.realpath(root)):
            if spelling not in out:
                out.append(spelling)
    return out


def root_pattern(roots: Iterable[str]) -> str | None:
    """A regular expression for a plain absolute path in or under one of ``roots`` (one trailing
    ``/`` allowed); None when there is no root."""
    prefixes = ["" if r == "/" else re.escape(r) for r in _spellings(roots)]
    if not prefixes:
        return None
    # The lookahead refuses a control character anywhere: Python's "$" also matches before a final "\n".
    return f"(?![\\s\\S]*[\\x00-\\x1f\\x7f])(?=/)(?:{'|'.join(prefixes)})(?:/{_COMPONENT})*/?"


def path_problem(path: str, roots: Iterable[str], env_name: str) -> str | None:
    """Why ``path`` may not be used (None when it may): not a plain path under a root, or it
    resolves (symlinks, ``..``) outside every resolved root."""
    roots = tuple(roots)
    where = f"{', '.join(roots) or 'none'} (the deployment's {env_name})"
    pattern = root_pattern(roots)
    if not isinstance(path, str) or pattern is None or re.fullmatch(pattern, path) is None:
        return (f"must be a plain absolute path ('..', '.', '//' and control characters are refused) "
                f"in or under an allowed root: {where}")
    real = os.path.realpath(path)
    for root in roots:
        real_root = os.path.realpath(root)
        if real == real_root or real.startswith(real_root.rstrip("/") + "/"):
            return None
    return f"resolves to {real}, outside the allowed roots ({where})"
