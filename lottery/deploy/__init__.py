"""The deployment around the engine. Nothing here is imported by the engine itself.

* ``constants``: the names the DAG, the plugin, docker/ and the local tools share (pool, slots,
  queues, DAG id, Spark connection, artifact root, retries). Cheap: the DAG file imports it at parse
  time, the plugin in every Airflow component.
* ``supervisor``: the one process supervisor (process groups, a log per component, health waits,
  stop everything) behind ``make run``, ``make ui`` and ``make cluster-up``.
* ``airflow_home``: the project-local Airflow home of ``make run`` / ``make ui`` (config, database,
  the components on it); ``airflow_init``: the pool and ``spark_default`` (also the compose file's
  airflow-init); ``api``: the REST API client.
* ``run`` (``make run``), ``ui`` (``make ui``), ``cluster`` (``make cluster-up`` / ``cluster-down``,
  with ``databases``: its PostgreSQL database and Redis number).
"""
