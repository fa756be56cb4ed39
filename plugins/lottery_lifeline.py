"""Task processes of the lottery-ticket deployment stop when their Airflow task supervisor dies.

A listener: Airflow's task runner calls ``on_starting`` with a ``TaskRunnerMarker`` as a forked
task process starts (other components call it with their own marker, and are left alone). See
``lottery.deploy.lifeline`` and docs/reliability.md.
"""

from __future__ import annotations

from airflow.listeners import hookimpl
from airflow.plugins_manager import AirflowPlugin

from lottery.deploy.lifeline import stop_with_parent


class TaskLifeline:
    @hookimpl
    def on_starting(self, component) -> None:
        if type(component).__name__ == "TaskRunnerMarker":
            stop_with_parent()


class LotteryLifelinePlugin(AirflowPlugin):
    name = "lottery_lifeline"
    listeners = [TaskLifeline()]
