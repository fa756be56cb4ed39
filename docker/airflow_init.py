"""Second half of airflow-init (docker/airflow-init.sh runs it after `airflow db migrate`).

Idempotent, in one interpreter (each `airflow` CLI call costs seconds):

* pool ``lottery_workers`` with ``$LOTTERY_POOL_SLOTS`` slots (default 20: one per GPU worker);
* connection ``spark_default`` -> ``$SPARK_MASTER_URL`` (default ``spark://spark-master:7077``);
  an existing connection keeps its extras (deploy mode, spark binary) and gets the master;
* the password of the simple auth manager's admin user, from ``$AIRFLOW_ADMIN_PASSWORD``, in
  ``[core] simple_auth_manager_passwords_file`` (without it the API server generates one and
  prints it in its log);
* ``$LOTTERY_ARTIFACT_ROOT`` exists and is writable (it is the volume every worker shares).

The pool name must match ``POOL`` in dags/lottery_ticket.py (tests/test_compose.py checks it).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

POOL = "lottery_workers"
POOL_DESCRIPTION = "Training tasks of the lottery-ticket DAG (one slot per GPU worker)"
SPARK_CONN_ID = "spark_default"


def spark_master_parts(url: str) -> tuple[str, str, int | None]:
    """``spark://host:7077`` -> (conn_type, host, port): the form SparkSubmitHook turns back into
    ``spark://host:7077``. ``local[*]`` -> ("spark", "local[*]", None)."""
    if "://" not in url:
        return "spark", url, None
    parts = urlsplit(url)
    if not parts.hostname:
        raise SystemExit(f"SPARK_MASTER_URL={url!r}: no host")
    return parts.scheme, parts.hostname, parts.port


def main() -> int:
    slots = int(os.environ.get("LOTTERY_POOL_SLOTS", "20"))
    master = os.environ.get("SPARK_MASTER_URL", "spark://spark-master:7077")
    conn_type, host, port = spark_master_parts(master)

    from airflow.configuration import conf
    from airflow.models import Connection, Pool
    from airflow.utils.session import create_session

    with create_session() as session:
        Pool.create_or_update_pool(POOL, slots, POOL_DESCRIPTION, False, session=session)
        conn = session.query(Connection).filter(Connection.conn_id == SPARK_CONN_ID).one_or_none()
        if conn is None:
            conn = Connection(conn_id=SPARK_CONN_ID, description="Spark master of the cluster (airflow-init)")
            session.add(conn)
        conn.conn_type, conn.host, conn.port = conn_type, host, port
    print(f"pool {POOL} = {slots} slots; connection {SPARK_CONN_ID} -> {master}")

    password = os.environ.get("AIRFLOW_ADMIN_PASSWORD")
    if password:
        user = os.environ.get("AIRFLOW_ADMIN_USER", "admin")
        path = Path(conf.get("core", "simple_auth_manager_passwords_file"))
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            passwords = json.loads(path.read_text())
        except (OSError, ValueError):
            passwords = {}
        passwords[user] = password
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(passwords) + "\n")
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
        print(f"password of {user} written to {path}")

    root = os.environ.get("LOTTERY_ARTIFACT_ROOT")
    if root:
        Path(root).mkdir(parents=True, exist_ok=True)
        try:
            with tempfile.NamedTemporaryFile(dir=root, prefix=".airflow-init-"):
                pass
        except OSError as exc:
            print(f"error: artifact root {root} is not writable by uid {os.getuid()}: {exc}", file=sys.stderr)
            return 1
        print(f"artifact root {root} is writable")
    return 0


if __name__ == "__main__":
    sys.exit(main())
