"""Lottery tickets at scale: dense training with rewind points, magnitude masks, late resetting.

Importing the package is cheap (the DAG file imports lottery.config at parse time); TensorFlow and
Keras are imported by the modules that need them.
"""

import logging

__version__ = "0.1.0"

# JAX logs "Unable to initialize backend 'tpu'" (INFO) in every process of a machine without one, task
# logs included: never the user's concern (a backend that fails for real still raises).
logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
