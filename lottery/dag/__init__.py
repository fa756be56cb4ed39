"""The Airflow side of the experiment, so that ``dags/lottery_ticket.py`` is only wiring.

* ``params``: the trigger form (``PARAMS``) and what a run derives from its params: the run plan
  (``lottery.plan.RunPlan``), the data paths and the Spark job's arguments.
* ``tasks``: the task bodies, each a short function the DAG's ``@task`` calls: thread sizing,
  engine-error translation, mapped-instance labels, the mapped kwargs (one ticket per instance, or
  groups of ``tickets_per_task``), start/end log lines, small XCom values.

Light at import time (the DAG file imports both when it is parsed): no TensorFlow, Keras, NumPy
or PySpark; the engine steps are imported inside the task functions.
"""
