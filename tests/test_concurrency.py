"""Backpressure: many queries, a stream beside batch queries, and the bound on batches in flight.

One pool of 2 actors with ``max_in_flight=2`` serves everything here; each call sleeps a little
so that queues form. Every result is compared with the model's in-process predictions, and
every wait has a generous timeout, so a deadlock fails the test instead of hanging it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from spark_ray_udf import RayModel, register_ray_model
from spark_ray_udf.testing import apply_linear
from tests import helpers
from tests.helpers import features_np, features_sql, spark_conf

TIMEOUT_S = 300.0
BATCH_KEY = "spark.sql.execution.arrow.maxRecordsPerBatch"


@pytest.fixture(scope="module")
def shared(spark: Any, linear_table: Any) -> Iterator[RayModel]:
    """``cc_predict(features)``: bigint classes, 2 actors, 2 batches in flight per task, 10 ms
    per batch."""
    with register_ray_model(
        spark, linear_table.table, "cc_predict", helpers.init_with_conf, helpers.apply_slow,
        return_type="bigint", num_actors=2, max_in_flight=2, conf={"sleep_s": 0.01},
    ) as model:
        yield model


def run_threads(targets: list[Any]) -> list[BaseException]:
    """Start every target in its own thread, join each within TIMEOUT_S; return the errors."""
    errors: list[BaseException] = []

    def guard(target: Any) -> None:
        try:
            target()
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=guard, args=(t,), daemon=True) for t in targets]
    for t in threads:
        t.start()
    deadline = time.monotonic() + TIMEOUT_S
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    stuck = sum(t.is_alive() for t in threads)
    assert stuck == 0, f"{stuck} of {len(threads)} threads still run after {TIMEOUT_S}s: a deadlock"
    return errors


def batch_query(spark: Any, linear: Any, start: int, n: int, out: dict[int, bool]) -> Any:
    """A query over ids start..start+n-1 (3 partitions) that checks its own rows."""

    def run() -> None:
        rows = spark.sql(f"""
            select id, cc_predict({features_sql()}) as label
            from range({start}, {start + n}, 1, 3)
        """).collect()
        rows = sorted(rows)
        assert [r.id for r in rows] == list(range(start, start + n))
        want = apply_linear(linear, features_np(np.arange(start, start + n)))
        assert [r.label for r in rows] == want.tolist(), f"query from {start}"
        out[start] = True

    return run


def test_eight_concurrent_queries_share_one_pool(spark, linear_table, shared):
    """8 queries at once on a pool of 2 actors (2 in flight per task): all exact, no deadlock."""
    done: dict[int, bool] = {}
    with spark_conf(spark, BATCH_KEY, "50"):
        errors = run_threads(
            [batch_query(spark, linear_table.model, k * 10_000, 600, done) for k in range(8)]
        )
    assert errors == []
    assert sorted(done) == [k * 10_000 for k in range(8)]
    assert len(shared.actor_pids()) == 2


def test_stream_beside_batch_queries(spark, linear_table, shared, tmp_path):
    """A streaming query and 3 batch queries share the pool: the stream's rows are exact too."""
    stream = (
        spark.readStream.format("rate").option("rowsPerSecond", 200).load()
        .selectExpr("value as id")
        .selectExpr("id", f"{features_sql()} as features")
    )
    stream.createOrReplaceTempView("cc_stream")
    query = (
        spark.sql("select id, cc_predict(features) as label from cc_stream")
        .writeStream.format("memory").queryName("cc_stream_out")
        .option("checkpointLocation", str(tmp_path / "ckpt"))
        .trigger(processingTime="300 milliseconds")
        .start()
    )
    done: dict[int, bool] = {}
    try:
        helpers.wait_for(
            lambda: spark.sql("select count(*) from cc_stream_out").head()[0] >= 50
            or query.exception() is not None,
            TIMEOUT_S, "the stream's first rows",
        )
        with spark_conf(spark, BATCH_KEY, "50"):
            errors = run_threads(
                [batch_query(spark, linear_table.model, 100_000 + k * 1000, 400, done)
                 for k in range(3)]
            )
        seen = spark.sql("select count(*) from cc_stream_out").head()[0]
        helpers.wait_for(
            lambda: spark.sql("select count(*) from cc_stream_out").head()[0] > seen
            or query.exception() is not None,
            TIMEOUT_S, "the stream to go on after the batch queries",
        )
    finally:
        query.stop()
    assert query.exception() is None
    assert errors == [] and len(done) == 3
    rows = spark.sql("select id, label from cc_stream_out").collect()
    ids = np.array([r.id for r in rows])
    assert len(ids) == len(set(ids.tolist())) >= 50
    want = apply_linear(linear_table.model, features_np(ids))
    np.testing.assert_array_equal(np.array([r.label for r in rows]), want)


def test_batches_in_flight_per_task_never_exceed_max_in_flight(linear_table, shared):
    """The executor-side client pulls batch k+max_in_flight only after returning result k."""
    from spark_ray_udf.client import PoolClient

    client = PoolClient(shared.address)
    n_batches, rows_per_batch = 30, 10
    pulled = [0]
    yielded = [0]
    most = [0]

    def batches() -> Iterator[pa.Array]:
        for k in range(n_batches):
            most[0] = max(most[0], pulled[0] + 1 - yielded[0])
            pulled[0] += 1
            x = features_np(np.arange(k * rows_per_batch, (k + 1) * rows_per_batch))
            yield pa.array(list(x), type=pa.list_(pa.float64()))

    labels = []
    for out in client.map_batches(batches()):
        labels.extend(out.to_pylist())
        yielded[0] += 1
    want = apply_linear(linear_table.model, features_np(np.arange(n_batches * rows_per_batch)))
    assert labels == want.tolist()
    assert most[0] == shared.address.max_in_flight == 2, "bounded, and the bound is used"
