"""Spark jobs of the project (run with spark-submit; see docs/spark-preprocessing.md)."""
