"""Arrow Flight against the raylet path: the same pool options, the same batches, one run.

Two pools of one linear model (784 features, 10 classes; ``apply_func`` = the top score, a
10k x 784 x 10 product, a few ms) are registered, one with ``executor_transport="ray"`` and one
with ``"flight"``. The executor-side client of each (:class:`spark_ray_udf.client.PoolClient`,
:class:`spark_ray_udf._flight.FlightPoolClient`) is driven straight from this process (no Spark
task: the figure is the transport, not Spark's Arrow hand-off), with ``float32 x 784`` batches:

* **round trip**: one batch at a time (``max_in_flight=1`` in effect), the median and p90 of
  ``--trips`` calls;
* **throughput**: ``--batches`` batches with ``max_in_flight=2`` (the default), rows per second.

    PYTHONPATH=. python -m benchmarks.transport --rows 10000 --trips 30 --batches 60

Prints one JSON line per transport (``logging`` at INFO says what runs).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from typing import Any

import numpy as np
import pyarrow as pa

log = logging.getLogger("benchmarks.transport")

N_FEATURES = 784
N_CLASSES = 10


def apply_top(model: Any, x: np.ndarray) -> np.ndarray:
    """``float``: the top class score of each row."""
    return (np.asarray(x, dtype=np.float32) @ model.weights.astype(np.float32)).max(axis=1)


def _batch(rows: int, seed: int) -> pa.Array:
    x = np.random.default_rng(seed).random((rows, N_FEATURES), dtype=np.float32)
    return pa.ListArray.from_arrays(
        pa.array(np.arange(0, rows * N_FEATURES + 1, N_FEATURES, dtype=np.int32)), pa.array(x.ravel())
    )


def _measure(client: Any, batch: pa.Array, *, trips: int, batches: int) -> dict[str, Any]:
    list(client.map_batches([batch]))  # warm: connections, first call
    seconds = []
    for _ in range(trips):
        t0 = time.perf_counter()
        for out in client.map_batches([batch]):
            assert len(out) == len(batch)  # noqa: S101 - a benchmark's own check
        seconds.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    n = sum(len(out) for out in client.map_batches([batch] * batches))
    wall = time.perf_counter() - t0
    seconds.sort()
    return {
        "round_trip_median_ms": round(statistics.median(seconds) * 1000, 2),
        "round_trip_p90_ms": round(seconds[int(0.9 * (len(seconds) - 1))] * 1000, 2),
        "rows_per_s": round(n / wall),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000, help="rows per batch")
    parser.add_argument("--trips", type=int, default=30, help="single-batch round trips timed")
    parser.add_argument("--batches", type=int, default=60, help="batches of the throughput run")
    parser.add_argument("--actors", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    from spark_ray_udf import register_ray_model, save_model
    from spark_ray_udf._flight import FlightPoolClient
    from spark_ray_udf.client import PoolClient
    from spark_ray_udf.testing import init_linear, local_spark, make_linear_model

    work = tempfile.mkdtemp(prefix="bench-transport-")
    spark = local_spark("bench-transport", warehouse_dir=f"{work}/warehouse")
    make_linear_model(f"{work}/model", n_features=N_FEATURES, n_classes=N_CLASSES, seed=0)
    save_model(spark, f"{work}/model", "ai_model.bench_transport")
    batch = _batch(args.rows, seed=1)
    log.info("batch: %d rows x %d float32 = %.1f MB", args.rows, N_FEATURES, batch.nbytes / 1e6)
    results = {}
    for transport in ("ray", "flight"):
        with register_ray_model(
            spark, "ai_model.bench_transport", f"bench_{transport}", init_linear, apply_top,
            return_type="float", num_actors=args.actors, min_split_rows=None,
            executor_transport=transport,  # type: ignore[arg-type]
        ) as model:
            client = PoolClient(model.address) if transport == "ray" else FlightPoolClient(model.address)
            log.info("measuring %s", transport)
            results[transport] = _measure(client, batch, trips=args.trips, batches=args.batches)
        sys.stdout.write(json.dumps({"transport": transport, "rows": args.rows, **results[transport]}) + "\n")
    spark.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
