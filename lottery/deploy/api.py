"""The Airflow REST API (v2) as ``make run``, ``make ui``, the loopback cluster and the tests use it:
a JWT from the simple auth manager, the DAG, its runs, task instances, XComs and task logs."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import quote

from lottery.deploy.constants import DAG_ID
from lottery.deploy.supervisor import Supervisor, wait_until


def xcom_value(value: Any) -> Any:
    """An XCom value as the task returned it: Airflow hands JSON values back as strings."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


class Api:
    """The public REST API with a JWT from ``/auth/token`` (renewed once when it expires)."""

    def __init__(self, base_url: str, user: str, password: str):
        self.base = base_url.rstrip("/")
        self.user, self.password = user, password
        self.token: str | None = None

    def _request(self, method: str, path: str, body: Any = None, *, auth: bool = True,
                 timeout: float = 30) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if auth:
            if self.token is None:
                self.login()
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
                return resp.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as err:
            raw = err.read()
            try:
                payload = json.loads(raw)
            except ValueError:
                payload = raw.decode(errors="replace")
            if err.code == 401 and auth and self.token is not None:
                self.token = None  # expired: log in again once
                return self._request(method, path, body, auth=auth, timeout=timeout)
            return err.code, payload

    def login(self) -> None:
        status, payload = self._request("POST", "/auth/token", {"username": self.user, "password": self.password},
                                        auth=False)
        if status not in (200, 201):
            raise RuntimeError(f"login to {self.base} as {self.user} failed: HTTP {status} {payload}")
        self.token = payload["access_token"]

    def get(self, path: str) -> tuple[int, Any]:
        return self._request("GET", path)

    def post(self, path: str, body: Any) -> tuple[int, Any]:
        return self._request("POST", path, body)

    def patch(self, path: str, body: Any) -> tuple[int, Any]:
        return self._request("PATCH", path, body)

    def healthy(self) -> dict | None:
        try:
            status, payload = self._request("GET", "/api/v2/monitor/health", auth=False, timeout=5)
        except (urllib.error.URLError, ConnectionError, OSError, ValueError):
            return None
        return payload if status == 200 else None

    # -- the lottery_ticket DAG --
    def wait_for_dag(self, supervisor: Supervisor | None, timeout: float = 300) -> dict:
        """The DAG once the dag-processor has parsed it; RuntimeError with the stack trace when the
        DAG file does not import."""
        def parsed() -> dict | None:
            status, dag = self.get(f"/api/v2/dags/{DAG_ID}")
            if status == 200:
                return dag
            status, errors = self.get("/api/v2/importErrors")
            if status == 200 and errors.get("import_errors"):
                for err in errors["import_errors"]:
                    if DAG_ID in err.get("filename", ""):
                        raise RuntimeError(f"the DAG file does not import:\n{err.get('stack_trace')}")
            return None

        return wait_until(parsed, timeout, 2, what=f"the dag-processor to parse {DAG_ID}", supervisor=supervisor)

    def wait_ready(self, supervisor: Supervisor | None, timeout: float = 180) -> dict:
        """The API server answers, then the DAG is parsed."""
        wait_until(self.healthy, timeout, what="the API server", supervisor=supervisor)
        return self.wait_for_dag(supervisor)

    def task_instances(self, run_id: str) -> list[dict]:
        out, offset = [], 0
        while True:
            status, page = self.get(f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances?limit=100&offset={offset}")
            if status != 200:
                raise RuntimeError(f"listing task instances failed: HTTP {status} {page}")
            items = page.get("task_instances", [])
            out.extend(items)
            offset += len(items)
            if not items or offset >= page.get("total_entries", 0):
                return out

    def xcom(self, run_id: str, task_id: str) -> Any:
        """A task's return value (None when it has none)."""
        status, entry = self.get(f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{task_id}"
                                 "/xcomEntries/return_value")
        if status != 200:
            return None
        return xcom_value(entry.get("value"))

    def task_error(self, run_id: str, ti: dict) -> str | None:
        """The exception message in a failed task instance's log."""
        path = (f"/api/v2/dags/{DAG_ID}/dagRuns/{quote(run_id)}/taskInstances/{ti['task_id']}/logs/"
                f"{max(1, ti.get('try_number') or 1)}?full_content=true&map_index={ti.get('map_index', -1)}")
        status, payload = self.get(path)
        if status != 200 or not isinstance(payload, dict):
            return None
        for event in reversed(payload.get("content") or []):
            if isinstance(event, dict):
                for detail in event.get("error_detail") or []:
                    if detail.get("exc_value"):
                        return f"{detail.get('exc_type')}: {detail['exc_value']}"
        return None
