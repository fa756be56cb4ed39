"""Late resetting: rewind to a point of the dense run, apply a mask, retrain to the end with the
mask fixed. One ticket per (mask, rewind point); the random controls are tickets too
(`lottery.ticket.Ticket`: what each one trains, and its files).

    retrain(workdir, [mask, ...] | "all", rewind[, control=..., pack=...]) -> one small result per ticket

A ticket done (its result and every file it lists intact) is not trained again; one that another
run of the same config trains is waited for (its lock) and then found done, or, in a DAG task
(`lottery.locks.busy_raises`), left to that run: the group trains its other tickets, then raises
`TrainingLockBusy` and comes back for it.

A group opens the data, builds and compiles the model once. `train_in_turn` trains its tickets one
after another, each restoring every variable and assigning its mask to the mask variables of the
compiled step, so the step is traced once and each result is bit for bit the one it gets alone. On
the JAX backend with a pack size above 1, `lottery.packed.train_packed` trains them side by side.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

from lottery.config import CONTROLS
from lottery.dense import verify_rewind_checkpoint
from lottery.errors import CorruptArtifactError
from lottery.locks import TrainingLockBusy, hold_training_locks
from lottery.paths import Workdir
from lottery.phases import phase
from lottery.plan import MaskSpec, RunPlan
from lottery.session import build_model, open_data, session
from lottery.ticket import Ticket

log = logging.getLogger("lottery")


def retrain(
    workdir: str | os.PathLike,
    masks: Sequence[int | str] | str,
    rewind: int | str,
    *,
    control: str | Sequence[str | None] | None = None,
    threads: int | None = None,
    data_dir: str | os.PathLike | None = None,
    progress: bool = False,
    pack: int | None = None,
) -> list[dict[str, Any]]:
    """Retrain the tickets of ``masks`` (indices or ids, or ``"all"``) at rewind point ``rewind`` in
    this process: one small result dict per ticket, in the order given (``"skipped": True`` for those
    already done). ``control``: one kind for the whole group (a list must name one kind only).
    ``pack``: tickets trained side by side (JAX backend; None: ``LOTTERY_PACK`` or from the
    device's memory, 1 on CPU). A bad group is refused before any training, naming the value.
    When a ticket fails, the others still train; the first failure is raised at the end. Inside
    `lottery.locks.busy_raises()`, tickets other processes train are left to them: the rest are
    trained, then `TrainingLockBusy` is raised (a call again finds done what either trained)."""
    workdir = Workdir(workdir)
    cfg, run_info = workdir.load()
    plan = RunPlan.from_config(cfg)
    kind = _group_control(control)
    tickets = [Ticket(workdir, cfg, run_info, m, plan.rewind(rewind), kind) for m in _group_masks(plan, masks)]
    todo = [t for t in tickets if t.done_result() is None]
    _check_inputs(todo)
    with contextlib.ExitStack() as held:
        todo, busy = _claim(todo, held)
        if todo:  # a group with nothing to do imports no Keras
            started = time.perf_counter()
            for ticket in todo:
                ticket.started = started
            _train_group(cfg, todo, threads, Path(data_dir or run_info["data_dir"]), progress, pack)
    if busy is not None:  # after the locks are released: what this group trained is done and kept
        raise busy
    return [t.result for t in tickets]


def _check_inputs(todo: list[Ticket]) -> None:
    """Every ticket's mask and rewind checkpoint exist; the group's one rewind point is checked
    against the dense run's record once (when damaged, each ticket's report says why)."""
    for ticket in todo:
        ticket.check_inputs()
    if todo:
        try:
            verify_rewind_checkpoint(todo[0].workdir, todo[0].rewind)
        except CorruptArtifactError:
            for ticket in todo:
                ticket.record_failure()
            raise


def _claim(todo: list[Ticket], held: contextlib.ExitStack) -> tuple[list[Ticket], TrainingLockBusy | None]:
    """Hold the training lock of each ticket in ``todo`` (until ``held`` closes): the tickets still
    to train, and the busy ones' `TrainingLockBusy` (None when none is). Another process training
    one of them (a run of the same config) is waited for, or inside `busy_raises()` left to it; what
    it finished meanwhile is taken instead of being trained again. The locks are taken in name
    order, so two groups that share tickets never wait on each other."""
    locks = [(t, t.workdir.training_lock(t.name), t.label) for t in sorted(todo, key=lambda t: t.name)]
    claimed, busy = hold_training_locks(held, locks, log=log)
    mine = {id(t) for t in claimed}
    return [t for t in todo if id(t) in mine and t.done_result() is None], busy  # done by another process meanwhile


def import_engine(unit: str) -> None:
    """Import Keras, its backend and the engine's training modules (seconds, in a fresh process)."""
    with phase("imports", unit):
        import keras

        from lottery import packed, pruning, training  # noqa: F401

        if keras.backend.backend() == "tensorflow":
            from lottery.data import pipeline  # noqa: F401  (TensorFlow itself)
        else:
            from lottery.data import arrays  # noqa: F401


@contextlib.contextmanager
def training_session(cfg, threads: int | None, data_dir: str | os.PathLike, unit: str) -> Iterator[tuple[Any, tuple]]:
    """What every training process shares before its first step: the engine imported, the session
    open, the data opened, the model built and compiled once (phases of ``unit``). Yields (model,
    (train, val, iterations per epoch)); the model is reused by every unit the process trains."""
    import_engine(unit)
    from lottery.training import compile_model

    with session(cfg, threads):
        with phase("data_open", unit):
            train, val, spe = open_data(cfg, data_dir)
        with phase("build_compile", unit):
            model = build_model(cfg, train)
            compile_model(model, cfg, spe)
        yield model, (train, val, spe)


def _group_masks(plan: RunPlan, masks: Sequence[int | str] | str) -> list[MaskSpec]:
    """The group's masks: every one for ``"all"``; a mask named twice or unknown is refused."""
    if isinstance(masks, str) and masks == "all":
        return list(plan.masks)
    if isinstance(masks, (str, int)):
        masks = [masks]
    if not masks:
        raise ValueError("the group names no mask: give mask indices or ids, or 'all'")
    specs, named = [], {}
    for ref in masks:
        spec = plan.mask(ref)
        if spec.mask_id in named:
            raise ValueError(f"mask {spec.mask_id} is named twice in the group (as {named[spec.mask_id]!r} and {ref!r})")
        named[spec.mask_id] = ref
        specs.append(spec)
    return specs


def _group_control(control: str | Sequence[str | None] | None) -> str | None:
    """The group's one control kind (or None): a list naming two kinds, or a ticket and a control, is refused."""
    kinds = [control] if control is None or isinstance(control, str) else list(control)
    for kind in kinds:
        if kind is not None and kind not in CONTROLS:
            raise ValueError(f"unknown control {kind!r}: choose one of {', '.join(CONTROLS)}")
    if len(set(kinds)) > 1:
        named = ", ".join(sorted(k or "none (ticket)" for k in set(kinds)))
        raise ValueError(f"a group mixes controls ({named}): one group trains one control kind, or tickets only")
    return kinds[0] if kinds else None


def _train_group(cfg, todo: list[Ticket], threads, data_dir: Path, progress: bool, pack) -> None:
    """Open the data, build and compile once (the group's shared costs, charged to its first
    ticket); then the strategy: packed on JAX when the pack size is above 1 (decided inside the
    session: JAX must not start before it), else one after another in the compiled model."""
    from lottery.packed import pack_size, train_packed

    with contextlib.ExitStack() as opened:
        try:
            model, data = opened.enter_context(training_session(cfg, threads, data_dir, todo[0].label))
            size = pack_size(cfg, pack, len(todo), model)
        except BaseException:
            for ticket in todo:  # none of them can train: each one's report says why
                ticket.record_failure()
            raise
        strategy = functools.partial(train_packed, size=size) if size > 1 else functools.partial(train_in_turn, progress=progress)
        strategy(todo, model, data)


def train_in_turn(tickets: list[Ticket], model, data: tuple, *, progress: bool = False) -> None:
    """The sequential strategy: each ticket in turn in the compiled ``model``, ``data`` = (train,
    val, steps per epoch). A ticket that fails leaves its error.json; the others still train; the
    first failure is raised at the end."""
    failures = []
    for ticket in tickets:
        try:
            _train_alone(ticket, model, data, progress)
        except Exception as exc:
            ticket.record_failure()
            failures.append(exc)
        except BaseException:
            ticket.record_failure()
            raise
    if failures:
        if len(failures) > 1:
            log.error("retrain: %d of %d tickets failed; raising the first", len(failures), len(tickets))
        raise failures[0]


def _train_alone(ticket: Ticket, model, data: tuple, progress: bool) -> None:
    """Start ``ticket`` in ``model``, train it to the end with its mask fixed (an epoch checkpoint
    at every epoch end), finish it."""
    from lottery.training import TrainingRun, epoch_saver

    train, val, spe = data
    start = ticket.start(model, train, spe)
    run = TrainingRun(model, ticket.cfg, train, val, spe, ticket.cfg.total_iterations(spe), label=ticket.label,
                      on_epoch_end=epoch_saver(model, ticket.paths.checkpoint, ticket.paths.metrics, spe),
                      progress=progress, history=list(start.history))
    ticket.finish(model, start, run.run(start.step), spe)
