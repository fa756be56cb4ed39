"""What a fresh Airflow database needs for the lottery-ticket DAG: its pool and the Spark connection.

``python -m lottery.deploy.airflow_init`` is the second half of the compose file's airflow-init
service (docker/airflow-init.sh runs it after ``airflow db migrate``; the loopback cluster runs the
same script). Idempotent, in one interpreter (each ``airflow`` CLI call costs seconds):

* pool ``POOL`` with ``$LOTTERY_POOL_SLOTS`` slots (default 20: one per GPU worker);
* connection ``spark_default`` -> ``$SPARK_MASTER_URL``, keeping an existing one's extras;
* the admin user's password from ``$AIRFLOW_ADMIN_PASSWORD`` (without it the API server generates
  one and prints it in its log);
* ``$LOTTERY_ARTIFACT_ROOT`` exists and is writable (the volume every worker shares).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from lottery.files import json_or, write_text
from lottery.deploy.constants import POOL, POOL_DESCRIPTION, POOL_SLOTS, SPARK_CONN_ID


def spark_master_parts(url: str) -> tuple[str, str, int | None]:
    """``spark://host:7077`` -> (conn_type, host, port): the form SparkSubmitHook turns back into
    ``spark://host:7077``. ``local[*]`` -> ("spark", "local[*]", None)."""
    if "://" not in url:
        return "spark", url, None
    parts = urlsplit(url)
    if not parts.hostname:
        raise SystemExit(f"SPARK_MASTER_URL={url!r}: no host")
    return parts.scheme, parts.hostname, parts.port


def ensure_pool(session, slots: int = POOL_SLOTS) -> None:
    from airflow.models import Pool

    Pool.create_or_update_pool(POOL, slots, POOL_DESCRIPTION, False, session=session)


def point_spark_default(session, master: str, *, description: str, keep_existing: bool = False) -> str:
    """Create ``spark_default`` for ``master``, or point the existing one at it (``keep_existing``:
    leave an existing one as it is). Returns where it points, for the log line."""
    from airflow.models import Connection

    conn = session.query(Connection).filter(Connection.conn_id == SPARK_CONN_ID).one_or_none()
    if conn is not None and keep_existing:
        return f"{conn.host} (kept)"
    if conn is None:
        conn = Connection(conn_id=SPARK_CONN_ID, description=description)
        session.add(conn)
    conn.conn_type, conn.host, conn.port = spark_master_parts(master)
    return master


def write_admin_password(user: str, password: str) -> Path:
    """The simple auth manager's password file, with ``user``'s password replaced atomically."""
    from airflow.configuration import conf

    path = Path(conf.get("core", "simple_auth_manager_passwords_file"))
    path.parent.mkdir(parents=True, exist_ok=True)
    passwords = json_or(path, {})
    passwords[user] = password
    write_text(path, json.dumps(passwords) + "\n", mode=0o600)
    return path


def artifact_root_writable(root: str) -> bool:
    Path(root).mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.NamedTemporaryFile(dir=root, prefix=".airflow-init-"):
            pass
    except OSError as exc:
        print(f"error: artifact root {root} is not writable by uid {os.getuid()}: {exc}", file=sys.stderr)
        return False
    print(f"artifact root {root} is writable")
    return True


def main() -> int:
    master = os.environ.get("SPARK_MASTER_URL", "spark://spark-master:7077")
    spark_master_parts(master)  # a malformed URL fails before anything is written

    from airflow.utils.session import create_session

    with create_session() as session:
        ensure_pool(session)
        point_spark_default(session, master, description="Spark master of the cluster (airflow-init)")
    print(f"pool {POOL} = {POOL_SLOTS} slots; connection {SPARK_CONN_ID} -> {master}")

    password = os.environ.get("AIRFLOW_ADMIN_PASSWORD")
    if password:
        user = os.environ.get("AIRFLOW_ADMIN_USER", "admin")
        print(f"password of {user} written to {write_admin_password(user, password)}")

    root = os.environ.get("LOTTERY_ARTIFACT_ROOT")
    if root and not artifact_root_writable(root):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
