"""Lottery tickets at scale: dense training with rewind points, magnitude masks, late resetting.

Importing the package is cheap (the DAG file imports lottery.config at parse time); TensorFlow and
Keras are imported by the modules that need them.
"""

__version__ = "0.1.0"
