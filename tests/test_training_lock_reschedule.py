"""A training task whose unit another process trains gives its worker back: Airflow's reschedule.

The DAG's task bodies (`lottery.dag.tasks.train_dense`, `retrain`) run under Airflow's own task
runner (``dag.test()`` of a one-task mapped DAG, in this process), on a real work directory (a
tiny synthetic experiment), while another process holds a unit's training lock (tests/lockholder.py),
as another run of the same config would. The task must end ``up_for_reschedule`` (no slot, no
worker) with one log line naming the holder, come back, and find done what the other process
finished; a group trains its free tickets first and keeps them. The lock module's own rules (no
waiting inside ``busy_raises``, a thread that holds a lock takes it again at once) are checked
without Airflow.
"""

import contextlib
import functools
import json
import logging
import re
import shutil
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import init_db_here, tiny_training, use_test_home  # noqa: E402  (before airflow is imported)

HOME = use_test_home()

from lottery.config import ExperimentConfig  # noqa: E402
from lottery.dense import run_dense  # noqa: E402
from lottery.late_reset import retrain as retrain_tickets  # noqa: E402
from lottery.locks import TrainingLockBusy, busy_raises, hold_training_locks, wait_training_lock  # noqa: E402
from lottery.masks import make_masks  # noqa: E402
from lottery.plan import RunPlan  # noqa: E402
from tests.lockholder import hold_lock  # noqa: E402
from tests.test_experiment import data_dir  # noqa: E402,F401  (the fixture: 256 + 96 images, 8x8x1, 3 classes)

# 256 images / batch 32 = 8 iterations per epoch; 3 epochs; tickets rewind to 1ep: 2 epochs each.
TINY = tiny_training(sparsities=[0.5, 0.8, 0.9])
GAVE_BACK = "giving the worker back, looking again at"


@pytest.fixture(scope="module")
def masked_workdir(tmp_path_factory, data_dir):  # noqa: F811
    """A dense run and its masks, no ticket: copy it before using it."""
    workdir = tmp_path_factory.mktemp("exp") / "w"
    run_dense(ExperimentConfig.from_dict(TINY), data_dir, workdir, threads=1)
    make_masks(workdir)
    return workdir


@pytest.fixture
def quick_polls(monkeypatch):
    monkeypatch.setenv("LOTTERY_TRAINING_LOCK_POLL_S", "0.5")
    monkeypatch.setenv("LOTTERY_DATA_LOCK_TIMEOUT", "0.5")  # a training wait is not bounded by it
    monkeypatch.setenv("LOTTERY_THREADS", "1")
    monkeypatch.delenv("LOTTERY_TRAINING_LOCK_TIMEOUT", raising=False)


def mapped_task_dag(dag_id: str, function, kwargs: dict):
    """A DAG of one mapped task (one instance, ``kwargs``) calling ``function``, as the lottery DAG's
    training tasks are, registered in the metadata database (dag.test() runs registered DAGs)."""
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import DagBag, sync_bag_to_db
    from airflow.sdk import DAG, task

    init_db_here()
    with DAG(dag_id, schedule=None, default_args={"retries": 0}) as dag:
        task(task_id="train")(function).expand_kwargs([kwargs])
    DagBundlesManager().sync_bundles_to_db()
    bag = DagBag(dag_folder=str(Path(__file__).parent / "no-dags-here"))
    bag.bag_dag(dag)
    sync_bag_to_db(bag, "dags-folder", None)
    return dag


def run_and_reschedules(dag) -> tuple[str, dict, int]:
    """dag.test(): the run's state, its task instance (state, try number) and how many times the
    task was rescheduled (Airflow's task_reschedule rows)."""
    from airflow.models import TaskInstance
    from airflow.models.taskreschedule import TaskReschedule
    from airflow.utils.session import create_session

    run = dag.test()
    with create_session() as session:
        ti = session.query(TaskInstance).filter(TaskInstance.dag_id == dag.dag_id, TaskInstance.run_id == run.run_id).one()
        count = session.query(TaskReschedule).filter(TaskReschedule.ti_id == ti.id).count()
        return str(getattr(run.state, "value", run.state)), {"state": str(ti.state), "try_number": ti.try_number}, count


def succeeds_after_the_other_run(dag, holder, other_run_finishes):
    """Run ``dag`` while ``holder`` holds the lock; once the task gives its worker back,
    ``other_run_finishes()``. The task must succeed in its first try: (the log, its reschedules)."""
    try:
        with lottery_log(GAVE_BACK, other_run_finishes) as log:
            state, ti, reschedules = run_and_reschedules(dag)
    finally:
        holder.kill()
    assert (state, ti) == ("success", {"state": "success", "try_number": 1}), log.text[-3000:]
    return log, reschedules


def raising(function, raised: list):
    """``function``, recording what it raises (the task's outcome as Airflow's task runner sees it)."""
    @functools.wraps(function)  # the same signature: Airflow passes the arguments it names
    def task_body(**kwargs):
        try:
            return function(**kwargs)
        except Exception as exc:
            raised.append(exc)
            raise
    return task_body


class Log(logging.Handler):
    """The messages of the "lottery" loggers (the task runner reconfigures the root logger, and
    with it pytest's caplog); ``then()`` runs in a thread once one contains ``trigger``."""

    def __init__(self, trigger: str, then=None):
        super().__init__(logging.INFO)
        self.trigger, self.then, self.lines, self.seen = trigger, then, [], threading.Event()
        self.thread = threading.Thread(target=lambda: self.seen.wait(120) and self.then(), daemon=True)

    def emit(self, record):
        self.lines.append(record.getMessage())
        if self.trigger in self.lines[-1]:
            self.seen.set()

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def matching(self, text: str) -> list[str]:
        return [line for line in self.lines if text in line]


@contextlib.contextmanager
def lottery_log(trigger: str, then=None):
    log = Log(trigger, then)
    logger = logging.getLogger("lottery")
    level = logger.level
    logger.addHandler(log)
    logger.setLevel(logging.INFO)
    if then is not None:
        log.thread.start()
    try:
        yield log
    finally:
        if then is not None:
            log.thread.join(120)
        logger.removeHandler(log)
        logger.setLevel(level)


def mtimes(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in directory.iterdir()}


def test_a_dense_training_another_run_holds_is_rescheduled_not_waited_for(tmp_path, masked_workdir, data_dir,  # noqa: F811
                                                                          quick_polls):
    """train_dense meets the dense lock held by another process: it ends up_for_reschedule (logging
    the holder and when it looks again), comes back, and once the other process has finished finds
    the dense network done: nothing trained twice, no retry, the 0.5 s data-lock bound irrelevant."""
    from lottery.dag import tasks

    workdir = tmp_path / "w"
    shutil.copytree(masked_workdir, workdir)
    result = workdir / "dense" / "result.json"
    finished = result.read_bytes()
    result.unlink()  # not done yet: the other process is training it
    before = mtimes(workdir / "dense")
    holder = hold_lock(workdir / ".locks" / "dense.train.lock", 600)

    def other_run_finishes():
        time.sleep(1.5)  # three times the data-lock bound: the task has come back at least once meanwhile
        result.write_bytes(finished)
        holder.kill()

    plan = RunPlan.from_config(ExperimentConfig.from_dict(TINY)).to_dict()
    raised = []
    dag = mapped_task_dag("lock_reschedule_dense", raising(tasks.train_dense, raised),
                          {"plan": plan, "data_dir": str(data_dir), "workdir": str(workdir), "replicate": "rep 1"})
    log, reschedules = succeeds_after_the_other_run(dag, holder, other_run_finishes)
    assert reschedules >= 1 and len(log.matching(GAVE_BACK)) == reschedules, (reschedules, log.matching(GAVE_BACK))
    assert [type(e).__name__ for e in raised] == ["AirflowRescheduleException"] * reschedules, raised
    line = log.matching(GAVE_BACK)[0]
    assert line.startswith("train_dense rep 1: waiting for another run's training: the test's holder (pid "), line
    assert f"holds {workdir}/.locks/dense.train.lock; {GAVE_BACK} " in line and "(in 0.5 s, LOTTERY_TRAINING_LOCK_POLL_S)" in line
    assert log.matching("dense: already done") and not [line for line in log.lines if line.startswith("dense: start")]
    assert {k: v for k, v in mtimes(workdir / "dense").items() if k != "result.json"} == before
    print(f"\n{reschedules} reschedules; {line}")


def test_a_group_trains_its_free_tickets_then_gives_the_worker_back_for_the_busy_one(tmp_path, masked_workdir,
                                                                                     quick_polls):
    """A late_reset group of two tickets, one of them trained by another process: the group trains
    the free one, gives its worker back, and when it comes back finds both done: the one it trained
    is kept (not trained again), the other process's is taken."""
    from lottery.dag import tasks

    workdir, other = tmp_path / "w", tmp_path / "other"
    for target in (workdir, other):
        shutil.copytree(masked_workdir, target)
    retrain_tickets(other, "sp80.000", "1ep", threads=1)  # what the other process will have made
    busy, free = workdir / "tickets" / "sp80.000__1ep", workdir / "tickets" / "sp90.000__1ep"
    holder = hold_lock(workdir / ".locks" / "sp80.000__1ep.train.lock", 600)
    kept = {}

    def other_run_finishes():
        kept.update(mtimes(free))  # trained before the group gave its worker back
        shutil.copytree(other / "tickets" / "sp80.000__1ep", busy)
        holder.kill()

    masks = [{"index": i, "mask_id": m, "sparsity": s, "remaining": 1 - s, "label": f"{100 * (1 - s):.1f}% left"}
             for i, (m, s) in ((1, ("sp80.000", 0.8)), (2, ("sp90.000", 0.9)))]
    dag = mapped_task_dag("lock_reschedule_group", tasks.retrain,
                          {"workdir": str(workdir), "masks": masks, "rewind": "1ep", "group": "rewind 1ep: masks 2-3"})
    log, reschedules = succeeds_after_the_other_run(dag, holder, other_run_finishes)
    assert reschedules == 1 and f"holds {workdir}/.locks/sp80.000__1ep.train.lock; " in log.matching(GAVE_BACK)[0]
    assert len(log.matching("retrain sp90.000__1ep: done in")) == 1 and len(log.matching("retrain sp90.000__1ep: start")) == 1
    assert not log.matching("retrain sp80.000__1ep: start")
    assert kept and (free / "result.json").is_file() and mtimes(free) == kept
    assert log.matching("rewind 1ep: masks 2-3: done in") and "0 trained, 2 already done" in log.text  # when it came back
    assert json.loads((busy / "result.json").read_text())["mask_id"] == "sp80.000"


def test_the_training_lock_timeout_bounds_the_time_given_back(tmp_path, masked_workdir, data_dir, quick_polls,  # noqa: F811
                                                              monkeypatch):
    """With LOTTERY_TRAINING_LOCK_TIMEOUT set, a task that has given its worker back for that long
    (since its first reschedule) fails with LockTimeout naming the holder and the setting."""
    from lottery.dag import tasks

    monkeypatch.setenv("LOTTERY_TRAINING_LOCK_TIMEOUT", "1.5")
    workdir = tmp_path / "w"
    shutil.copytree(masked_workdir, workdir)
    (workdir / "dense" / "result.json").unlink()
    holder = hold_lock(workdir / ".locks" / "dense.train.lock", 600)
    plan = RunPlan.from_config(ExperimentConfig.from_dict(TINY)).to_dict()
    raised = []
    dag = mapped_task_dag("lock_reschedule_timeout", raising(tasks.train_dense, raised),
                          {"plan": plan, "data_dir": str(data_dir), "workdir": str(workdir), "replicate": "rep 1"})
    try:
        with lottery_log(GAVE_BACK) as log:
            state, ti, reschedules = run_and_reschedules(dag)
    finally:
        holder.kill()
    assert (state, ti) == ("failed", {"state": "failed", "try_number": 1}), log.text[-3000:]
    assert reschedules >= 1 and [type(e).__name__ for e in raised] == ["AirflowRescheduleException"] * reschedules + ["LockTimeout"]
    assert re.fullmatch(r"waited \d+ s for another run's training: the test's holder \(pid \d+ on here, since [\d:]+\) holds "
                        rf"{re.escape(str(workdir))}/.locks/dense.train.lock; it is still training: clear this task once it "
                        r"has finished, or raise LOTTERY_TRAINING_LOCK_TIMEOUT", str(raised[-1])), raised[-1]
    assert not [line for line in log.lines if line.startswith("dense: start")]
    print(f"\n{reschedules} reschedules, then LockTimeout: {raised[-1]}")


def test_an_instability_analysis_trains_its_free_copy_and_comes_back_for_the_busy_one(tmp_path, masked_workdir,
                                                                                       quick_polls):
    """Copy a of an analysis is trained by another process: inside busy_raises the analysis trains
    copy b, raises TrainingLockBusy (no path without both copies), and called again once the other
    process has finished, keeps copy b and walks the path."""
    from lottery.stability import run_stability, train_copy

    workdir, other = tmp_path / "w", tmp_path / "other"
    for target in (workdir, other):
        shutil.copytree(masked_workdir, target)
    train_copy(other, "1ep", "a", threads=1)  # what the other process will have made
    study = workdir / "stability" / "dense__1ep"
    holder = hold_lock(workdir / ".locks" / "stability__dense__1ep__a.train.lock", 600)
    try:
        with busy_raises(), pytest.raises(TrainingLockBusy, match=r"^the test's holder \(pid \d+ on here, since .*\) holds "):
            run_stability(workdir, "1ep", points=3, threads=1)
        assert (study / "copy_b" / "result.json").is_file() and not (study / "copy_a").exists()
        assert not (study / "result.json").exists()
        kept = mtimes(study / "copy_b")
        shutil.copytree(other / "stability" / "dense__1ep" / "copy_a", study / "copy_a")
    finally:
        holder.kill()
    with busy_raises():
        result = run_stability(workdir, "1ep", points=3, threads=1)
    assert result["skipped"] is False and result["points"] == 3 and mtimes(study / "copy_b") == kept


# ---- the lock module alone ----------------------------------------------------------------------
def test_busy_raises_names_the_holder_and_a_held_lock_is_taken_again_at_once(tmp_path, monkeypatch):
    """Inside busy_raises a lock another process holds raises at once (the free ones are taken);
    a thread that holds a training lock takes it again without waiting for itself, in either mode,
    while another thread of the process is still kept out."""
    monkeypatch.setenv("LOTTERY_TRAINING_LOCK_TIMEOUT", "2")  # a wait for itself would fail, not hang
    held, free = tmp_path / ".locks" / "a.train.lock", tmp_path / ".locks" / "b.train.lock"
    holder = hold_lock(held, 600)
    try:
        with busy_raises(), contextlib.ExitStack() as stack:
            claimed, busy = hold_training_locks(stack, [("a", held, "unit a"), ("b", free, "unit b")])
            assert claimed == ["b"] and isinstance(busy, TrainingLockBusy)
            assert str(busy).startswith("the test's holder (pid ") and str(busy).endswith(f"holds {held}")
            with pytest.raises(TrainingLockBusy, match="the test's holder"):
                with wait_training_lock(held, "unit a"):
                    pass
    finally:
        holder.kill()
        holder.wait()
    for mode in (contextlib.nullcontext, busy_raises):
        with mode():
            with wait_training_lock(free, "outer") as waited, wait_training_lock(free, "inner") as again:
                assert waited == 0.0 and again == 0.0
                out = {}

                def other_thread():
                    try:
                        with busy_raises(), wait_training_lock(free, "other thread"):
                            out["got"] = True
                    except TrainingLockBusy as exc:
                        out["busy"] = str(exc)

                thread = threading.Thread(target=other_thread)
                thread.start()
                thread.join(10)
                assert "outer (pid " in out.get("busy", ""), out
            with busy_raises(), wait_training_lock(free, "after") as waited:  # released by the outer block
                assert waited == 0.0
