"""A driver that tests/test_cluster.py runs with ``spark-submit`` inside a LocalCluster.

It saves the tiny linear model in a path Delta table, registers it against the cluster's Ray
(``--ray-address``), scores ``--rows`` rows in ``--partitions`` partitions on the Spark
standalone executors, and writes what it saw as JSON to ``--out``: whether every prediction
equals the in-process math, the Ray nodes the actors run on, how the model reached them, and
which executor Python workers had imported Ray before connecting. ``--kill-wait FILE``: after
the first query, write ``<out>.phase1`` and wait for FILE (the test kills a Ray node meanwhile),
then query again. ``--ray-address spark`` starts Ray on Spark (options: ``--ray-on-spark``
JSON) and also records whether the actors run under Spark executors, the start time, and the
Ray processes left after close. ``locality`` holds the pool's rows and batches per actor node and
``crossed_nodes``. An exception is written as ``{"error": ...}`` with the seconds it took.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from pyspark.sql import SparkSession


def _session(warehouse: str) -> SparkSession:
    spark = (
        SparkSession.builder.appName("cluster-app")
        .config("spark.sql.extensions", "io.delta.sql.DeltaSparkSessionExtension")
        .config("spark.sql.catalog.spark_catalog", "org.apache.spark.sql.delta.catalog.DeltaCatalog")
        .config("spark.sql.warehouse.dir", warehouse)
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def _import_ray_on_executors(spark: SparkSession, partitions: int) -> list[int]:
    """Import Ray (auth mode unset) in the executors' Python workers; their PIDs."""

    def touch(_: Any) -> Any:
        import ray  # noqa: F401  (the point: Ray imported before the UDF connects)

        yield os.getpid()

    return sorted(set(spark.sparkContext.parallelize(range(partitions), partitions).mapPartitions(touch).collect()))


def _node_of(actor: Any, timeout_s: float = 120.0) -> str:
    """The node an actor runs on, asked of the actor (waiting while Ray restarts it)."""
    import ray
    from ray.exceptions import ActorUnavailableError

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return ray.get(
                actor.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()),
                timeout=30,
            )
        except ActorUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def _under_executor(actor: Any) -> bool:
    """Whether the actor's process descends from a Spark executor (CoarseGrainedExecutorBackend):
    true for a Ray node that a Spark task started (Ray on Spark)."""
    import ray

    def walk(_self: Any) -> bool:
        pid = os.getpid()
        while pid > 1:
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                pid = int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
            except OSError:
                return False
            if b"CoarseGrainedExecutorBackend" in cmd:
                return True
        return False

    return bool(ray.get(actor.__ray_call__.remote(walk), timeout=60))


def _ray_processes() -> list[str]:
    """Ray's processes in this network namespace (the cluster's): raylets, GCS, node starters."""
    mine, found = os.readlink("/proc/self/ns/net"), []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.readlink(f"/proc/{pid}/ns/net") != mine:
                continue
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if state != "Z" and (comm in ("raylet", "gcs_server") or "start_ray_node" in cmd or "ray::" in comm):
            found.append(f"{pid} {comm} {cmd[:100]}")
    return found


def _locality(stats: dict[str, Any]) -> dict[str, Any]:
    """The pool's batches and rows per actor node, and crossed_nodes (item 4)."""
    by_node: dict[str, dict[str, int]] = {}
    for a in stats["actors"]:
        node = by_node.setdefault(a["node_id"], {"rows": 0, "batches": 0})
        node["rows"] += int(a.get("rows", {}).get("sql", 0))
        node["batches"] += int(a.get("batches", {}).get("sql", 0))
    return {
        "by_node": by_node, "crossed_nodes": stats["crossed_nodes"],
        "batches": stats["batches"]["sql"], "rows": stats["rows"]["sql"],
    }


def _score(spark: SparkSession, name: str, rows: int, partitions: int, model: Any) -> dict[str, Any]:
    from tests.helpers import expected_classes, features_sql

    start = time.perf_counter()
    got = spark.sql(
        f"select id, {name}({features_sql()}) as p from range(0, {rows}, 1, {partitions})"
    ).collect()
    seconds = time.perf_counter() - start
    got.sort(key=lambda r: r.id)
    ids = [r.id for r in got]
    return {
        "rows": len(got),
        "exact": [r.p for r in got] == expected_classes(model, ids),
        "seconds": seconds,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ray-address", required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--rows", type=int, default=20000)
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--model-source", default="auto")
    p.add_argument("--kill-wait", default="")
    p.add_argument("--import-ray-first", action="store_true")
    p.add_argument("--try-storage", action="store_true")
    p.add_argument("--ray-on-spark", default="", help="JSON: setup_ray_cluster options (--ray-address spark)")
    args = p.parse_args()
    data = Path(args.data_dir)
    out: dict[str, Any] = {}
    start = time.perf_counter()
    spark = _session(str(data / "warehouse"))
    try:
        import ray

        from spark_ray_udf import register_ray_model, save_model
        from spark_ray_udf.testing import apply_linear, init_linear, make_linear_model

        if args.import_ray_first:
            out["imported_first"] = _import_ray_on_executors(spark, args.partitions * 2)
        linear = make_linear_model(data / "linear", n_features=8, n_classes=3, seed=0)
        table = str(data / "tables" / "linear")
        save_model(spark, data / "linear", table)
        start = time.perf_counter()
        with register_ray_model(
            spark, table, "cluster_predict", init_linear, apply_linear, return_type="bigint",
            num_actors=2, ray_address=args.ray_address, model_source=args.model_source,
            init_timeout_s=120, call_timeout_s=60,
            ray_on_spark=json.loads(args.ray_on_spark) if args.ray_on_spark else None,
        ) as model:
            out["register_s"] = time.perf_counter() - start
            out["alive_nodes"] = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
            out["actor_nodes"] = [a.node_id for a in model.actors]
            out["files"] = list(model._pool.spec.files)
            out["auth_mode"] = os.environ.get("RAY_AUTH_MODE", "")
            start = time.perf_counter()
            out["first"] = _score(spark, "cluster_predict", args.rows, args.partitions, linear)
            out["work_roots"] = [a.model_dir for a in model.actors]
            out["locality"] = _locality(model.stats())
            if args.ray_address == "spark":
                from spark_ray_udf import ray_on_spark

                out["ray_on_spark_start_s"] = ray_on_spark.start_seconds()
                out["driver_node"] = ray.get_runtime_context().get_node_id()
                out["under_executor"] = [_under_executor(a) for a in model._pool.generation.actors]
            if args.try_storage:  # asked explicitly: each actor reads the files (a shared disk)
                with register_ray_model(
                    spark, table, "cluster_storage", init_linear, apply_linear,
                    return_type="bigint", ray_address=args.ray_address, model_source="storage",
                ) as stored:
                    out["storage_files"] = len(stored._pool.spec.files)
                    out["storage"] = _score(spark, "cluster_storage", 2000, 2, linear)
            if args.kill_wait:
                Path(args.out + ".phase1").write_text(json.dumps(out))
                deadline = time.monotonic() + 180
                while not Path(args.kill_wait).exists() and time.monotonic() < deadline:
                    time.sleep(0.2)
                out["second"] = _score(spark, "cluster_predict", args.rows, args.partitions, linear)
                deadline = time.monotonic() + 180  # until the GCS marks the lost node dead
                while len([n for n in ray.nodes() if n["Alive"]]) >= len(out["alive_nodes"]):
                    if time.monotonic() > deadline:
                        break
                    time.sleep(1.0)
                out["alive_after"] = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
                out["actor_nodes_after"] = [_node_of(a) for a in model._pool.generation.actors]
        if args.ray_address == "spark":  # closed: the last user of Ray on Spark shut it down
            closed, left = time.monotonic(), _ray_processes()
            while left and time.monotonic() - closed < 60:
                time.sleep(0.5)
                left = _ray_processes()
            out["ray_left_after_close"] = left
            out["ray_gone_s"] = time.monotonic() - closed
    except Exception as exc:  # the test reads the error and how long it took
        out["error"] = f"{type(exc).__name__}: {exc}"
        out["error_s"] = time.perf_counter() - start
        out["traceback"] = traceback.format_exc()
    finally:
        Path(args.out).write_text(json.dumps(out))
        spark.stop()


if __name__ == "__main__":
    main()
