"""Plumbing shared by the demo jobs: arguments, logging, table paths, and the Spark + Ray session.

Nothing here is sent to Ray or to Spark's Python workers: functions that run remotely live in
the job scripts, whose ``__main__`` is pickled by value, so neither Ray's workers nor Spark's need
to import ``jobs``.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger("jobs")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def parse_args(
    description: str, argv: Sequence[str] | None = None, *, epochs: int | None = None
) -> argparse.Namespace:
    """The options every job takes: ``--data-dir``, ``--cores``, ``--ray-address``; with
    ``epochs`` (a default), also ``--epochs`` (the training job)."""
    parser = argparse.ArgumentParser(description=description)
    if epochs is not None:
        parser.add_argument(
            "--epochs", type=int, default=epochs, help=f"training epochs (default: {epochs})"
        )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path("demo_data"),
        help="folder holding the Delta tables (under tables/) and the Spark warehouse "
        "(default: demo_data)",
    )
    parser.add_argument(
        "--cores", type=int, default=2, help="cores of the local Spark (default: 2)"
    )
    parser.add_argument(
        "--ray-address",
        default=None,
        help="GCS address (host:port) of a running Ray cluster; default: RAY_ADDRESS, or a local "
        "Ray started on 127.0.0.1. With token auth the driver needs the token (RAY_AUTH_TOKEN_PATH "
        "or RAY_AUTH_TOKEN) and so do the executors (docs/deploy.md)",
    )
    args = parser.parse_args(argv)
    if args.cores < 1:
        parser.error(f"--cores must be a positive int (got {args.cores})")
    return args


def setup_logging() -> None:
    """WARNING for everything, INFO for the library (``spark_ray_udf``) and the jobs."""
    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT)
    for name in ("spark_ray_udf", "jobs"):
        logging.getLogger(name).setLevel(logging.INFO)


@dataclass(frozen=True)
class Tables:
    """Absolute paths of the demo's Delta tables under ``<data-dir>/tables``."""

    root: Path

    @classmethod
    def under(cls, data_dir: Path) -> Tables:
        return cls(data_dir.resolve() / "tables")

    @property
    def mnist(self) -> str:
        """``id bigint, image array<float>, label int, split string`` (split: train/test)."""
        return str(self.root / "mnist")

    @property
    def model(self) -> str:
        """The Keras model, as written by ``save_model``."""
        return str(self.root / "mnist_model")

    @property
    def predictions(self) -> str:
        """``id bigint, label int, predicted int`` for the test split."""
        return str(self.root / "mnist_predictions")


def launched_by_spark_submit() -> bool:
    """True when this script runs under ``spark-submit`` (which then owns the master and JARs).

    >>> launched_by_spark_submit() == ("PYSPARK_GATEWAY_PORT" in os.environ)
    True
    """
    return "PYSPARK_GATEWAY_PORT" in os.environ


def _submitted_spark(app_name: str, warehouse: str) -> SparkSession:
    """The session of a ``spark-submit`` run: its ``--master`` and ``--packages``/``--jars``
    (Delta's) are kept; only Delta's SQL settings and the warehouse are added."""
    from pyspark.sql import SparkSession

    spark = (
        SparkSession.builder.appName(app_name)
        .config("spark.sql.extensions", "io.delta.sql.DeltaSparkSessionExtension")
        .config("spark.sql.catalog.spark_catalog", "org.apache.spark.sql.delta.catalog.DeltaCatalog")
        .config("spark.sql.warehouse.dir", warehouse)
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    return spark


@contextmanager
def spark_and_ray(
    app_name: str, data_dir: Path, *, cores: int = 2, ray_address: str | None = None
) -> Iterator[SparkSession]:
    """A Delta-enabled Spark (warehouse under ``data_dir``) and a connected Ray.

    Run with ``python``, Spark is local (``cores`` cores); under ``spark-submit`` it is the
    ``--master`` given there. Ray is ``ray_address``, else ``RAY_ADDRESS``, else a local Ray
    started on 127.0.0.1. On exit Spark is stopped and this process disconnects from Ray,
    which also stops the local Ray it started.
    """
    import ray

    from spark_ray_udf._ray import ensure_ray
    from spark_ray_udf.testing import local_spark

    # Ray workers inherit this environment: keep TensorFlow's C++ start-up chatter out.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    data_dir.mkdir(parents=True, exist_ok=True)
    connected_here = not ray.is_initialized()
    warehouse = str(data_dir.resolve() / "warehouse")
    if launched_by_spark_submit():
        spark = _submitted_spark(app_name, warehouse)
    else:
        spark = local_spark(app_name, cores=cores, warehouse_dir=warehouse)
    try:
        gcs = ensure_ray(ray_address)
        log.info("Spark %s (%s), Ray at %s", spark.version, spark.sparkContext.master, gcs)
        yield spark
    finally:
        spark.stop()
        if connected_here and ray.is_initialized():
            ray.shutdown()
