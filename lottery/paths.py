"""The work directory of one experiment: the only module that spells its paths.

    W/config.json                       the experiment config (written once, by `prepare`)
    W/run.json                          experiment id, data directory, data set id, format version
    W/dense/result.json                 the dense run: accuracy, curve, rewind steps
    W/dense/checkpoint.npz, metrics.csv resume point (deleted when done) and per-epoch metrics
    W/dense/final.keras                 the final dense weights (the masks are computed from it)
    W/dense/rewind/<label>.npz          weights + optimizer state at each rewind point
    W/masks/<mask id>.npz, index.json   one magnitude mask per sparsity level
    W/tickets/<ticket name>/            result.json, error.json, checkpoint.npz, metrics.csv,
                                        model.keras and mask.npz (random_prune: its random mask;
                                        an iterative level: the level's magnitude mask)
    W/stability/<name>/                 instability analysis of a network (``dense`` or a mask id) at a
                                        rewind point: result.json, and copy_a/, copy_b/ (each with a
                                        ticket's files: result.json, checkpoint.npz, metrics.csv, model.keras)
    W/results.csv, W/report/            the report: report.md and accuracy_vs_sparsity.png
    W/stability.csv                     the instability analyses (report/instability_vs_rewind.png)

Replicates (``replicates: N``): each replicate is an experiment of its own, ``<artifact root>/<its id>``,
and the report over them lives in ``<artifact root>/<id of replicate 0>-x<N>/`` (`ReplicateSet`):

    S/replicates.json                   the config, and each replicate's experiment id and work dir
    S/results.csv                       one row per replicate and combination
    S/summary.csv                       mean, std and n per combination
    S/stability.csv                     one row per replicate and instability analysis
    S/report/                           report.md, accuracy_vs_sparsity.png, instability_vs_rewind.png (mean ± std)

A comparison of experiments (``python -m lottery report --compare``) writes ``comparison.png`` and
``comparison.md`` into the directory it is given (`Comparison`).

Every .npz has its record and meta in a sealed <stem>.json beside it (`lottery.files.save_arrays`).

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
from lottery.plan import RunPlan, StabilitySpec, TicketSpec, stability_name  # noqa: F401 - stability_name: public here

RESULTS_CSV = "results.csv"
SUMMARY_CSV = "summary.csv"
PLOT_NAME = "accuracy_vs_sparsity.png"
STABILITY_CSV = "stability.csv"
INSTABILITY_PLOT_NAME = "instability_vs_rewind.png"
REPORT_NAME = "report.md"
TICKETS = "tickets"
RESULT_JSON = "result.json"
# The work directory's format (its files, their records and array bundles: docs/artifacts.md). Recorded
# in run.json; a directory of another format is refused, never half read. Not part of the experiment id.
FORMAT_VERSION = 2


def dataset_id(data_dir: str | os.PathLike) -> str:
    """The id the preprocessing job wrote into the data directory's manifest."""
    from lottery.data import read_manifest

    return read_manifest(data_dir)["dataset_id"]


def _under(attribute: str, *parts: str, doc: str = "") -> property:
    """A path ``parts`` below the directory in ``self.<attribute>``: the layout reads as a table."""
    return property(lambda self: Path(getattr(self, attribute), *parts), doc=doc)


@dataclass(frozen=True)
class TicketPaths:
    """The files of one ticket (or control) directory, or of one copy of an instability analysis."""

    dir: Path

    result = _under("dir", RESULT_JSON)
    error = _under("dir", "error.json", doc="the exception of a failed attempt (removed when it succeeds)")
    checkpoint = _under("dir", "checkpoint.npz")
    metrics = _under("dir", "metrics.csv")
    model = _under("dir", "model.keras")
    mask = _under("dir", "mask.npz", doc="the random mask of a random_prune control")


@dataclass(frozen=True)
class StabilityPaths:
    """The files of one instability analysis: its sealed result.json (the path between the two
    copies), error.json when it failed, and each copy's directory (``copy("a")``: a ticket's files)."""

    dir: Path

    result = _under("dir", RESULT_JSON)
    error = _under("dir", "error.json", doc="the exception of a failed attempt (removed when it succeeds)")

    def copy(self, which: str) -> TicketPaths:
        return TicketPaths(self.dir / f"copy_{which}")


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


class _Directory:
    """A directory the engine owns, known by its path: usable wherever a path is (``os.fspath``)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.path == self.path

    def __hash__(self) -> int:
        return hash(self.path)

    @property
    def name(self) -> str:
        """The directory's name (an experiment id; a replicate set's ``<id>-x<N>``)."""
        return self.path.name


class ReplicateSet(_Directory):
    """``<artifact root>/<id of replicate 0>-x<N>``: the report of an experiment's N replicates (each
    replicate's own artifacts stay in its own work directory)."""

    @classmethod
    def for_experiment(cls, artifact_root: str | os.PathLike, cfg: ExperimentConfig, data_dir: str | os.PathLike) -> ReplicateSet:
        first = experiment_id(cfg.replicate(0), dataset_id(data_dir))
        return cls(Path(artifact_root) / f"{first}-x{cfg.replicates}")

    replicates_json = _under("path", "replicates.json")
    results_csv = _under("path", RESULTS_CSV, doc="one row per replicate and combination")
    summary_csv = _under("path", SUMMARY_CSV, doc="mean, std and n per combination")
    report_md = _under("path", "report", REPORT_NAME)
    plot_png = _under("path", "report", PLOT_NAME)
    stability_csv = _under("path", STABILITY_CSV, doc="one row per replicate and instability analysis")
    instability_png = _under("path", "report", INSTABILITY_PLOT_NAME)

    @staticmethod
    def holds_set(path: str | os.PathLike) -> bool:
        """Whether ``path`` is a replicate set's directory (not one experiment's work directory)."""
        return (Path(path) / "replicates.json").exists()

    def prepare(self, cfg: ExperimentConfig, workdirs: list[Workdir]) -> ReplicateSet:
        """Write ``replicates.json``: the config (with its replicate count) and each replicate's work dir."""
        from lottery.files import write_json

        write_json(self.replicates_json, {"config": cfg.to_dict(), "experiment_ids": [w.name for w in workdirs],
                                          "workdirs": [str(w) for w in workdirs], "format_version": FORMAT_VERSION})
        return self

    def load(self) -> tuple[ExperimentConfig, list[Workdir]]:
        """The experiment's config (``replicates`` = N) and its replicates' work directories, in order."""
        from lottery.files import read_json

        if not self.replicates_json.exists():
            raise MissingArtifactError(f"{self.path} has no replicates.json: not a replicate set")
        info = read_json(self.replicates_json)
        return ExperimentConfig.from_dict(info["config"]), [Workdir(p) for p in info["workdirs"]]


class Comparison:
    """The directory a comparison of experiments is written to (``lottery.compare``)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    plot_png = _under("path", "comparison.png")
    table_md = _under("path", "comparison.md")


class Workdir(_Directory):
    """``<artifact root>/<experiment id>``: every artifact of one experiment."""

    @classmethod
    def for_experiment(cls, artifact_root: str | os.PathLike, cfg: ExperimentConfig, data_dir: str | os.PathLike) -> Workdir:
        """Same config and data, same directory; else a new one."""
        return cls(Path(artifact_root) / experiment_id(cfg, dataset_id(data_dir)))

    # ---- the layout ---------------------------------------------------------------------------
    config_json = _under("path", "config.json")
    run_json = _under("path", "run.json")
    results_csv = _under("path", RESULTS_CSV)
    dense_dir = _under("path", "dense")
    dense_result = _under("path", "dense", RESULT_JSON)
    dense_checkpoint = _under("path", "dense", "checkpoint.npz", doc="resume point (deleted when done)")
    dense_metrics = _under("path", "dense", "metrics.csv")
    final_model = _under("path", "dense", "final.keras")
    masks_dir = _under("path", "masks")
    mask_index = _under("path", "masks", "index.json")
    tickets_dir = _under("path", TICKETS)
    stability_dir = _under("path", "stability")
    report_md = _under("path", "report", REPORT_NAME)
    plot_png = _under("path", "report", PLOT_NAME)
    stability_csv = _under("path", STABILITY_CSV)
    instability_png = _under("path", "report", INSTABILITY_PLOT_NAME)

    def rewind_checkpoint(self, label: str) -> Path:
        return self.dense_dir / "rewind" / f"{label}.npz"

    def mask_file(self, mask_id: str) -> Path:
        return self.masks_dir / f"{mask_id}.npz"

    def training_lock(self, unit: str) -> Path:
        """The lock held while ``unit`` ("dense" or a ticket's name) trains (`lottery.locks`): a
        run of the same config waits for it instead of training the unit a second time."""
        return self.path / ".locks" / f"{unit}.train.lock"

    def ticket(self, spec: TicketSpec) -> TicketPaths:
        return TicketPaths(self.tickets_dir / spec.name)

    def stability(self, name: str) -> StabilityPaths:
        """``stability/<name>/`` (`stability_name`)."""
        return StabilityPaths(self.stability_dir / name)

    def stability_results(self) -> list[Path]:
        """The result.json of every finished instability analysis, by name."""
        return sorted(self.stability_dir.glob(f"*/{RESULT_JSON}")) if self.stability_dir.is_dir() else []

    def started_stability(self) -> list[StabilitySpec]:
        """The instability analyses with a directory on disk (whether or not a plan asked for them)."""
        if not self.stability_dir.is_dir():
            return []
        specs = (StabilitySpec.from_name(p.name) for p in sorted(self.stability_dir.iterdir()) if p.is_dir())
        return [spec for spec in specs if spec is not None]

    def started_controls(self) -> list[TicketSpec]:
        """The control directories on disk (whether or not a plan asked for them)."""
        if not self.tickets_dir.is_dir():
            return []
        parts = (p.name.split("__") for p in sorted(self.tickets_dir.iterdir()) if p.is_dir())
        return [TicketSpec(*p) for p in parts if len(p) == 3]

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
            run = read_json(self.run_json) if self.run_json.exists() else {"format_version": FORMAT_VERSION}
            self._check_format(run)
            if experiment_id(existing, data_id) != wanted_id or run.get("experiment_id", wanted_id) != wanted_id:
                raise WorkdirMismatchError(
                    f"{self.path} holds experiment {run.get('experiment_id', '?')} with a different config or data set "
                    f"(this one is {wanted_id}); use another --workdir"
                )
        else:
            write_json(self.config_json, cfg.to_dict())
        write_json(self.run_json, {"experiment_id": wanted_id, "data_dir": str(data_dir), "dataset_id": data_id,
                                   "format_version": FORMAT_VERSION})
        return self

    def _check_format(self, run: dict[str, Any]) -> None:
        found = run.get("format_version")
        if found != FORMAT_VERSION:
            raise WorkdirMismatchError(
                f"{self.path} is a work directory of format version {found if found is not None else 'none (older)'}; "
                f"this version of the code reads format version {FORMAT_VERSION} only (docs/artifacts.md): "
                "use another --workdir")

    def load(self) -> tuple[ExperimentConfig, dict[str, Any]]:
        """The experiment's config and run info (experiment id, data directory, data set id)."""
        from lottery.files import read_json

        if not self.config_json.exists():
            raise MissingArtifactError(f"{self.path} has no config.json: run `python -m lottery dense` for it first")
        run = read_json(self.run_json)
        self._check_format(run)
        return ExperimentConfig.from_dict(read_json(self.config_json)), run

    def status(self, plan: RunPlan) -> WorkdirStatus:
        """Which of the plan's tickets and controls are done, failed or missing (files only)."""
        masks = plan.iterative or (self.mask_index.exists() and all(self.mask_file(m.mask_id).exists() for m in plan.masks))
        status = WorkdirStatus(dense_done=self.dense_result.exists(), masks_done=masks)
        for spec in plan.expected:
            paths = self.ticket(spec)
            bucket = status.done if paths.result.exists() else status.failed if paths.error.exists() else status.missing
            bucket.append(spec)
        return status


def prepare_replicates(artifact_root: str | os.PathLike, cfg: ExperimentConfig,
                       data_dir: str | os.PathLike) -> tuple[ReplicateSet | None, list[Workdir]]:
    """Each replicate's work directory (``cfg.replicate(i)``, prepared) and, for more than one, the
    replicate set whose report covers them all (None for one replicate: its work directory is the report's)."""
    workdirs = [Workdir.for_experiment(artifact_root, rep, data_dir).prepare(rep, data_dir) for rep in cfg.replicate_configs()]
    if cfg.replicates == 1:
        return None, workdirs
    return ReplicateSet.for_experiment(artifact_root, cfg, data_dir).prepare(cfg, workdirs), workdirs
