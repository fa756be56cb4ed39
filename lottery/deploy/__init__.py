"""The deployment around the engine: names shared by the DAG, the plugin, docker/ and the local
process supervisors (``constants``), and the tools behind ``make run``, ``make ui`` and
``make cluster-up``. Importing ``lottery.deploy.constants`` is cheap: the DAG file does it at parse time.
"""
