"""A driver that tests/test_cluster.py runs with ``spark-submit`` inside a LocalCluster.

It saves the tiny linear model in a path Delta table, registers it with
``executor_transport="flight"`` against the cluster's Ray (``--ray-address``; the driver has
Ray's token, the executors neither the token nor an importable Ray), scores ``--rows`` rows in
``--partitions`` partitions on the Spark standalone executors, and writes JSON to ``--out``:
whether every prediction equals the in-process math, what the executors' ``import ray`` says,
the actors' nodes and Flight URIs and the rows the actors counted. An exception is written as
``{"error": ..., "traceback": ...}``.
"""

from __future__ import annotations

import argparse
import json
import traceback
from pathlib import Path
from typing import Any

from pyspark.sql import SparkSession


def _ray_on_executors(spark: SparkSession, partitions: int) -> list[str]:
    def probe(_: Any) -> Any:
        try:
            import ray  # noqa: F401
        except ImportError as exc:
            yield str(exc)
            return
        yield "imported"

    return sorted(set(spark.sparkContext.parallelize(range(partitions), partitions).mapPartitions(probe).collect()))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ray-address", required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--rows", type=int, default=20000)
    p.add_argument("--partitions", type=int, default=4)
    args = p.parse_args()
    data = Path(args.data_dir)
    out: dict[str, Any] = {}
    spark = (
        SparkSession.builder.appName("flight-cluster-app")
        .config("spark.sql.extensions", "io.delta.sql.DeltaSparkSessionExtension")
        .config("spark.sql.catalog.spark_catalog", "org.apache.spark.sql.delta.catalog.DeltaCatalog")
        .config("spark.sql.warehouse.dir", str(data / "warehouse"))
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    try:
        from spark_ray_udf import register_ray_model, save_model
        from spark_ray_udf.testing import apply_linear, init_linear, make_linear_model
        from tests.helpers import expected_classes, features_sql

        out["executors_import_ray"] = _ray_on_executors(spark, args.partitions * 2)
        linear = make_linear_model(data / "linear", n_features=8, n_classes=3, seed=0)
        table = str(data / "tables" / "linear")
        save_model(spark, data / "linear", table)
        with register_ray_model(
            spark, table, "flight_predict", init_linear, apply_linear, return_type="bigint",
            num_actors=2, ray_address=args.ray_address, init_timeout_s=120, call_timeout_s=60,
            executor_transport="flight",
        ) as model:
            out["actor_nodes"] = [a.node_id for a in model.actors]
            out["flight_uris"] = [a.flight_uri for a in model.actors]
            got = spark.sql(
                f"select id, flight_predict({features_sql()}) as p "
                f"from range(0, {args.rows}, 1, {args.partitions})"
            ).collect()
            got.sort(key=lambda r: r.id)
            out["rows"] = len(got)
            out["exact"] = [r.p for r in got] == expected_classes(linear, [r.id for r in got])
            out["rows_sql"] = model.stats()["rows"]["sql"]
    except Exception as exc:  # reported to the test
        out["error"] = f"{type(exc).__name__}: {exc}"[:4000]
        out["traceback"] = traceback.format_exc()[-8000:]
    finally:
        Path(args.out).write_text(json.dumps(out))
        spark.stop()


if __name__ == "__main__":
    main()
