"""What the ``lottery_report`` plugin registers: the report app (built on its first request) and
the URLs of the UI's "Report" tabs.

Airflow imports plugin modules in every component, task processes included; only the api-server
serves the app. So this module is pure Python and the FastAPI app (with the api-server's security
imports) is built by ``LazyApp`` when the api-server first routes a request to it.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable
from urllib.parse import urlparse

URL_PREFIX = "/lottery"


class LazyApp:
    """An ASGI app that builds the real one (``"module:factory"``) on its first request."""

    def __init__(self, factory: str):
        self.factory = factory
        self._app: Callable[..., Any] | None = None

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if self._app is None:
            module, name = self.factory.split(":")
            self._app = getattr(importlib.import_module(module), name)()
        await self._app(scope, receive, send)


def ui_base() -> str:
    """The path the UI is served under ("" at the host's root), from ``[api] base_url``."""
    from airflow.configuration import conf

    return urlparse(conf.get("api", "base_url", fallback="") or "").path.rstrip("/")


def page_href(destination: str) -> str:
    """The iframe URL of an external view: the UI fills in {DAG_ID}, {RUN_ID}, {TASK_ID} (URL-encoded)."""
    href = f"{ui_base()}{URL_PREFIX}/dags/{{DAG_ID}}/runs/{{RUN_ID}}/"
    return href + ("?task_id={TASK_ID}" if destination == "task_instance" else "")


def external_views() -> list[dict[str, str]]:
    """A "Report" tab on every DAG run and every task instance (the UI cannot limit a tab to one DAG
    or task; the page says when a run is not a lottery_ticket run)."""
    return [
        {"name": "Report", "href": page_href("dag_run"), "destination": "dag_run", "url_route": "lottery-report"},
        {"name": "Report", "href": page_href("task_instance"), "destination": "task_instance",
         "url_route": "lottery-report-task"},
    ]
