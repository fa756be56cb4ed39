"""The work directory of one experiment: the only module that spells its paths.

    W/config.json                       the experiment config (written once, by `prepare`)
    W/run.json                          experiment id, data directory, data set id
    W/dense/result.json                 the dense run: accuracy, curve, rewind steps
    W/dense/checkpoint.npz, metrics.csv resume point (deleted when done) and per-epoch metrics
    W/dense/final.keras                 the final dense weights (the masks are computed from it)
    W/dense/rewind/<label>.npz          weights + optimizer state at each rewind point
    W/masks/<mask id>.npz, index.json   one magnitude mask per sparsity level
    W/tickets/<ticket name>/            result.json, error.json, checkpoint.npz, metrics.csv,
                                        model.keras and (random_prune) mask.npz
    W/results.csv, W/report/            the report: report.md and accuracy_vs_sparsity.png

In the manner of OpenLTH's ``paths.py``: properties, no I/O except `prepare`, `load` and `status`.
No TensorFlow, Keras or NumPy at import time. Layout documented in docs/artifacts.md.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lottery.config import ExperimentConfig, experiment_id
from lottery.errors import MissingArtifactError, WorkdirMismatchError
from lottery.plan import RunPlan, TicketSpec

RESULTS_CSV = "results.csv"
PLOT_NAME = "accuracy_vs_sparsity.png"
REPORT_NAME = "report.md"
TICKETS = "tickets"
RESULT_JSON = "result.json"


def dataset_id(data_dir: str | os.PathLike) -> str:
    """The id the preprocessing job wrote into the data directory's manifest."""
    from lottery.data import read_manifest

    return read_manifest(data_dir)["dataset_id"]


@dataclass(frozen=True)
class TicketPaths:
    """The files of one ticket (or control) directory."""

    dir: Path

    @property
    def result(self) -> Path:
        return self.dir / RESULT_JSON

    @property
    def error(self) -> Path:
        return self.dir / "error.json"

    @property
    def checkpoint(self) -> Path:
        return self.dir / "checkpoint.npz"

    @property
    def metrics(self) -> Path:
        return self.dir / "metrics.csv"

    @property
    def model(self) -> Path:
        return self.dir / "model.keras"

    @property
    def mask(self) -> Path:
        """The random mask of a ``random_prune`` control."""
        return self.dir / "mask.npz"


@dataclass
class WorkdirStatus:
    """What is done and what is not, for the tickets and controls of one plan."""

    dense_done: bool
    masks_done: bool
    done: list[TicketSpec] = field(default_factory=list)
    failed: list[TicketSpec] = field(default_factory=list)
    missing: list[TicketSpec] = field(default_factory=list)

    def summary(self) -> str:
        """``dense done, 12 of 130 tickets done, 1 failed``."""
        total = len(self.done) + len(self.failed) + len(self.missing)
        text = f"dense {'done' if self.dense_done else 'not done'}, {len(self.done)} of {total} tickets done"
        return text + (f", {len(self.failed)} failed" if self.failed else "")


class Workdir:
    """``<artifact root>/<experiment id>``: every artifact of one experiment."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    @classmethod
    def for_experiment(cls, artifact_root: str | os.PathLike, cfg: ExperimentConfig, data_dir: str | os.PathLike) -> Workdir:
        """Same config and data, same directory; else a new one."""
        return cls(Path(artifact_root) / experiment_id(cfg, dataset_id(data_dir)))

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"Workdir({str(self.path)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Workdir) and other.path == self.path

    def __hash__(self) -> int:
        return hash(self.path)

    @property
    def name(self) -> str:
        """The experiment id (the directory's name)."""
        return self.path.name

    # ---- the experiment -------------------------------------------------------------------------
    @property
    def config_json(self) -> Path:
        return self.path / "config.json"

    @property
    def run_json(self) -> Path:
        return self.path / "run.json"

    @property
    def results_csv(self) -> Path:
        return self.path / RESULTS_CSV

    # ---- dense training -------------------------------------------------------------------------
    @property
    def dense_dir(self) -> Path:
        return self.path / "dense"

    @property
    def dense_result(self) -> Path:
        return self.dense_dir / RESULT_JSON

    @property
    def dense_checkpoint(self) -> Path:
        return self.dense_dir / "checkpoint.npz"

    @property
    def dense_metrics(self) -> Path:
        return self.dense_dir / "metrics.csv"

    @property
    def final_model(self) -> Path:
        return self.dense_dir / "final.keras"

    def rewind_checkpoint(self, label: str) -> Path:
        return self.dense_dir / "rewind" / f"{label}.npz"

    # ---- masks ----------------------------------------------------------------------------------
    @property
    def masks_dir(self) -> Path:
        return self.path / "masks"

    def mask_file(self, mask_id: str) -> Path:
        return self.masks_dir / f"{mask_id}.npz"

    @property
    def mask_index(self) -> Path:
        return self.masks_dir / "index.json"

    # ---- tickets and controls -------------------------------------------------------------------
    @property
    def tickets_dir(self) -> Path:
        return self.path / TICKETS

    def ticket(self, spec: TicketSpec) -> TicketPaths:
        return TicketPaths(self.tickets_dir / spec.name)

    def started_controls(self) -> list[TicketSpec]:
        """The control directories on disk (whether or not a plan asked for them)."""
        if not self.tickets_dir.is_dir():
            return []
        parts = (p.name.split("__") for p in sorted(self.tickets_dir.iterdir()) if p.is_dir())
        return [TicketSpec(*p) for p in parts if len(p) == 3]

    # ---- report ---------------------------------------------------------------------------------
    @property
    def report_dir(self) -> Path:
        return self.path / "report"

    @property
    def report_md(self) -> Path:
        return self.report_dir / REPORT_NAME

    @property
    def plot_png(self) -> Path:
        return self.report_dir / PLOT_NAME

    # ---- I/O ------------------------------------------------------------------------------------
    def prepare(self, cfg: ExperimentConfig, data_dir: str | os.PathLike) -> Workdir:
        """Write ``config.json`` and ``run.json``, or check that the directory holds this experiment
        (the same experiment id: an explicit level list and the same levels derived match)."""
        from lottery.files import read_json, write_json

        data_dir = Path(data_dir).resolve()
        data_id = dataset_id(data_dir)
        wanted_id = experiment_id(cfg, data_id)
        if self.config_json.exists():
            existing = ExperimentConfig.from_dict(read_json(self.config_json))
            run = read_json(self.run_json) if self.run_json.exists() else {}
            if experiment_id(existing, data_id) != wanted_id or run.get("experiment_id", wanted_id) != wanted_id:
                raise WorkdirMismatchError(
                    f"{self.path} holds experiment {run.get('experiment_id', '?')} with a different config or data set "
                    f"(this one is {wanted_id}); use another --workdir"
                )
        else:
            write_json(self.config_json, cfg.to_dict())
        write_json(self.run_json, {"experiment_id": wanted_id, "data_dir": str(data_dir), "dataset_id": data_id})
        return self

    def load(self) -> tuple[ExperimentConfig, dict[str, Any]]:
        """The experiment's config and run info (experiment id, data directory, data set id)."""
        from lottery.files import read_json

        if not self.config_json.exists():
            raise MissingArtifactError(f"{self.path} has no config.json: run `python -m lottery dense` for it first")
        return ExperimentConfig.from_dict(read_json(self.config_json)), read_json(self.run_json)

    def status(self, plan: RunPlan) -> WorkdirStatus:
        """Which of the plan's tickets and controls are done, failed or missing (files only)."""
        masks = self.mask_index.exists() and all(self.mask_file(m.mask_id).exists() for m in plan.masks)
        status = WorkdirStatus(dense_done=self.dense_result.exists(), masks_done=masks)
        for spec in plan.expected:
            paths = self.ticket(spec)
            bucket = status.done if paths.result.exists() else status.failed if paths.error.exists() else status.missing
            bucket.append(spec)
        return status
