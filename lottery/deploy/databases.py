"""The loopback cluster's backing stores: a PostgreSQL database (metadata + Celery results) and a
Redis database number (the Celery broker), each claimed for one cluster and released by it."""

from __future__ import annotations

from contextlib import closing
from urllib.parse import urlsplit, urlunsplit

REDIS_OWNER_KEY = "lottery-cluster-local:owner"


# ---- PostgreSQL --------------------------------------------------------------------------------
def pg_connect(pg_url: str, dbname: str = "postgres"):
    import psycopg2

    parts = urlsplit(pg_url)
    conn = psycopg2.connect(
        host=parts.hostname or "127.0.0.1", port=parts.port or 5432, user=parts.username or "postgres",
        password=parts.password, dbname=dbname, connect_timeout=10,
    )
    conn.autocommit = True
    return conn


def _execute(pg_url: str, statement: str, *args) -> tuple | None:
    """Run one statement on the server's ``postgres`` database; its first row, if it returns rows."""
    with closing(pg_connect(pg_url)) as conn, conn.cursor() as cur:
        cur.execute(statement, args or None)
        return cur.fetchone() if cur.description else None


def database_exists(pg_url: str, name: str) -> bool:
    return _execute(pg_url, "SELECT 1 FROM pg_database WHERE datname = %s", name) is not None


def create_database(pg_url: str, name: str) -> bool:
    """Create database ``name`` unless it exists; True when it was created."""
    if database_exists(pg_url, name):
        return False
    _execute(pg_url, f'CREATE DATABASE "{name}"')
    return True


def drop_database(pg_url: str, name: str) -> None:
    _execute(pg_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def database_url(pg_url: str, name: str, driver: str = "postgresql+psycopg2") -> str:
    parts = urlsplit(pg_url)
    return urlunsplit((driver, parts.netloc, f"/{name}", "", ""))


# ---- Redis -------------------------------------------------------------------------------------
def redis_client(redis_url: str, db: int):
    import redis

    return redis.Redis.from_url(redis_url, db=db, socket_timeout=10)


def claim_redis_db(redis_url: str, token: str, preferred: int = 5) -> int:
    """A Redis database number for this cluster alone: the preferred one if nobody owns it and it
    holds no foreign keys, else the first such one of 1..15. Claimed with an owner key."""
    for db in [preferred, *[d for d in range(1, 16) if d != preferred]]:
        r = redis_client(redis_url, db)
        try:
            if r.set(REDIS_OWNER_KEY, token, nx=True):
                if r.dbsize() == 1:
                    return db
                r.delete(REDIS_OWNER_KEY)  # someone else's data without an owner key: leave it
            elif (r.get(REDIS_OWNER_KEY) or b"").decode() == token:
                return db
        finally:
            r.close()
    raise RuntimeError(f"no free Redis database at {redis_url} (1..15 are all in use)")


def release_redis_db(redis_url: str, db: int, token: str) -> bool:
    """Flush the claimed database, only if this cluster still owns it."""
    r = redis_client(redis_url, db)
    try:
        if (r.get(REDIS_OWNER_KEY) or b"").decode() != token:
            return False
        r.flushdb()
        return True
    finally:
        r.close()
