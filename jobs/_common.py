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


def parse_args(description: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The options every job takes: ``--data-dir`` and ``--cores``."""
    parser = argparse.ArgumentParser(description=description)
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


@contextmanager
def spark_and_ray(app_name: str, data_dir: Path, *, cores: int = 2) -> Iterator[SparkSession]:
    """A local Delta-enabled Spark (warehouse under ``data_dir``) and a connected Ray.

    Ray is started (on 127.0.0.1) unless ``RAY_ADDRESS`` names a cluster. On exit Spark is
    stopped and this process disconnects from Ray, which also stops the local Ray it started.
    """
    import ray

    from spark_ray_udf._ray import ensure_ray
    from spark_ray_udf.testing import local_spark

    # Ray workers inherit this environment: keep TensorFlow's C++ start-up chatter out.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    data_dir.mkdir(parents=True, exist_ok=True)
    connected_here = not ray.is_initialized()
    spark = local_spark(app_name, cores=cores, warehouse_dir=str(data_dir.resolve() / "warehouse"))
    try:
        gcs = ensure_ray()
        log.info("Spark %s (local[%d]), Ray at %s", spark.version, cores, gcs)
        yield spark
    finally:
        spark.stop()
        if connected_here and ray.is_initialized():
            ray.shutdown()
