"""Test helpers users can reuse: a Delta-enabled local Spark, a local Ray, and a tiny model.

This module is a pytest plugin (entry point ``pytest11``): once spark-ray-udf is installed, every
test can ask for the fixtures ``spark`` (a session-wide local Spark with Delta), ``ray_address``
(a session-wide local Ray) and ``ray_model`` (a factory that calls
:func:`~spark_ray_udf.register_ray_model` and closes what it registered when the test ends),
without a ``conftest.py``. ``pytest -p no:spark_ray_udf.testing`` turns it off.

A real multi-node cluster on this machine (Spark standalone + a two-node Ray, in a private
network namespace, everything on loopback) is :class:`LocalCluster` (see
:mod:`spark_ray_udf.cluster`)::

    from spark_ray_udf.testing import LocalCluster

    with LocalCluster() as cluster:
        cluster.spark_submit("my_job.py", "--ray-address", cluster.ray_address)

The tiny model is a linear classifier stored as two ``.npy`` files: :func:`make_linear_model`
writes one, :func:`init_linear` loads it, :func:`apply_linear` predicts classes and
:func:`apply_linear_scores` the raw scores. It lives in the package so that Ray actors and Spark
workers can import it.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from spark_ray_udf.cluster import LocalCluster  # noqa: F401  (re-exported for users)


if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from spark_ray_udf.udf import RayModel

try:
    import pytest
except ImportError:  # pragma: no cover - pytest is a dev dependency
    pytest = None  # type: ignore[assignment]


def local_spark(
    app_name: str = "spark-ray-udf",
    *,
    cores: int = 2,
    warehouse_dir: str | None = None,
    conf: Mapping[str, str] | None = None,
    connect: bool = False,
) -> SparkSession:
    """A local Spark session with Delta Lake, its Python workers on this interpreter.

    The Delta JARs come from Maven Central through ``spark.jars.packages`` the first time
    (cached in ``~/.ivy2*`` afterwards). ``connect=True`` starts a local Spark Connect server in
    this process and returns a Connect session to it (``SparkSession.builder.remote("local")``);
    the server listens on an ephemeral port (``SPARK_TESTING=1`` is set for that), so several
    such processes can run on one machine. A process holds either kind of session, not both.

    Example::

        spark = local_spark("my-job", warehouse_dir="/tmp/warehouse")
    """
    from delta import configure_spark_with_delta_pip
    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    warehouse = warehouse_dir or tempfile.mkdtemp(prefix="spark-warehouse-")
    if connect:
        os.environ.setdefault("SPARK_TESTING", "1")  # an ephemeral port, not 15002
        builder = SparkSession.builder.remote(f"local[{cores}]")
    else:
        builder = SparkSession.builder.master(f"local[{cores}]")
    builder = (
        builder.appName(app_name)
        .config("spark.sql.extensions", "io.delta.sql.DeltaSparkSessionExtension")
        .config("spark.sql.catalog.spark_catalog", "org.apache.spark.sql.delta.catalog.DeltaCatalog")
        .config("spark.sql.warehouse.dir", warehouse)
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.shuffle.partitions", str(max(2, cores)))
        .config("spark.databricks.delta.snapshotPartitions", "2")
        .config("spark.driver.memory", "2g")
    )
    for key, value in (conf or {}).items():
        builder = builder.config(key, value)
    spark = configure_spark_with_delta_pip(builder).getOrCreate()
    from pyspark import SparkContext

    context = SparkContext._active_spark_context  # the local Connect server's, with connect=True
    if context is not None:
        context.setLogLevel("ERROR")
    return spark


@dataclass(frozen=True)
class LinearModel:
    """``scores = x @ weights + bias``; the predicted class is the argmax."""

    weights: np.ndarray
    bias: np.ndarray

    def scores(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype=np.float64) @ self.weights + self.bias

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.scores(x).argmax(axis=1)


def make_linear_model(
    model_dir: str | os.PathLike[str], *, n_features: int = 8, n_classes: int = 3, seed: int = 0
) -> LinearModel:
    """Write a random linear classifier into ``model_dir`` and return it.

    >>> import tempfile
    >>> m = make_linear_model(tempfile.mkdtemp(), n_features=4, n_classes=2)
    >>> m.predict(np.ones((3, 4))).shape
    (3,)
    """
    rng = np.random.default_rng(seed)
    root = Path(model_dir)
    root.mkdir(parents=True, exist_ok=True)
    model = LinearModel(
        weights=rng.normal(size=(n_features, n_classes)),
        bias=rng.normal(size=n_classes),
    )
    np.save(root / "weights.npy", model.weights, allow_pickle=False)
    np.save(root / "bias.npy", model.bias, allow_pickle=False)
    return model


def init_linear(model_dir: str, conf: Mapping[str, Any]) -> LinearModel:
    """``init_func`` for :func:`make_linear_model`'s folders."""
    root = Path(model_dir)
    return LinearModel(
        weights=np.load(root / "weights.npy", allow_pickle=False),
        bias=np.load(root / "bias.npy", allow_pickle=False),
    )


def apply_linear(model: LinearModel, x: np.ndarray) -> np.ndarray:
    """``apply_func`` returning the class of each row (``return_type="bigint"``)."""
    return model.predict(x)


def apply_linear_scores(model: LinearModel, x: np.ndarray) -> np.ndarray:
    """``apply_func`` returning each row's scores (``return_type="array<double>"``)."""
    return model.scores(x)


if pytest is not None:

    @pytest.fixture(scope="session")
    def spark(tmp_path_factory: Any) -> Iterator[SparkSession]:
        """A session-wide local Spark with Delta, its warehouse in a temporary folder."""
        session = local_spark("spark-ray-udf-tests", warehouse_dir=str(tmp_path_factory.mktemp("warehouse")))
        yield session
        session.stop()

    @pytest.fixture
    def ray_model(spark: SparkSession, ray_address: str) -> Iterator[Callable[..., RayModel]]:
        """``ray_model(table, name, init_func, apply_func, **options)``: register a function
        like :func:`~spark_ray_udf.register_ray_model` on the ``spark`` session; every function
        it registered is closed when the test ends."""
        from spark_ray_udf.udf import register_ray_model

        registered: list[RayModel] = []

        def register(
            table: str, name: str, init_func: Callable[..., Any], apply_func: Callable[..., Any],
            **options: Any,
        ) -> RayModel:
            model = register_ray_model(spark, table, name, init_func, apply_func, **options)
            registered.append(model)
            return model

        yield register
        for model in reversed(registered):
            model.close()

    @pytest.fixture(scope="session")
    def ray_address() -> Iterator[str]:
        """A session-wide local Ray (127.0.0.1, dashboard off); yields its GCS address."""
        import ray

        from spark_ray_udf._ray import ensure_ray

        started = not ray.is_initialized()
        yield ensure_ray()
        if started:
            ray.shutdown()
