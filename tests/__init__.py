"""Tests of spark-ray-udf: a package, so Ray workers can import ``tests.helpers`` by name."""
