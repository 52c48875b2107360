"""Session-wide fixtures: a Delta-enabled local Spark and a local Ray (see spark_ray_udf.testing)."""

from spark_ray_udf.testing import ray_address, spark  # noqa: F401  (pytest fixtures)
