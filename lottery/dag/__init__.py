"""The Airflow side of the experiment, so that ``dags/lottery_ticket.py`` is only wiring.

* ``params``: the trigger form (``PARAMS``) and what a run derives from its params (the run plan,
  the data paths, the Spark job's arguments).
* ``tasks``: the task bodies, each a short function the DAG's ``@task`` calls.

Light at import time (the DAG file imports both when it is parsed): no TensorFlow, Keras, NumPy
or PySpark; the engine steps are imported inside the task functions.
"""
